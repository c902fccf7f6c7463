"""The user namespace d-run makes for bwrap's `--userns`, so that an image's users are real.

As root: every id mapped to itself, so the image's owners are the container's (a `USER 1000` writes its
/home/app, not root's /etc), as under podman. A namespace rather than podman's rootful "none, with fewer
capabilities": root inside is capable only over what the namespace owns, and bwrap runs as for a user.
d-run becomes the image's user (groups and gid first) before the exec, so that bwrap switches ids no more (its
--userns sets the uid before the gid, then lacks the capability). For a uid other than 0 bwrap then joins a
namespace of that uid, nested in one of root's (see become): no host process of the uid can join either.
As a user with a range in /etc/subuid and /etc/subgid: the user's own ids are the image user's (root's, for
most services) and the range everyone else's, written by newuidmap/newgidmap (podman's rootless mapping).
Files the user pulled are the user's, so inside they are the image user's: a service dropping to its user
reads what the image made readable to others. Otherwise (no range): no mapping; the seccomp filter fakes the
set*id calls. With -p and a mapping, d-run makes the network namespace (a user's with its user namespace, root's in
one of nobody's: see namespaces), and bwrap's user namespace nested (see become).
"""

import errno
import os
from collections.abc import Callable

from .errors import Error
from .ports import HOST_ROOT, NOBODY, find_program, start_pasta
from .sandbox import Plan, find_row, is_number, table_rows
from .store import close_all_but, libc

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
EVERY_ID = [0, 0, 2**32 - 1]  # (uid_t) -1 stays unmapped
PR_SET_DUMPABLE = 4  # linux/prctl.h


def subordinate_range(text: str, name: str, own: int) -> tuple[int, int] | None:
    """The first non-empty `start:count` of /etc/subuid or /etc/subgid for the user `name` (or number `own`)."""
    for line in text.splitlines():
        fields = line.split(":")
        numbers = fields[1:] if len(fields) == 3 and fields[0] in (name, str(own)) else []
        if numbers and all(map(is_number, numbers)) and int(numbers[1]) > 0:
            return int(numbers[0]), int(numbers[1])
    return None


def keep_id(inside: int, own: int, start: int, count: int) -> list[int]:
    """(inside, outside, count) triples: `inside` is `own`, and the range fills 0... around it."""
    below = min(inside, count)  # how many of the range go below `inside`; the rest go above it
    rest = [0, start, below] * (below > 0) + [inside + 1, start + below, count - below] * (count > below)
    return [inside, own, 1, *rest]


def plan_maps(uid: int, gid: int, read: Callable[[str], str]) -> tuple[list[str], list[int], list[int]] | None:
    """How to map for the image's `uid` and `gid`: the tools to write the maps ([]: root writes them itself),
    the uid and gid maps as (inside, outside, count) triples; None for no mapping. `read`: a file's text or ""."""
    euid = os.geteuid()
    if euid == 0:
        return [], EVERY_ID, EVERY_ID
    import pwd  # a builtin module

    try:
        name = pwd.getpwuid(euid).pw_name
    except KeyError:
        return None
    ranges = [subordinate_range(read(f"/etc/{table}"), name, euid) for table in ("subuid", "subgid")]
    if None in ranges:
        return None
    tools = [find_program("newuidmap"), find_program("newgidmap")]
    if None in tools:
        return None
    return tools, keep_id(uid, euid, *ranges[0]), keep_id(gid, os.getegid(), *ranges[1])


def write_maps(pid: int, tools: list[str], uid_map: list[int], gid_map: list[int]) -> bool:
    """The maps of `pid`'s namespace, by root's own writes or by newuidmap/newgidmap; True when written."""
    if not tools:
        for name, triples in (("uid_map", uid_map), ("gid_map", gid_map)):
            with open(f"/proc/{pid}/{name}", "w") as handle:  # one line a triple, in one write
                handle.write("".join(f"{a} {b} {c}\n" for a, b, c in zip(*[iter(triples)] * 3, strict=True)))
        return True
    # Both at once (each writes its own file): d-run waits for one exec of a set-id program, not two in a row.
    tasks = [
        os.posix_spawn(tool, [tool, str(pid), *map(str, triples)], os.environ)
        for tool, triples in zip(tools, (uid_map, gid_map), strict=True)
    ]
    return not any([os.waitpid(child, 0)[1] for child in tasks])  # (a list: both reaped, whatever the first did)


