"""d-run: run a command in a pulled image with bubblewrap, unprivileged, and exec into bwrap.

The pure pieces are in `sandbox`, the mount points and volumes in `mounts`; this module reads the pull folder
and the command line, plans the sandbox and execs.

Start-up matters (d-run should cost little more than bwrap itself): standard library and small dutils
modules only, never `requests` or `doit`.
"""

import errno
import fcntl
import os
import stat
import sys
from collections.abc import Callable
from types import SimpleNamespace

from . import ports, sandbox, seccomp, userns
from .errors import Error
from .locks import hold_folder, hold_while_open
from .mounts import MountTable, find_folder, inheritable, make_empty_file, make_folder, open_sources
from .rootfs import Root, stop_absent
from .store import NotRegular, PullDir, load_json, read_setting, read_small, read_small_followed

try:  # signal's C module: the `signal` module's enums cost d-run's start-up 2 ms
    from _signal import SIG_DFL, SIGPIPE, SIGXFSZ, signal
except ImportError:  # not CPython
    from signal import SIG_DFL, SIGPIPE, SIGXFSZ, signal

RESOLV_CONF = "/etc/resolv.conf"
# apt drops privileges to its _apt user for downloads, which a single mapped user cannot do.
APT_CONF = "/etc/apt/apt.conf.d/99d-run"
APT_SETTINGS = b'// d-run: bwrap maps a single user, so apt cannot switch to _apt\nAPT::Sandbox::User "root";\n'
# DIR's lock (locks.hold_folder) is shared by read-only runs, exclusive for one that a running container could
# race: a --rw root, or a mount inside a bind or volume (bwrap resolves its path). What a start is told:
IN_USE = {fcntl.LOCK_SH: "is in use by a writable container", fcntl.LOCK_EX: "is in use: this run must start alone"}


