"""d-run: run a command in a pulled image with bubblewrap, unprivileged, and exec into bwrap.

Start-up matters (d-run should cost little more than bwrap itself): this module imports only the
standard library, `store` and `errors`, never `requests` or `doit`.
"""

import argparse
import json
import os
import signal
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from . import ports, seccomp
from .errors import Error
from .store import PullDir

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SYMLINKS = 40  # as the kernel's path walk


# ----- config.json -----------------------------------------------------------------------------

# Value types here are namedtuples: a dataclass takes ten times as long to define, and d-run's
# start-up is paid on every run.


class ImageConfig(
    namedtuple(
        "ImageConfig",
        "user hostname workdir env volumes entrypoint cmd net rw ports",
        defaults=("", "", "", (), (), (), (), False, False, ()),
    )
):
    """The keys of config.json that d-run honours, checked: strings (user, hostname, workdir), tuples of
    strings (env as "KEY=VALUE", volumes as paths, entrypoint, cmd, ports as -p takes them) and booleans
    (net, rw)."""

    __slots__ = ()


def is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# What each key of config.json may hold, besides null.
KINDS = {
    "string": lambda value: isinstance(value, str),
    "list of strings": is_string_list,
    'list of "KEY=VALUE" strings': lambda value: is_string_list(value) and all("=" in item[1:] for item in value),
    'object such as {"/data": {}}': lambda value: isinstance(value, dict),
    "boolean": lambda value: isinstance(value, bool),
}


def config_value(data: dict, key: str, kind: str) -> object:
    """data[key] when it is of `kind` or null/absent (None); otherwise an Error naming the key."""
    value = data.get(key)
    if value is None or KINDS[kind](value):
        return value
    raise Error(f"config.json: {key!r} must be a {kind} or null, not {json.dumps(value)}", "fix it in config.json")


def config_checked(key: str, value: str, check: Callable[[str], str]) -> str:
    """`check(value)` for config.json's `key`, its ValueError an Error naming the key."""
    try:
        return check(value)
    except ValueError as err:
        raise Error(f"config.json: {key!r}: {err}", "fix it in config.json") from None


def parse_config(data: object) -> ImageConfig:
    """Check the decoded config.json; the keys d-run does not use (ExposedPorts, Labels, ...) are left alone."""
    if not isinstance(data, dict):
        raise Error("config.json must hold a JSON object", "fix config.json")
    hostname = config_value(data, "Hostname", "string")
    workdir = config_value(data, "WorkingDir", "string")
    volumes = config_value(data, "Volumes", 'object such as {"/data": {}}') or {}
    return ImageConfig(
        user=config_value(data, "User", "string") or "",
        hostname=config_checked("Hostname", hostname, check_hostname) if hostname else "",
        workdir=config_checked("WorkingDir", workdir, absolute_path) if workdir else "",
        env=tuple(config_value(data, "Env", 'list of "KEY=VALUE" strings') or ()),
        volumes=tuple(config_checked("Volumes", path, volume_target) for path in volumes),
        entrypoint=tuple(config_value(data, "Entrypoint", "list of strings") or ()),
        cmd=tuple(config_value(data, "Cmd", "list of strings") or ()),
        net=bool(config_value(data, "net", "boolean")),
        rw=bool(config_value(data, "rw", "boolean")),
        ports=tuple(config_value(data, "ports", "list of strings") or ()),
    )


def read_config(path: Path) -> ImageConfig:
    try:
        return parse_config(json.loads(path.read_bytes()))
    except json.JSONDecodeError as err:
        raise Error(f"{path}: not valid JSON ({err})", "fix config.json, or pull again into a new folder") from None
    except OSError as err:
        raise Error(f"{path}: {err.strerror}") from None


# ----- files inside the image --------------------------------------------------------------------


