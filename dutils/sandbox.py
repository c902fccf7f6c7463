"""What a d-run sandbox is made of, from pure pieces, up to the bwrap command line. No I/O here: run.py reads
the files, prepares the mount points and execs.

Standard library only, and little of it: d-run's start-up pays for every import. Value types are
namedtuples: a dataclass takes ten times as long to define.
"""

from collections import namedtuple
from collections.abc import Callable

from .errors import CONTROLS, Error
from .store import load_json

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
# Newlines and tabs are kept in commands and values: `sh -c` scripts hold them in real images.
NAME_CONTROLS = frozenset(map(chr, CONTROLS))
TEXT_CONTROLS = NAME_CONTROLS - {"\t", "\n"}
PATH_MAX = 4096  # the kernel's: bwrap could not use a longer path
MAX_VOLUMES = 256  # far beyond real images; each is a folder, a copy and a mount


# ----- config.json -----------------------------------------------------------------------------


# The keys of config.json that d-run honours, checked: env as "KEY=VALUE" strings, ports as -p takes them.
ImageConfig = namedtuple(
    "ImageConfig",
    "user hostname workdir env volumes entrypoint cmd net rw ports",
    defaults=("", "", "", (), (), (), (), False, False, ()),
)


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


def shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, cut short: a config string may be megabytes long."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def config_value(data: dict, key: str, kind: str) -> object:
    """data[key] when it is of `kind` or null/absent (None); otherwise an Error naming the key."""
    value = data.get(key)
    if value is None or KINDS[kind](value):
        return value
    import json  # only to show the bad value: json.decoder imports `re`, which d-run's start-up does without

    text = json.dumps(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    raise Error(f"config.json: {key!r} must be a {kind} or null, not {text}", "fix it in config.json")


def config_checked(key: str, value: str, check: Callable[[str], str]) -> str:
    try:
        return check(value)
    except ValueError as err:
        raise Error(f"config.json: {key!r}: {err}", "fix it in config.json") from None


def without_controls(controls: frozenset[str]) -> Callable[[str], str]:
    """A check refusing NUL and the other `controls`: a name or path holding them is an attack or a mistake."""

    def check(text: str) -> str:
        if not controls.isdisjoint(text):
            raise ValueError(f"holds a control character: {shown(text)}")
        return text

    return check


plain_name, plain_text = without_controls(NAME_CONTROLS), without_controls(TEXT_CONTROLS)


def env_item(item: str) -> str:
    key, _, value = item.partition("=")
    plain_name(key)
    plain_text(value)
    return item


def parse_config(data: object) -> ImageConfig:
    """Check the decoded config.json; the keys d-run does not use (ExposedPorts, Labels, ...) are left alone."""
    if not isinstance(data, dict):
        raise Error("config.json must hold a JSON object", "fix config.json")
    hostname = config_value(data, "Hostname", "string")
    workdir = config_value(data, "WorkingDir", "string")
    volumes = config_value(data, "Volumes", 'object such as {"/data": {}}') or {}
    if len(volumes) > MAX_VOLUMES:
        raise Error(f"config.json: 'Volumes' lists {len(volumes)} volumes, more than {MAX_VOLUMES}", "remove some")
    env = config_value(data, "Env", 'list of "KEY=VALUE" strings') or ()
    entrypoint = config_value(data, "Entrypoint", "list of strings") or ()
    cmd = config_value(data, "Cmd", "list of strings") or ()
    return ImageConfig(
        user=config_checked("User", config_value(data, "User", "string") or "", plain_name),
        hostname=config_checked("Hostname", hostname, check_hostname) if hostname else "",
        workdir=config_checked("WorkingDir", workdir, absolute_path) if workdir else "",
        env=tuple(config_checked("Env", item, env_item) for item in env),
        volumes=tuple(config_checked("Volumes", path, volume_target) for path in volumes),
        entrypoint=tuple(config_checked("Entrypoint", item, plain_text) for item in entrypoint),
        cmd=tuple(config_checked("Cmd", item, plain_text) for item in cmd),
        net=bool(config_value(data, "net", "boolean")),
        rw=bool(config_value(data, "rw", "boolean")),
        ports=tuple(config_value(data, "ports", "list of strings") or ()),
    )


# ----- users ----------------------------------------------------------------------------------------


Identity = namedtuple("Identity", "uid gid home")  # who runs inside, with the HOME /etc/passwd gives


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and '١', which int() then refuses or misreads."""
    return text.isascii() and text.isdigit()


def table_rows(text: str, width: int, numbers: tuple[int, ...]) -> list[list[str]]:
    """The well-formed rows of /etc/passwd (7 columns, uid and gid numbers: 2, 3) or /etc/group (4, gid: 2)."""
    rows = (line.split(":") for line in text.splitlines() if not line.startswith("#"))
    return [row for row in rows if len(row) == width and all(is_number(row[column]) for column in numbers)]


def find_row(rows: list[list[str]], name_or_id: str) -> list[str] | None:
    """The row naming `name_or_id` (column 0), or numbering it (column 2) when it is a number."""
    if is_number(name_or_id):
        return next((row for row in rows if int(row[2]) == int(name_or_id)), None)
    return next((row for row in rows if row[0] == name_or_id), None)


def check_id(text: str) -> int:
    number = int(text)
    if number >= 2**32 - 1:  # (uid_t) -1 means "no change" to the kernel
        raise Error(f"user or group id {text} is out of range")
    return number


def resolve_user(spec: str, passwd: str, group: str) -> Identity:
    """`NAME|UID[:GROUP|GID]` as Docker reads it, names looked up in the image's /etc/passwd and /etc/group;
    as Docker, a uid not listed there gets group 0 and HOME "/"."""
    user, _, group_name = spec.partition(":")
    user = user or "0"
    entry = find_row(table_rows(passwd, 7, (2, 3)), user)
    if entry is None and not is_number(user):
        raise Error(f"user {user!r} is not in the image's /etc/passwd", "give a numeric UID, or a name listed there")
    uid = check_id(entry[2] if entry else user)
    home = (entry[5] if entry else "") or "/"
    if not group_name:
        return Identity(uid, check_id(entry[3]) if entry else 0, home)
    match = find_row(table_rows(group, 4, (2,)), group_name)
    if match is None and not is_number(group_name):
        raise Error(
            f"group {group_name!r} is not in the image's /etc/group", "give a numeric GID, or a name listed there"
        )
    return Identity(uid, check_id(match[2] if match else group_name), home)


# ----- mounts, environment, command ------------------------------------------------------------------


# `source` on the host bound at `target` in the container; an empty `source` is an anonymous volume, and
# `tmpfs` (its size in bytes, 0 for bwrap's default) a fresh tmpfs.
Mount = namedtuple("Mount", "target source read_only tmpfs", defaults=("", False, None))


def absolute_path(path: str) -> str:
    """`path` normalised, if it is absolute, free of `..` and of control characters (a container path is
    never resolved on the host)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not path.startswith("/") or ".." in parts:
        raise ValueError(f"expected an absolute path without '..', not {shown(path)}")
    if len(path.encode(errors="surrogateescape")) >= PATH_MAX:
        raise ValueError(f"a path of {len(path)} characters is longer than the kernel takes ({PATH_MAX} bytes)")
    return "/" + "/".join(plain_name(part) for part in parts)


def volume_target(path: str) -> str:
    target = absolute_path(path)
    if target == "/":
        raise ValueError(f"a volume cannot replace the root folder ({shown(path)})")
    if target in ("/proc", "/dev") or target.startswith(("/proc/", "/dev/")):
        raise ValueError(f"d-run makes /proc and /dev itself: no volume can go there ({shown(path)})")
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


def parse_tmpfs(spec: str) -> Mount:
    """`--tmpfs PATH[:size=BYTES]`, as podman takes it (bytes only: bwrap's --size takes no suffix)."""
    target, _, options = spec.partition(":")
    size = options.removeprefix("size=")
    if options and (size == options or not is_number(size)):
        raise ValueError(f"expected PATH or PATH:size=BYTES, not {shown(spec)}")
    return Mount(volume_target(target), tmpfs=int(size or 0))


def parse_entrypoint(text: str) -> tuple[str, ...]:
    """`--entrypoint` as podman takes it: a JSON list of strings (`["/bin/sh", "-c"]`), else one program."""
    try:
        words = load_json(text) if text.startswith("[") else [text] * bool(text)
    except ValueError:
        words = None
    if not is_string_list(words):
        raise ValueError(f"expected a program or a JSON list of strings, not {shown(text)}")
    return tuple(map(plain_text, words))


def parse_env(item: str) -> tuple[str, str | None]:
    """`KEY=VALUE`, or `KEY` alone (value None) to pass on the value d-run itself has, as Docker does."""
    key, equals, value = item.partition("=")
    if not key or any(char.isspace() for char in key) or "\0" in value:
        raise ValueError(f"expected KEY=VALUE or KEY, not {item!r}")
    return key, value if equals else None


def parse_env_file(text: str) -> list[tuple[str, str | None]]:
    """An --env-file: `KEY=VALUE` or `KEY` a line, values kept as written; blank and `#` lines skipped."""
    lines = (line.lstrip() for line in text.splitlines())
    return [parse_env(line) for line in lines if line and not line.startswith("#")]


def container_env(
    base: dict[str, str], image_env: tuple[str, ...], user_env: list[tuple[str, str | None]], host_env: dict[str, str]
) -> dict[str, str]:
    """The whole environment: d-run's defaults, then the image's Env, then the user's (later wins)."""
    env = dict(base)
    env.update(item.split("=", 1) for item in image_env)
    for key, value in user_env:
        if value is not None:
            env[key] = value
        elif key in host_env:
            env[key] = host_env[key]
    return env


def container_command(config: ImageConfig, entrypoint: tuple[str, ...] | None, args: list[str]) -> tuple[str, ...]:
    """Entrypoint + Cmd as Docker combines them: arguments replace Cmd, --entrypoint replaces both."""
    command = (*entrypoint, *args) if entrypoint is not None else (*config.entrypoint, *(args or config.cmd))
    if not command:
        raise Error("nothing to run: the image has no Entrypoint or Cmd", "give a command after DIR: d-run DIR CMD...")
    return command


def check_hostname(name: str) -> str:
    """A host name as RFC 1123 allows: labels of letters, digits and inner hyphens."""
    labels = name.split(".")
    if not 0 < len(name) <= 253 or not all(
        0 < len(label) <= 63 and HOSTNAME_CHARS.issuperset(label) and label[0] != "-" and label[-1] != "-"
        for label in labels
    ):
        raise ValueError(f"expected a host name of letters, digits, '-' and '.' (RFC 1123), not {shown(name)}")
    return name


def default_hostname(folder: str) -> str:
    """The pull folder's name, made a valid host name."""
    name = "".join(char if char.isascii() and char.isalnum() else "-" for char in folder)
    return name.strip("-")[:63].strip("-") or "d-run"


def hosts_file(hostname: str) -> bytes:
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n".encode()


def merged_mounts(defaults: list[Mount], volumes: list[Mount]) -> list[Mount]:
    """The image's volumes and d-run's own mounts, replaced by -v at the same target; parents first."""
    by_target = {mount.target: mount for mount in [*defaults, *volumes]}
    return sorted(by_target.values(), key=lambda mount: mount.target.split("/"))


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


# What root inside a mapped namespace may do: podman's default set, enough for services and package managers
# to switch users and own files, not to mount, trace or load anything (no CAP_SYS_ADMIN, CAP_SYS_PTRACE...).
ROOT_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
                     "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT")  # fmt: skip