def read_regular(dir_fd: int, name: str, what: str) -> bytes | None:
    """The bytes of the regular file `name` in `dir_fd` (store.read_small: capped, never through a link, a FIFO or
    a device), or None when there is none."""
    try:
        return read_small(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except NotRegular:
        raise Error(f"{what} is not a regular file", "replace it with one") from None
    except OSError as err:
        raise Error(
            f"{what}: {err.strerror}", "no real one is: replace it" if err.errno == errno.EFBIG else ""
        ) from None


def read_config(dir_fd: int, label: str) -> sandbox.ImageConfig:
    data = read_regular(dir_fd, "config.json", label)
    if data is None:
        raise Error(f"{label} is missing", "pull again into a new folder")
    try:
        return sandbox.parse_config(load_json(data))
    except ValueError as err:
        raise Error(f"{label}: not valid JSON ({err})", "fix config.json, or pull again into a new folder") from None


def read_image_file(rootfs: Root, path: str) -> str:
    """A text file of the image (links followed inside it), or "" when it does not exist there."""
    what = f"{path} inside the image"
    try:
        with rootfs.resolve(path, stop_absent) as place:
            data = read_regular(place.fd, place.name, what)
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError as err:
        raise Error(f"{what}: {err.strerror}") from None
    return (data or b"").decode(errors="replace")


# ----- the sandbox --------------------------------------------------------------------------------------


def check_user_namespaces() -> None:
    # Checked before the exec: once bwrap runs, its own message is all the user would get.
    error = sandbox.userns_error(
        read_setting("/proc/sys/user/max_user_namespaces"),
        read_setting("/proc/sys/kernel/unprivileged_userns_clone"),
        os.geteuid(),
    )
    if error:
        raise error


def read_env_files(paths: list[str]) -> list[tuple[str, str | None]]:
    pairs = []
    for path in paths:
        try:  # capped, and only a regular file (a link to /dev/zero would be read until memory runs out)
            pairs += sandbox.parse_env_file(read_small_followed(path).decode())
        except OSError as err:
            raise Error(f"--env-file {path}: {err.strerror}") from None
        except ValueError as err:
            raise Error(f"--env-file {path}: {err}") from None
    return pairs


def data_fd(data: bytes) -> int:
    """A descriptor bwrap inherits and reads `data` from (a pipe: the data is far below its capacity)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return inheritable(read_end)


def plan_sandbox(args: SimpleNamespace) -> sandbox.Plan:
    """Resolve the flags, config.json and the image's files into a Plan, every mount point made."""
    pull = PullDir(args.dir, str)
    pull.require_complete()
    try:
        dir_fd = os.open(pull.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise Error(f"cannot use {pull.root}: {err.strerror}") from None
    config = read_config(dir_fd, str(pull.config))
    # DIR is the user's and others may enter it (mounts.check_unswappable); in another's, opened to the user, their
    # uids show as the overflow uid inside the run's namespace, whoever they are
    info = os.fstat(dir_fd)
    open_to_others = info.st_uid == os.geteuid() and bool(info.st_mode & 0o011)
    writable, kind = args.rw or config.rw, fcntl.LOCK_EX if args.rw or config.rw else fcntl.LOCK_SH
    lock_fd = hold_folder(pull.root, kind, f"{pull.root} {IN_USE[kind]}")  # before anything is made
    plan_maps = userns.plan_maps
    if os.path.lexists(os.path.join(pull.state, "shared")):  # its files are other folders' too: writes to an overlay
        from .overlay import prepare

        dir_fd, plan_maps = prepare(PullDir(pull.root), dir_fd, writable)
    command = sandbox.container_command(config, args.entrypoint, args.command)
    check_user_namespaces()
    with open_rootfs(dir_fd, str(pull.rootfs)) as rootfs:
        passwd, group = read_image_file(rootfs, "etc/passwd"), read_image_file(rootfs, "etc/group")
        identity = sandbox.resolve_user(args.user if args.user is not None else config.user, passwd, group)
        hostname = args.hostname or config.hostname or sandbox.default_hostname(os.path.basename(pull.root))
        base_env = {"PATH": sandbox.DEFAULT_PATH, "HOSTNAME": hostname, "HOME": identity.home}
        if "TERM" in os.environ:
            base_env["TERM"] = os.environ["TERM"]
        env = sandbox.container_env(base_env, config.env, read_env_files(args.env_file) + args.env, dict(os.environ))
        published = ports.published(args.publish, config.ports, args.net or config.net)
        network = args.net or config.net or bool(published)  # with ports: pasta's network, shared by bwrap
        maps = plan_maps(identity.uid, identity.gid, read_setting)
        root_maps = maps is not None and maps[1] == userns.EVERY_ID  # every id mapped to itself
        defaults = [sandbox.Mount(target) for target in config.volumes]
        if network and os.path.exists(RESOLV_CONF):
            defaults.append(sandbox.Mount(RESOLV_CONF, RESOLV_CONF, read_only=True))
        mounts = sandbox.merged_mounts(defaults, args.volume + args.tmpfs)
        if published:
            ports.check_ready(published, os.environ.get("PATH", os.defpath))
        sources = open_sources(pull, dir_fd, rootfs, mounts)
        table = MountTable(rootfs, open_to_others)
        made = {}  # bwrap makes these afresh (nothing of ours below them); each placed once those before are known,
        for name in ("/proc", "/dev", "/tmp"):  # so that a /tmp linked into /proc is refused here
            made[name] = table.place(name, make_folder)
            table.add(made[name], None, name)
        binds, volumes, nested = [], set(), False  # volumes: where DIR's anonymous volumes go
        for mount, fd in zip(mounts, sources, strict=True):
            is_folder = fd is None or stat.S_ISDIR(os.fstat(fd).st_mode)
            target = table.place(mount.target, make_folder if is_folder else make_empty_file)
            if target == "/":
                raise Error(f"the volume {mount.target} leads to the image's root folder", "remove it")
            covering = table.covering(target)[0]
            nested |= covering is not None and covering[0] in volumes
            table.add(target, fd, mount.source or f"{pull.volumes}{mount.target}")
            binds.append(sandbox.Bind(fd, target, mount.read_only, mount.tmpfs))
            if not mount.source and fd is not None:  # not a -v HOST bind, not a tmpfs
                volumes.add(target)
        # A mount inside one of DIR's volumes, which a running container of DIR may write while bwrap mounts: start
        # alone. (Inside a host folder of yours bound with -v, keeping other containers out is yours, as with -v.)
        if nested and not writable:
            os.close(lock_fd)  # (what was made so far was made through descriptors: no path to race)
            lock_fd = hold_folder(pull.root, fcntl.LOCK_EX, f"{pull.root} {IN_USE[fcntl.LOCK_EX]}")
        files = [(sandbox.hosts_file(hostname), "/etc/hosts"), (f"{hostname}\n".encode(), "/etc/hostname")]
        apt = find_folder(rootfs, os.path.dirname(APT_CONF))
        if apt is not None:
            apt.__exit__()
            if not root_maps:  # under root's mapping apt switches to _apt for real
                files.append((APT_SETTINGS, APT_CONF))
        # d-run's own files go into the image only: where a bind or volume covers their place it wins, as a
        # `-v FILE:/etc/hosts` does in Docker, and nothing is made in the user's folder
        files = [(data, target) for data, target in files if table.covering(target)[0] is None]
        data_files = []
        for data, target in files:
            try:
                data_files.append((table.place(target, make_empty_file), data))
            except Error:  # a folder of others (root's, opened to all), written by no one else: the image's file stays
                if os.fstat(rootfs.root).st_uid == os.geteuid():
                    raise
        data_files = [(data_fd(data), target) for target, data in data_files]
        workdir = args.workdir or config.workdir or "/"
        table.place(workdir, make_folder, mounted=False)  # made when the image lacks it, as runc does
        root_fd = inheritable(os.dup(rootfs.root))
    os.close(dir_fd)
    program = seccomp.filter_program(os.uname().machine, fake_chown=not root_maps, fake_ids=maps is None)
    groups = userns.image_groups(identity.uid, identity.gid, passwd, group) if root_maps else []
    namespaces = [None, None] if maps is None else userns.namespaces(maps, bool(published))
    return sandbox.Plan(
        root_fd=root_fd,
        command=command,
        identity=identity,
        hostname=hostname,
        workdir=workdir,
        env=env,
        binds=tuple(binds),
        data_files=tuple(data_files),
        writable=writable,
        network=network,
        seccomp_fd=data_fd(program) if program else None,
        # A terminal stays the container's, for job control, guarded by the seccomp filter; without
        # the filter (a machine it does not know), a new session is the only guard.
        new_session=not os.isatty(0) or program is None,
        proc=made["/proc"],
        dev=made["/dev"],
        tmp=made["/tmp"],
        ports=published,
        lock_fd=inheritable(hold_while_open(lock_fd)),
        userns_fd=namespaces[0],
        groups=tuple(groups),
        netns_fd=namespaces[1],
    )


def open_rootfs(dir_fd: int, label: str) -> Root:
    try:
        return Root(os.dup(dir_fd), "rootfs")
    except (NotADirectoryError, FileNotFoundError):
        raise Error(f"{label} is not a folder (a symbolic link?)", "pull again into a new folder") from None


def exec_bwrap(argv: list[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores SIGPIPE and SIGXFSZ for itself; an exec would hand that on to the container.
    signal(SIGPIPE, SIG_DFL)
    signal(SIGXFSZ, SIG_DFL)
    program = ports.find_program(argv[0])  # os.execvp's search would import `warnings` (0.5 ms of every start)
    if program is None:
        raise Error(*ports.NO_BWRAP)
    try:
        os.execv(program, argv)
    except OSError as err:
        raise Error(f"cannot run bwrap: {err.strerror}") from None


# ----- the command line -------------------------------------------------------------------------------

DESCRIPTION = """\
Run COMMAND in the image pulled into DIR by d-pull, with bubblewrap (bwrap), unprivileged.

d-run execs into bwrap: no d-run process stays behind, and the container's exit status
comes back as d-run's (128+N when the command dies of signal N, as a shell reports it).
"""

EPILOG = """\
defaults (the safe ones):
  user, pid, ipc, uts, cgroup and network namespaces; the image's root read-only; a fresh /tmp,
  /proc and /dev; no network (only a loopback); the container dies with d-run's parent; a cleared
  environment holding only PATH, HOME, HOSTNAME, TERM (passed on when set), the image's Env and
  the user's -e/--env-file; /etc/hosts (127.0.1.1) and /etc/hostname name the container.
  Read-only runs of one DIR run together; a --rw one (or one mounting inside a volume) alone.
  With stdin not a terminal, the container gets a new session (no access to the terminal).
  On a terminal it keeps it, for job control and Ctrl-C, and a seccomp filter makes
  ioctl TIOCSTI/TIOCLINUX fail (no keystroke injection into your terminal).
  The image's users are real: as root every id maps to itself (for an image whose user is root);
  as a user with a range in /etc/subuid and /etc/subgid (newuidmap), your ids are the image user's
  and the range the others'.
  Without either (or with -p) one user is mapped, and setuid, setgid, setgroups and chown calls
  succeed without effect. Except under root's mapping, chown is faked and an image with /etc/apt/apt.conf.d
  gets 99d-run there, setting APT::Sandbox::User "root". dpkg and apt-get work with --rw (and -n).
  Missing mount points (a volume's target, /etc/hosts) and a missing working directory are
  made, empty, in DIR/rootfs by d-run itself, links resolved inside DIR/rootfs as the
  container sees them; a link inside a volume on the way is refused. A -v or volume over
  /etc/hosts (or over /etc, or apt's folder) wins: d-run then puts no file of its own there.

DIR/config.json (edit it; flags win over it):
  User          as --user            Hostname     as --hostname (default: DIR's name)
  WorkingDir    as --workdir         Env          ["KEY=VALUE", ...], under -e/--env-file
  Entrypoint    kept before COMMAND  Cmd          run when no COMMAND is given
  Volumes       {"/path": {}}: anonymous volumes, kept in DIR/volumes/path; a new one starts
                as a copy of what the image holds at that path (links copied as links;
                device nodes, FIFOs and sockets left out)
  net, rw       true: as -n, --rw
  ports         ["8080:80", "5353:53/udp", ...]: as -p (-p replaces them)

COMMAND is taken as it is, even when it starts with '-': d-run reads options only before DIR
(a single '--' right after DIR is dropped).

networks: none (the default: only a loopback); -p: the container's own network with outbound
  access through pasta (apt-get install passt; it needs /dev/net/tun readable and writable by you),
  the published ports forwarded from the host and nothing of the host's loopback reachable; -n: the
  host's network itself. With -p, pasta serves d-run's network namespace (without a user
  namespace of d-run's: d-run execs pasta, which runs bwrap and exits with its status).
  d-run's own errors (-p's included: pasta missing, /dev/net/tun not usable, a host port in use, a
  malformed -p) are one line with exit status 1.

examples:
  d-run ./deb cat /etc/os-release
  d-run -p 8080:80 ./nginx          (then: curl http://127.0.0.1:8080/)
  d-run -n --rw ./deb apt-get install -y curl
  d-run -v "$PWD":/src:ro --workdir /src -u app ./deb make
"""


# Every option: its flags, where it goes, its metavar (None: a flag), how its value is read, its help.
# REPEATED ones gather a list. Both parsers below are made from this one table.
OPTIONS = (
    (("-v", "--volume"), "volume", "HOST:CONTAINER[:ro]", sandbox.parse_volume,
     "bind the host path HOST (relative to the current folder) at CONTAINER, read-only with :ro; "
     "CONTAINER alone: an anonymous volume kept in DIR/volumes (repeatable)"),
    (("-e", "--env"), "env", "KEY[=VALUE]", sandbox.parse_env,
     "set KEY inside; KEY alone passes d-run's own value on (repeatable)"),
    (("--env-file",), "env_file", "FILE", str,
     "read KEY=VALUE or KEY lines from FILE ('#' comments), before -e (repeatable)"),
    (("-u", "--user"), "user", "NAME|UID[:GROUP|GID]", str,
     "run as this user (names from the image's /etc/passwd and /etc/group; default: User, else root)"),
    (("--rw",), "rw", None, None,
     "make the image's root writable (changes stay in DIR/rootfs; a shared one's in an overlay, see README)"),
    (("-n", "--net"), "net", None, None, "share the host's network, with its /etc/resolv.conf"),
    (("-p", "--publish"), "publish", "[HOST_ADDR:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]", str,
     "forward the host's port (on 127.0.0.1 unless HOST_ADDR is given; [::1] for IPv6) to the container's, "
     "which gets its own network (see networks below); not with -n (repeatable)"),
    (("-w", "--workdir"), "workdir", "PATH", sandbox.absolute_path, "start in PATH (default: WorkingDir, else /)"),
    (("--tmpfs",), "tmpfs", "PATH[:size=BYTES]", sandbox.parse_tmpfs,
     "mount a fresh tmpfs at PATH, of at most BYTES (repeatable)"),
    (("--hostname",), "hostname", "NAME", sandbox.check_hostname, "the container's host name"),
    (("--entrypoint",), "entrypoint", "PROGRAM|JSON", sandbox.parse_entrypoint,
     "run PROGRAM, or a JSON list such as '[\"/bin/sh\",\"-c\"]', instead of the image's Entrypoint and Cmd "
     "('' for none)"),
    (("--debug",), "debug", None, None, "print the bwrap command before running it; tracebacks on errors"),
)  # fmt: skip
REPEATED = {"volume", "env", "env_file", "publish", "tmpfs"}
BY_FLAG = {flag: option for option in OPTIONS for flag in option[0]}


def parse_args(argv: list[str]) -> SimpleNamespace:
    """d-run's command line. The plain forms are read here, without argparse (whose import d-run's every
    start would pay); anything else (--help, an abbreviation, grouped flags, a mistake) goes to argparse,
    made from the same table, which reads it or says what is wrong."""
    return quick_parse(argv) or SimpleNamespace(**vars(make_parser().parse_args(argv)))


def quick_parse(argv: list[str]) -> SimpleNamespace | None:
    """`argv` read as argparse would, or None unless it is only exact options, DIR and the command."""
    args = SimpleNamespace(**{dest: [] if dest in REPEATED else None for _, dest, *_ in OPTIONS})
    args.rw = args.net = args.debug = False
    words = iter(argv)
    for word in words:
        if not word.startswith("-"):
            args.dir, args.command = word, list(words)
            if args.command[:1] == ["--"]:  # as argparse: a '--' right after DIR is dropped
                del args.command[0]
            return args
        name, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        flags, dest, metavar, read, _ = BY_FLAG.get(name, ((), "", None, None, ""))
        if not flags or (metavar is None and equals):
            return None
        if metavar is None:
            setattr(args, dest, True)
            continue
        if not equals:
            value = next(words, "-")  # no value, or an option in its place: argparse's to report
            if value.startswith("-"):
                return None
        try:
            value = read(value)
        except ValueError:
            return None
        if dest in REPEATED:
            getattr(args, dest).append(value)
        else:
            setattr(args, dest, value)
    return None  # no DIR


def make_parser():  # -> argparse.ArgumentParser, imported only here: it costs d-run's start-up
    """The argparse parser of the same table: for --help, and to report what quick_parse does not read."""
    import argparse

    def checked(read: Callable[[str], object]) -> Callable[[str], object]:
        def check(text: str) -> object:
            try:
                return read(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None

        return check

    parser = argparse.ArgumentParser(
        prog="d-run",
        usage="d-run [OPTION...] DIR [COMMAND [ARG...]]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("dir", metavar="DIR", help="a folder made by d-pull (DIR/rootfs, DIR/config.json)")
    add("command", metavar="COMMAND", nargs=argparse.REMAINDER, help="replaces the image's Cmd; Entrypoint stays")
    for flags, dest, metavar, read, text in OPTIONS:
        if metavar is None:
            add(*flags, dest=dest, action="store_true", help=text)
        else:
            kind = {"action": "append", "default": []} if dest in REPEATED else {}
            add(*flags, dest=dest, metavar=metavar, type=checked(read), help=text, **kind)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # What d-run's caller left open besides stdin, stdout and stderr: bwrap would pass it on.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # one close_range(2) call on Linux
        box = plan_sandbox(args)
        command = sandbox.bwrap_argv(box)
        if box.ports and box.netns_fd is None:  # no mapping: pasta makes the namespaces and starts bwrap
            command = ports.pasta_argv(box.ports, sys.executable, sandbox.inherited_fds(box), command)
        if args.debug:  # before become: the image's user may not read the modules it would import
            import shlex

            print(shlex.join(command), file=sys.stderr)
        if box.groups or box.netns_fd is not None:  # root's mapping, -p's network: see userns.become
            userns.become(box)
        exec_bwrap(command)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the command-line edge: an Error as it is, a bug in one line
        if args.debug:
            raise
        said = str(err) if isinstance(err, Error) else f"{type(err).__name__}: {err} (run with --debug for a traceback)"
        print(f"d-run: error: {said}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