def make(
    maps: tuple[list[str], list[int], list[int]],
    owner: int | None = None,
    network: bool = False,
    dumpable: bool = False,
) -> list[int]:
    """A user namespace with `maps`, of d-run's user or the uid `owner`, for bwrap's --userns, then (`network`) a
    network namespace it owns, for pasta: a child unshares, waits until the maps are written, and exits. `dumpable`:
    made from a namespace of d-run's own, where d-run is capable over none of the owner's processes."""
    import _ctypes  # noqa: F401 (libc's, loaded here: the child would load it while d-run waits)

    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    child = os.fork()
    if child == 0:  # in the child: only system calls, then _exit
        status = 1
        try:
            close_all_but(ready_write, done_read)  # d-run's own: the owner's other processes may reach this one's
            try:
                if owner is not None:
                    os.setresuid(owner, owner, owner)
                if dumpable:  # so that d-run, capable in the parent namespace only, opens it
                    libc("prctl", PR_SET_DUMPABLE, 1)
                libc("unshare", CLONE_NEWUSER | CLONE_NEWNET * network)
                status = 0
            except OSError as err:
                status = err.errno
            os.write(ready_write, bytes([status]))
            os.read(done_read, 1)
        finally:
            os._exit(status)
    os.close(ready_write)
    os.close(done_read)
    try:
        status = os.read(ready_read, 1)
        if status != b"\0":
            raise Error(f"cannot make a user namespace: {os.strerror(status[0] if status else errno.EPERM)}")
        if not write_maps(child, *maps):
            raise Error("newuidmap or newgidmap failed", "check your ranges in /etc/subuid and /etc/subgid")
        fds = [os.open(f"/proc/{child}/ns/{kind}", os.O_RDONLY) for kind in ["user", "net"][: 1 + network]]
        os.set_inheritable(fds[0], True)  # for bwrap (pasta gets the network one through pass_fds)
        return fds
    finally:
        os.close(ready_read)
        os.close(done_write)
        os.waitpid(child, 0)


def namespaces(maps: tuple[list[str], list[int], list[int]], network: bool) -> list[int | None]:
    """bwrap's user namespace and (`network`) -p's network namespace. Under root, the network namespace is owned by
    one of nobody's that maps only nobody, as pasta, who serves it, runs: a flaw of pasta's never holds the namespace
    of root's that maps every id (its capabilities there would be over every host file)."""
    if network and HOST_ROOT:
        pastas, netns = make(([], [0, NOBODY, 1], [0, NOBODY, 1]), NOBODY, network=True)
        os.close(pastas)  # pasta finds it from the network namespace (ports.start_pasta)
        return [make(maps)[0], netns]
    return [*make(maps, network=network), None][:2]


def join(fd: int, kind: int) -> None:
    libc("setns", fd, kind)


def join_network(fd: int) -> None:
    join(fd, CLONE_NEWNET)  # (its descriptor, as pasta's pipe, closed by the exec)
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as setting:
        setting.write("0")  # as Docker: root inside is not capable over the network namespace


def same_ids(table: str) -> list[int]:  # every id of d-run's namespace mapped to itself (uid_map or gid_map)
    with open(f"/proc/self/{table}") as lines:
        return [int(number) for line in lines for number in (line.split()[0], *line.split()[::2])]


def become(box: Plan) -> None:
    """Before the exec. Root takes the image's groups, gid and uid: bwrap 0.8 would set the uid first, then lack
    the capability for the gid. Where bwrap's namespace must then be another uid's, or d-run be in -p's network
    namespace (bwrap joins none), d-run starts pasta, joins its namespaces and makes bwrap's there, the same ids
    mapped, in its place. Host processes of the image's uid get no capability in it: its parent is not theirs."""
    (uid, gid), groups, userns_fd, netns_fd = box.identity[:2], list(box.groups), box.userns_fd, box.netns_fd
    try:
        early = netns_fd is not None and HOST_ROOT  # root's is nobody's (see namespaces), joined from here
        if netns_fd is not None:  # with d-run's ids: a change of pasta's own would clear its death signal
            start_pasta(box.ports, netns_fd)
        if early:
            join_network(netns_fd)
        if groups:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
        if netns_fd is not None or groups and uid != 0:
            join(userns_fd, CLONE_NEWUSER)
            if netns_fd is not None and not early:  # a user's, owned by the namespace just joined
                join_network(netns_fd)
            inner = make(([], same_ids("uid_map"), same_ids("gid_map")), uid, dumpable=True)[0]
            os.dup2(inner, userns_fd)
            os.close(inner)
        if groups:
            os.setresuid(uid, uid, uid)
    except OSError as err:  # more groups than the kernel takes (the image's /etc/group), an id it refuses
        raise Error(f"cannot become the image's user {uid}:{gid}: {err.strerror}", "run it with -u") from None


def image_groups(uid: int, gid: int, passwd: str, group: str) -> list[int]:
    """The primary group `gid`, then those the image's /etc/group lists the user `uid` in (by name)."""
    entry = find_row(table_rows(passwd, 7, (2, 3)), str(uid))
    rows = table_rows(group, 4, (2,)) if entry else []
    listed = [int(row[2]) for row in rows if entry[0] in row[3].split(",")]
    return [gid, *(number for number in listed if number != gid and number < 2**32 - 1)]