def image_path(rootfs: Path, path: str) -> Path:
    """The host path of `path` inside the image, symbolic links resolved as the container would see them.

    Links are followed within `rootfs` (an absolute target restarts at the image's root, `..` stops at
    it), so reading /etc/passwd never reads the host's.
    """
    pending = [part for part in path.split("/") if part]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = rootfs.joinpath(*resolved, part)
        if not candidate.is_symlink():
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise Error(f"too many levels of symbolic links in {path} inside the image")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending[:0] = [item for item in target.split("/") if item]
    return rootfs.joinpath(*resolved)


def read_image_file(rootfs: Path, path: str) -> str:
    """A text file of the image, or "" when it does not exist there."""
    try:
        return image_path(rootfs, path).read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return ""
    except OSError as err:
        raise Error(f"{path} inside the image: {err.strerror}") from None


# ----- users ----------------------------------------------------------------------------------------


class Identity(namedtuple("Identity", "uid gid home")):
    """Who runs inside: uid and gid (int), and the HOME (str) the image's /etc/passwd gives."""

    __slots__ = ()


def split_rows(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if not line.startswith("#")]


def passwd_rows(text: str) -> list[list[str]]:
    """The well-formed rows of an /etc/passwd: name, password, uid, gid, gecos, home, shell."""
    return [row for row in split_rows(text) if len(row) == 7 and row[2].isdigit() and row[3].isdigit()]


def group_rows(text: str) -> list[list[str]]:
    """The well-formed rows of an /etc/group: name, password, gid, members."""
    return [row for row in split_rows(text) if len(row) == 4 and row[2].isdigit()]


def find_row(rows: list[list[str]], name_or_id: str) -> list[str] | None:
    """The row naming `name_or_id` (column 0), or numbering it (column 2) when it is a number."""
    if name_or_id.isdigit():
        return next((row for row in rows if int(row[2]) == int(name_or_id)), None)
    return next((row for row in rows if row[0] == name_or_id), None)


def check_id(text: str) -> int:
    number = int(text)
    if number >= 2**32 - 1:  # (uid_t) -1 means "no change" to the kernel
        raise Error(f"user or group id {text} is out of range")
    return number


def resolve_user(spec: str, passwd: str, group: str) -> Identity:
    """`NAME|UID[:GROUP|GID]` as Docker reads it, names looked up in the image's /etc/passwd and /etc/group.

    No user means root. A user without a group gets its primary group from /etc/passwd (0 when the uid
    is not listed there), and HOME comes from /etc/passwd ("/" when not listed).
    """
    user, _, group_name = spec.partition(":")
    user = user or "0"
    entry = find_row(passwd_rows(passwd), user)
    if entry is None and not user.isdigit():
        raise Error(f"user {user!r} is not in the image's /etc/passwd", "give a numeric UID, or a name listed there")
    uid = check_id(entry[2] if entry else user)
    home = (entry[5] if entry else "") or "/"
    if not group_name:
        return Identity(uid, check_id(entry[3]) if entry else 0, home)
    match = find_row(group_rows(group), group_name)
    if match is None and not group_name.isdigit():
        raise Error(
            f"group {group_name!r} is not in the image's /etc/group", "give a numeric GID, or a name listed there"
        )
    return Identity(uid, check_id(match[2] if match else group_name), home)


# ----- mounts, environment, command ------------------------------------------------------------------


class Mount(namedtuple("Mount", "target source read_only", defaults=("", False))):
    """`source` on the host bound at `target` in the container; an empty `source` is an anonymous volume."""

    __slots__ = ()


def absolute_path(path: str) -> str:
    """`path` normalised, if it is absolute and free of `..` (a container path is never resolved on the host)."""
    parts = PurePosixPath(path).parts
    if not path.startswith("/") or ".." in parts:
        raise ValueError(f"expected an absolute path without '..', not {path!r}")
    return str(PurePosixPath(*parts))


def volume_target(path: str) -> str:
    target = absolute_path(path)
    if target == "/":
        raise ValueError("a volume cannot replace the root folder")
    return target


