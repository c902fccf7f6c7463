"""The user namespace d-run makes for itself before it execs bwrap, so that an image's users are real.

- Under root, an identity mapping of every id: the image's owners are the container's, a `USER 1000` writes
  its own /home/app and not root's /etc, as under podman. A user namespace rather than podman's rootful
  "no namespace, bounded capabilities": root inside holds its capabilities only over what the namespace
  owns (no module loading, no device nodes, no host mounts), and bwrap runs the same way as for a user.
- Under an ordinary user with a range in /etc/subuid and /etc/subgid (and Debian's `uidmap`), the user's own
  ids are root's inside and the range everyone else's, written by newuidmap/newgidmap, as podman rootless
  does. Files the user pulled are the user's, so inside they are root's: services that drop to their user
  read them where the image made them readable to others, and what they write (a chown in the container
  is faked) stays the user's on the host.
- Elsewhere (no range, no newuidmap, `-p`, whose pasta makes its own namespace) there is no mapping, and
  the seccomp filter makes setuid, setgid and setgroups succeed without effect.

d-run unshares itself (CLONE_NEWUSER, through ctypes: Python 3.11 has no os.unshare) while a child forked
before writes the maps, then takes the image's groups, gid and uid, and execs bwrap inside the namespace.
"""

import errno
import os

from .sandbox import find_row, is_number, table_rows

CLONE_NEWUSER = 0x10000000
EVERY_ID = "0 0 4294967295\n"  # (uid_t) -1 stays unmapped


def subordinate_range(text: str, name: str, own: int) -> tuple[int, int] | None:
    """The first `start:count` of /etc/subuid or /etc/subgid for the user `name` (or its number `own`)."""
    for line in text.splitlines():
        fields = line.split(":")
        numbers = fields[1:] if len(fields) == 3 and fields[0] in (name, str(own)) else []
        if all(map(is_number, numbers)) and numbers and int(numbers[1]) > 0:
            return int(numbers[0]), int(numbers[1])
    return None


def read_text(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def find_program(name: str) -> str | None:
    directories = os.environ.get("PATH", os.defpath).split(":")
    return next((f"{d}/{name}" for d in directories if d and os.access(f"{d}/{name}", os.X_OK)), None)


def helper_commands(euid: int) -> list[list[str]] | None:
    """The newuidmap and newgidmap calls (without the pid) mapping 0 to the user and 1... to their ranges, or
    None when the user has no range or no newuidmap."""
    import pwd  # a builtin module: cheap

    try:
        name = pwd.getpwuid(euid).pw_name
    except KeyError:
        return None
    commands = []
    for tool, own, table in (("newuidmap", euid, "/etc/subuid"), ("newgidmap", os.getegid(), "/etc/subgid")):
        program, found = find_program(tool), subordinate_range(read_text(table), name, euid)
        if program is None or found is None:
            return None
        commands.append([program, "0", str(own), "1", "1", str(found[0]), str(found[1])])
    return commands


def plan_mapping(publishing: bool) -> list[list[str]] | None:
    """What maps the ids: [] for root's identity mapping, the newuidmap/newgidmap calls for a user with a
    range, None for no mapping (faked id calls)."""
    if publishing:
        return None
    return [] if os.geteuid() == 0 else helper_commands(os.geteuid())


def write_maps(pid: int, commands: list[list[str]]) -> bool:
    """In the helper child: the maps of `pid`, by root's own writes or by newuidmap/newgidmap; True when done."""
    if not commands:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as handle:
                handle.write(EVERY_ID)
        return True
    for argv in commands:
        child = os.posix_spawn(argv[0], [argv[0], str(pid), *argv[1:]], os.environ)
        if os.waitpid(child, 0)[1] != 0:
            return False
    return True


def enter(commands: list[list[str]]) -> None:
    """Move this (single-threaded) process into a new user namespace with the ids mapped; an OSError if not."""
    import ctypes

    parent = os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the helper: waits until the parent has unshared, maps it, and reports by its status
        status = 1
        try:
            os.close(write_end)
            if os.read(read_end, 1) == b"u" and write_maps(parent, commands):
                status = 0
        finally:
            os._exit(status)
    os.close(read_end)
    unshared = ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) == 0
    error = ctypes.get_errno()
    os.write(write_end, b"u" if unshared else b"x")
    os.close(write_end)
    mapped = os.waitpid(child, 0)[1] == 0
    if not unshared:
        raise OSError(error, f"cannot make a user namespace: {os.strerror(error)}")
    if not mapped:
        raise OSError(errno.EPERM, "could not map the user namespace's ids (newuidmap or newgidmap failed)")


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Take the image's groups and gid, and its uid unless root (whose capabilities bwrap needs)."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    if uid != 0:
        os.setresuid(uid, uid, uid)


def image_groups(uid: int, gid: int, passwd: str, group: str) -> list[int]:
    """The primary group `gid`, then those the image's /etc/group lists the user `uid` in (by name)."""
    entry = find_row(table_rows(passwd, 7, (2, 3)), str(uid))
    rows = table_rows(group, 4, (2,)) if entry else []
    listed = [int(row[2]) for row in rows if entry[0] in row[3].split(",")]
    return [gid, *(number for number in listed if number != gid and number < 2**32 - 1)]