# ----- the sandbox and its bwrap command line ---------------------------------------------------------


# The open source `fd` (an O_PATH descriptor bwrap inherits) bound at `target`, a path free of links; no `fd`:
# a tmpfs of `size` bytes (0: bwrap's default).
Bind = namedtuple("Bind", "fd target read_only size", defaults=(False, 0))
# Everything the bwrap command line is made of, resolved. binds are in mount order; data_files are (fd bwrap
# reads, read-only file it becomes) pairs; proc, dev and tmp are paths free of links (a rootfs may make them
# links); ports are ports.Port, published through pasta; lock_fd holds DIR's lock (locks.hold_folder) for bwrap;
# userns_fd: the user namespace mapping the image's ids (see userns; None: bwrap maps the one user), groups:
# those d-run takes for the image's user under root; netns_fd: -p's network namespace (see userns.namespaces).
Plan = namedtuple(
    "Plan",
    "root_fd command identity hostname workdir env binds data_files writable network seccomp_fd new_session "
    "proc dev tmp ports lock_fd userns_fd groups netns_fd",
    defaults=((), (), False, False, None, True, "/proc", "/dev", "/tmp", (), None, None, (), None),
)


def bwrap_argv(box: Plan) -> list[str]:
    """The whole bwrap command line for `box`. Sources are descriptors, so bwrap resolves no path of
    ours again; every destination was made by d-run, without links."""
    argv = ["bwrap", "--unshare-all", *(["--share-net"] if box.network else []), "--unshare-user"]
    if box.userns_fd is not None:  # d-run's namespace (--unshare-all would add bwrap's own)
        argv = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ([] if box.network else ["--unshare-net"]) + ["--userns", str(box.userns_fd)]
        # bwrap 0.8 never closes --userns' descriptor: as --block-fd it does, before the command (a read fails at once)
        argv += ["--block-fd", str(box.userns_fd)]
        if box.identity.uid == 0:  # bwrap would keep every capability: only these
            argv += ["--cap-drop", "ALL", *(word for cap in ROOT_CAPABILITIES for word in ("--cap-add", cap))]
    argv += ["--uid", str(box.identity.uid), "--gid", str(box.identity.gid)]
    argv += ["--hostname", box.hostname, "--die-with-parent"]
    argv += ["--new-session"] if box.new_session else []
    argv += ["--seccomp", str(box.seccomp_fd)] if box.seccomp_fd is not None else []
    argv += ["--sync-fd", str(box.lock_fd)] if box.lock_fd is not None else []  # only bwrap's monitor keeps it
    # The root is bound writable first so that mounts can go on it, and made read-only last:
    # --remount-ro does not reach the mounts below it.
    argv += ["--bind-fd", str(box.root_fd), "/", "--proc", box.proc, "--dev", box.dev, "--tmpfs", box.tmp]
    for bind in box.binds:
        if bind.fd is None:
            argv += [*(["--size", str(bind.size)] if bind.size else []), "--tmpfs", bind.target]
        else:
            argv += ["--ro-bind-fd" if bind.read_only else "--bind-fd", str(bind.fd), bind.target]
    for fd, target in box.data_files:
        argv += ["--ro-bind-data", str(fd), target]
    argv += [] if box.writable else ["--remount-ro", "/"]
    argv += ["--chdir", box.workdir, "--clearenv"]
    for key, value in box.env.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *box.command]


def inherited_fds(box: Plan) -> list[int]:
    fds = [box.root_fd, *(bind.fd for bind in box.binds), *(fd for fd, _ in box.data_files)]
    optional = [box.seccomp_fd, box.lock_fd, box.userns_fd]  # None: a tmpfs, no filter, no lock, no namespace
    return [fd for fd in [*fds, *optional] if fd is not None]