def parse_volume(spec: str) -> Mount:
    """`-v` as Docker reads it: HOST:CONTAINER or CONTAINER (an anonymous volume), with `:ro` or `:rw` after."""
    parts = spec.split(":")
    read_only = len(parts) > 1 and parts[-1] == "ro"
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        parts.pop()
    if len(parts) == 1:
        return Mount(volume_target(parts[0]), read_only=read_only)
    if len(parts) == 2 and parts[0]:
        return Mount(volume_target(parts[1]), parts[0], read_only)
    raise ValueError(f"expected HOST:CONTAINER[:ro] or CONTAINER, not {spec!r}")


def parse_env(item: str) -> tuple[str, str | None]:
    """`KEY=VALUE`, or `KEY` alone (value None) to pass on the value d-run itself has, as Docker does."""
    key, equals, value = item.partition("=")
    if not key or any(char.isspace() for char in key):
        raise ValueError(f"expected KEY=VALUE or KEY, not {item!r}")
    return key, value if equals else None


def parse_env_file(text: str) -> list[tuple[str, str | None]]:
    """An --env-file: `KEY=VALUE` or `KEY` a line, values kept as written; blank and `#` lines skipped."""
    lines = (line.lstrip() for line in text.splitlines())
    return [parse_env(line) for line in lines if line and not line.startswith("#")]


def container_env(
    base: dict[str, str], image_env: tuple[str, ...], user_env: list[tuple[str, str | None]], host_env: dict[str, str]
) -> dict[str, str]:
    """The whole environment: d-run's defaults, then the image's Env, then the user's (later wins).

    A user's `KEY` without a value takes d-run's own value, and is left out when d-run has none.
    """
    env = dict(base)
    env.update(item.split("=", 1) for item in image_env)
    for key, value in user_env:
        if value is not None:
            env[key] = value
        elif key in host_env:
            env[key] = host_env[key]
    return env


def container_command(config: ImageConfig, entrypoint: str | None, args: list[str]) -> tuple[str, ...]:
    """Entrypoint + Cmd as Docker combines them: arguments replace Cmd, --entrypoint replaces both."""
    if entrypoint is not None:
        command = (*filter(None, [entrypoint]), *args)
    else:
        command = (*config.entrypoint, *(args or config.cmd))
    if not command:
        raise Error("nothing to run: the image has no Entrypoint or Cmd", "give a command after DIR: d-run DIR CMD...")
    return command


def check_hostname(name: str) -> str:
    if not 0 < len(name.encode()) <= 64:
        raise ValueError("a host name has 1 to 64 bytes")
    return name


def default_hostname(folder: str) -> str:
    """The pull folder's name, made a valid host name."""
    name = "".join(char if char.isascii() and char.isalnum() else "-" for char in folder)
    return name.strip("-")[:63].strip("-") or "d-run"


def hosts_file(hostname: str) -> bytes:
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n".encode()


# ----- the sandbox and its bwrap command line ---------------------------------------------------------


class Sandbox(
    namedtuple(
        "Sandbox",
        "rootfs command identity hostname workdir env mounts data_files writable network seccomp_fd new_session ports",
        defaults=((), (), False, False, None, True, ()),
    )
):
    """Everything the bwrap command line is made of, resolved: the rootfs path, the command (tuple), an
    Identity, hostname, workdir, env (dict), mounts (Mounts with their sources, parents first), data_files
    ((fd bwrap reads, read-only file it becomes) pairs), writable, network, seccomp_fd (int or None),
    new_session and ports (ports.Port, published through pasta)."""

    __slots__ = ()


def bwrap_argv(box: Sandbox) -> list[str]:
    """The whole bwrap command line for `box`."""
    argv = ["bwrap", "--unshare-all", *(["--share-net"] if box.network else [])]
    argv += ["--unshare-user", "--uid", str(box.identity.uid), "--gid", str(box.identity.gid)]
    argv += ["--hostname", box.hostname, "--die-with-parent"]
    argv += ["--new-session"] if box.new_session else []
    argv += ["--seccomp", str(box.seccomp_fd)] if box.seccomp_fd is not None else []
    # The root is bound writable first so that bwrap can make missing mount points in it, and made
    # read-only last: --remount-ro does not reach the mounts below it.
    argv += ["--bind", box.rootfs, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for mount in box.mounts:
        argv += ["--ro-bind" if mount.read_only else "--bind", mount.source, mount.target]
    for fd, target in box.data_files:
        argv += ["--ro-bind-data", str(fd), target]
    argv += [] if box.writable else ["--remount-ro", "/"]
    argv += ["--chdir", box.workdir, "--clearenv"]
    for key, value in box.env.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *box.command]


# ----- what d-run finds on the host -------------------------------------------------------------------

RESOLV_CONF = "/etc/resolv.conf"
# apt drops privileges to its _apt user for downloads, which a single mapped user cannot do.
APT_CONF = "/etc/apt/apt.conf.d/99d-run"
APT_SETTINGS = b'// d-run: bwrap maps a single user, so apt cannot switch to _apt\nAPT::Sandbox::User "root";\n'


def userns_error(max_namespaces: str, unprivileged_clone: str, euid: int) -> Error | None:
    """Why bwrap cannot make a user namespace, from the kernel's settings, or None when it can."""
    if max_namespaces.strip() == "0":
        return Error(
            "the kernel allows no user namespaces (/proc/sys/user/max_user_namespaces is 0)",
            "ask the administrator to raise it: sysctl -w user.max_user_namespaces=15000",
        )
    if euid != 0 and unprivileged_clone.strip() == "0":
        return Error(
            "the kernel lets only root create user namespaces (/proc/sys/kernel/unprivileged_userns_clone is 0)",
            "ask the administrator to allow them: sysctl -w kernel.unprivileged_userns_clone=1",
        )
    return None


def read_setting(path: str) -> str:
    """A /proc/sys value, or "" where this kernel has no such setting."""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def check_user_namespaces() -> None:
    # Checked before the exec: once bwrap runs, its own message is all the user would get.
    error = userns_error(
        read_setting("/proc/sys/user/max_user_namespaces"),
        read_setting("/proc/sys/kernel/unprivileged_userns_clone"),
        os.geteuid(),
    )
    if error:
        raise error


def anonymous_volume(pull: PullDir, target: str) -> str:
    """DIR/volumes/<target>: made on first use as a copy of what the image holds there, as Docker does."""
    path = pull.volumes / target.lstrip("/")
    if path.is_dir():
        return str(path)
    seed = image_path(pull.rootfs, target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not seed.is_dir():
            path.mkdir()
            return str(path)
        import shutil  # only when a volume is first made: slow to import

        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            shutil.copytree(seed, partial, symlinks=True)
            os.rename(partial, path)  # whole or not at all
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as err:
        raise Error(f"anonymous volume {target}: cannot make {path}: {err}") from None
    return str(path)


def host_source(mount: Mount, pull: PullDir) -> Mount:
    """`mount` with its host path made absolute and checked, or its anonymous volume made."""
    if not mount.source:
        return Mount(mount.target, anonymous_volume(pull, mount.target), mount.read_only)
    source = os.path.abspath(mount.source)
    if not os.path.exists(source):
        raise Error(f"volume {mount.source}:{mount.target}: {source} does not exist", "create it, or fix the -v option")
    return Mount(mount.target, source, mount.read_only)


def merged_mounts(defaults: list[Mount], volumes: list[Mount]) -> list[Mount]:
    """The image's volumes and d-run's own mounts, replaced by -v at the same target; parents first."""
    by_target = {mount.target: mount for mount in [*defaults, *volumes]}
    return sorted(by_target.values(), key=lambda mount: PurePosixPath(mount.target).parts)


def check_workdir(rootfs: Path, workdir: str, mounts: list[Mount]) -> None:
    if any(workdir == mount.target or workdir.startswith(mount.target + "/") for mount in mounts):
        return  # inside a volume: bwrap reports it if missing
    if not image_path(rootfs, workdir).is_dir():
        raise Error(f"the working directory {workdir} does not exist in the image", "choose another with --workdir")


def read_env_files(paths: list[str]) -> list[tuple[str, str | None]]:
    pairs = []
    for path in paths:
        try:
            with open(path) as handle:
                pairs += parse_env_file(handle.read())
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
    os.set_inheritable(read_end, True)
    return read_end


def plan_sandbox(args: argparse.Namespace) -> Sandbox:
    """Resolve the flags, config.json and the image's files into a Sandbox; anonymous volumes are made
    last, once everything else is known to be right."""
    pull = PullDir(args.dir)
    pull.require_complete()
    config = read_config(pull.config)
    command = container_command(config, args.entrypoint, args.command)
    check_user_namespaces()
    passwd, group = read_image_file(pull.rootfs, "etc/passwd"), read_image_file(pull.rootfs, "etc/group")
    identity = resolve_user(args.user if args.user is not None else config.user, passwd, group)
    hostname = args.hostname or config.hostname or default_hostname(pull.root.name)
    base_env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": identity.home}
    if "TERM" in os.environ:
        base_env["TERM"] = os.environ["TERM"]
    env = container_env(base_env, config.env, read_env_files(args.env_file) + args.env, dict(os.environ))
    published = ports.published(args.publish, config.ports, args.net or config.net)
    network = args.net or config.net or bool(published)  # with ports: pasta's network namespace, shared by bwrap
    defaults = [Mount(target) for target in config.volumes]
    if network and os.path.exists(RESOLV_CONF):
        defaults.append(Mount(RESOLV_CONF, RESOLV_CONF, read_only=True))
    mounts = merged_mounts(defaults, args.volume)
    workdir = args.workdir or config.workdir or "/"
    check_workdir(pull.rootfs, workdir, mounts)
    if published:
        ports.check_ready(published, os.environ.get("PATH", os.defpath))
    mounts = [host_source(mount, pull) for mount in mounts]
    files = [(hosts_file(hostname), "/etc/hosts")]
    if image_path(pull.rootfs, os.path.dirname(APT_CONF)).is_dir():
        files.append((APT_SETTINGS, APT_CONF))
    program = seccomp.filter_program(os.uname().machine)
    return Sandbox(
        rootfs=str(pull.rootfs),
        command=command,
        identity=identity,
        hostname=hostname,
        workdir=workdir,
        env=env,
        mounts=tuple(mounts),
        data_files=tuple((data_fd(data), target) for data, target in files),
        writable=args.rw or config.rw,
        network=network,
        seccomp_fd=data_fd(program) if program else None,
        # A terminal stays the container's, for job control, guarded by the seccomp filter; without
        # the filter (a machine it does not know), a new session is the only guard.
        new_session=not os.isatty(0) or program is None,
        ports=published,
    )


def close_inherited_fds() -> None:
    """Close what d-run's caller left open besides stdin, stdout and stderr: bwrap would pass it on."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # one close_range(2) call on Linux


def exec_bwrap(argv: list[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores SIGPIPE and SIGXFSZ for itself; an exec would hand that on to the container.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise Error(
            "bwrap is not installed (or not on PATH)",
            "install bubblewrap: apt-get install bubblewrap, dnf install bubblewrap, or pacman -S bubblewrap",
        ) from None
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
  the user's -e/--env-file; /etc/hosts names the container (127.0.1.1).
  With stdin not a terminal, the container gets a new session (no access to the terminal).
  On a terminal it keeps it, for job control and Ctrl-C, and a seccomp filter makes
  ioctl TIOCSTI/TIOCLINUX fail (no keystroke injection into your terminal).
  bwrap maps a single user and group, so chown-family calls succeed without effect, and
  an image with /etc/apt/apt.conf.d gets 99d-run there, setting APT::Sandbox::User "root"
  (apt cannot switch to its _apt user): unprivileged dpkg and apt-get work with -w (and -n).
  Missing mount points (a volume's target, /etc/hosts) are made, empty, in DIR/rootfs.

DIR/config.json (edit it; flags win over it):
  User          as --user            Hostname     as --hostname (default: DIR's name)
  WorkingDir    as --workdir         Env          ["KEY=VALUE", ...], under -e/--env-file
  Entrypoint    kept before COMMAND  Cmd          run when no COMMAND is given
  Volumes       {"/path": {}}: anonymous volumes, kept in DIR/volumes/path; a new one starts
                as a copy of what the image holds at that path
  net, rw       true: as -n, -w
  ports         ["8080:80", "5353:53/udp", ...]: as -p (-p replaces them)

COMMAND is taken as it is, even when it starts with '-': d-run reads options only before DIR
(a single '--' right after DIR is dropped).

networks: none (the default: only a loopback); -p: the container's own network with outbound
  access through pasta (apt-get install passt; it needs /dev/net/tun readable and writable by you),
  the published ports forwarded from the host and nothing of the host's loopback reachable; -n: the
  host's network itself. With -p, d-run execs pasta, which runs bwrap and exits with its status.
  d-run's own errors (-p's included: pasta missing, /dev/net/tun not usable, a host port in use, a
  malformed -p) are one line with exit status 1.

examples:
  d-run ./deb cat /etc/os-release
  d-run -p 8080:80 ./nginx          (then: curl http://127.0.0.1:8080/)
  d-run -n -w ./deb apt-get install -y curl
  d-run -v "$PWD":/src:ro --workdir /src -u app ./deb make
"""


def checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse `type` that reports the ValueError of a parser as a usage error."""

    def check(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    check.__name__ = parse.__name__
    return check


def make_parser() -> argparse.ArgumentParser:
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
    add("-v", "--volume", action="append", default=[], type=checked(parse_volume), metavar="HOST:CONTAINER[:ro]",
        help="bind the host path HOST (relative to the current folder) at CONTAINER, read-only with :ro; "
        "CONTAINER alone: an anonymous volume kept in DIR/volumes (repeatable)")  # fmt: skip
    add("-e", "--env", action="append", default=[], type=checked(parse_env), metavar="KEY[=VALUE]",
        help="set KEY inside; KEY alone passes d-run's own value on (repeatable)")  # fmt: skip
    add("--env-file", action="append", default=[], metavar="FILE",
        help="read KEY=VALUE or KEY lines from FILE ('#' comments), before -e (repeatable)")  # fmt: skip
    add("-u", "--user", metavar="NAME|UID[:GROUP|GID]",
        help="run as this user (names from the image's /etc/passwd and /etc/group; default: User, else root)")  # fmt: skip
    add("-w", "--rw", action="store_true", help="make the image's root writable (changes stay in DIR/rootfs)")
    add("-n", "--net", action="store_true", help="share the host's network, with its /etc/resolv.conf")
    add("-p", "--publish", action="append", default=[], metavar="[HOST_ADDR:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]",
        help="forward the host's port (on 127.0.0.1 unless HOST_ADDR is given; [::1] for IPv6) to the container's, "
        "which gets its own network with outbound access through pasta (package passt); the host's loopback "
        "services stay out of reach; not with -n (repeatable)")  # fmt: skip
    add("--workdir", type=checked(absolute_path), metavar="PATH", help="start in PATH (default: WorkingDir, else /)")
    add("--hostname", type=checked(check_hostname), metavar="NAME", help="the container's host name")
    add("--entrypoint", metavar="PROGRAM", help="run PROGRAM instead of the image's Entrypoint and Cmd ('' for none)")
    add("--debug", action="store_true", help="print the bwrap command before running it; tracebacks on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        close_inherited_fds()
        box = plan_sandbox(args)
        command = bwrap_argv(box)
        if box.ports:
            fds = [fd for fd, _ in box.data_files] + ([box.seccomp_fd] if box.seccomp_fd is not None else [])
            command = ports.pasta_argv(box.ports, sys.executable, fds, command)
        if args.debug:
            import shlex

            print(shlex.join(command), file=sys.stderr)
        exec_bwrap(command)
    except Error as err:
        if args.debug:
            raise
        print(f"d-run: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the command-line edge: a bug, said in one line
        if args.debug:
            raise
        print(f"d-run: error: {type(err).__name__}: {err} (run with --debug for a traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
