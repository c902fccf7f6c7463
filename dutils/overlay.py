"""Writes to a shared folder (share.py) go to an overlay, so that none reaches the store or another folder.

DIR/.d-pull/overlay/upper holds a `d-run --rw` run's changes over DIR/rootfs (the image as pulled, the lower folder,
holding its own links: pruning the store's tree leaves it whole); work/ is the kernel's. Inside DIR, as the changes
are the folder's; beside rootfs, not in it (the kernel refuses layers inside one another, and wants upper and work on
one filesystem); under .d-pull, where no host edit of DIR/rootfs meets overlayfs's whiteouts. The upper is in the
`userxattr` format (whiteouts and opaque folders marked in user.* attributes) whoever mounts it: a folder works the
same for root and for a user.

d-run mounts the overlay on DIR/rootfs in a mount namespace of its own process before it execs bwrap (bwrap 0.8 has
no --overlay), and bwrap, which binds DIR/rootfs by the path of d-run's descriptor, gets the merged tree. Root makes
that namespace outright; a user with a subordinate range joins a user namespace newuidmap maps (the user its root,
the range the rest) and bwrap gets one nested in it, mapping the image's ids as d-run always does (inner_maps); a user
without a range makes one mapping only themselves, in which bwrap makes its own. While the upper holds changes every
run mounts it, a read-only run read-only (both folders lower ones, so that such runs share it); where the kernel
refuses the overlay, a --rw run of a folder without changes first makes it private (share.make_private).
"""

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path

from . import userns
from .errors import Error, printable
from .locks import hold_folder, locked
from .store import OVERLAY, PullDir, libc, read_setting, remove_entry, remove_tree

CLONE_NEWNS, MS_RDONLY, MS_REC, MS_SLAVE, MNT_DETACH = 0x20000, 1, 0x4000, 0x80000, 2
FOLDER = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def holds_changes(folder: PullDir) -> bool:
    try:
        with os.scandir(folder.state / OVERLAY / "upper") as entries:
            return next(entries, None) is not None
    except (FileNotFoundError, NotADirectoryError):
        return False


def enter_namespace() -> list | None:
    """Make this process a mount namespace of its own where it may mount, mounts from the host's still reaching it and
    none of its own leaving. The maps of the user namespace joined for it (a user with a range), else None."""
    outer = None if os.geteuid() == 0 else userns.plan_maps(0, 0, read_setting)  # the user root inside, the range 1...
    if outer is not None:
        joined = userns.make(outer)[0]
        try:
            userns.join(joined, userns.CLONE_NEWUSER)
        finally:
            os.close(joined)
    elif os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
        libc("unshare", userns.CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as setting:
                setting.write(text)
    libc("unshare", CLONE_NEWNS)
    libc("mount", None, b"/", None, MS_REC | MS_SLAVE, None)
    return outer


def inner_maps(outer: list, uid: int, gid: int, read: Callable[[str], str]) -> tuple[list, list[int], list[int]]:
    """userns.plan_maps inside the namespace of `outer` (where the user is 0 and the range 1...): bwrap's nested one,
    written by d-run itself, maps the image's ids to the host's as plan_maps does outside."""
    return [], userns.keep_id(uid, 0, 1, outer[1][-1]), userns.keep_id(gid, 0, 1, outer[2][-1])


def folder_in(dir_fd: int, name: str) -> int:
    """An O_PATH descriptor of the folder `name` in `dir_fd`, never reached through a link; made when missing, 0711
    (as DIR/rootfs, the upper is others' to read where DIR is: a folder opened to them runs with its changes)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o711, dir_fd=dir_fd)
    return os.open(name, FOLDER, dir_fd=dir_fd)


def pin(folder: PullDir, dir_fd: int) -> tuple[int, int, int, int, int]:
    """Descriptors of DIR (opened again in this namespace, for mounts to go on its mounts; checked to be the folder
    `dir_fd` holds), DIR/rootfs, and the overlay, upper and work folders: mount is given /proc/self/fd/N paths, so
    that another process swapping in a link redirects nothing."""
    root = os.open(folder.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if not os.path.samestat(os.fstat(root), os.fstat(dir_fd)):
        raise Error(f"{printable(str(folder.root))} was replaced meanwhile", "try again")
    try:
        state = folder_in(root, folder.state.name)
        overlay = folder_in(state, OVERLAY)
        lower = os.open("rootfs", FOLDER, dir_fd=root)
        pinned = root, lower, overlay, folder_in(overlay, "upper"), folder_in(overlay, "work")
    except OSError as err:
        where = printable(str(folder.state / OVERLAY))
        raise Error(f"cannot use {where}: {err.strerror} (a symbolic link?)", f"remove it: rm -r {where}") from None
    os.close(state)
    return pinned


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def mount_overlay(target: int, layers: str, flags: int = 0) -> None:
    libc("mount", b"overlay", fd_path(target).encode(), b"overlay", flags, f"{layers},userxattr".encode())


def writable_layers(lower: int, upper: int, work: int) -> str:
    """A --rw run's layers. `volatile`: unmounting (as the run's last process ends, before DIR's lock is let go) syncs
    nothing, lest the next run find DIR in use while the whole filesystem is synced; a crash may lose a run's unsynced
    writes, as it may in a private DIR/rootfs. Its mark, work/work/incompat/volatile, would stop the next mount: the
    work folder is the kernel's, emptied here (under the lock a --rw run holds)."""
    remove_entry(work, "work")
    return f"lowerdir={fd_path(lower)},upperdir={fd_path(upper)},workdir={fd_path(work)},volatile"


def read_only_layers(lower: int, overlay: int, upper: int, work: int) -> str:
    """A read-only run's layers: the upper a lower folder too (read-only runs share it), under an upper of the run's own
    on a tmpfs mounted on the work folder, where d-run makes mount points the --rw runs did not (bwrap then makes the
    root read-only)."""
    libc("mount", b"tmpfs", fd_path(work).encode(), b"tmpfs", 0, b"mode=0711")
    scratch = os.open("work", FOLDER, dir_fd=overlay)  # the tmpfs
    top, scratch_work = folder_in(scratch, "u"), folder_in(scratch, "w")
    os.chmod(fd_path(top), stat.S_IMODE(os.fstat(upper).st_mode))  # the merged root is the top upper's
    lowers = f"{fd_path(upper)}:{fd_path(lower)}"
    return f"lowerdir={lowers},upperdir={fd_path(top)},workdir={fd_path(scratch_work)},volatile"


def prepare(folder: PullDir, dir_fd: int, writable: bool) -> tuple[int, Callable]:
    """Before d-run plans a run of the shared `folder` (holding its lock): the overlay mounted on DIR/rootfs when the
    run writes or the upper holds changes. DIR's descriptor to plan through, and how to map the image's ids."""
    if not writable and not holds_changes(folder):
        return dir_fd, userns.plan_maps
    outer = None
    try:
        outer = enter_namespace()
        root, lower, overlay, upper, work = pin(folder, dir_fd)
        if not holds_changes(folder):  # the merged root is the upper's: the image's mode
            os.chmod(fd_path(upper), stat.S_IMODE(os.fstat(lower).st_mode))
        layers = writable_layers(lower, upper, work) if writable else read_only_layers(lower, overlay, upper, work)
        mount_overlay(lower, layers)
    except OSError as err:
        if holds_changes(folder):
            raise Error(
                f"cannot mount the overlay holding the changes of {printable(str(folder.root))}: {err.strerror}",
                "run it where the kernel allows overlay mounts (user namespaces); d-pull --unshare needs one too",
            ) from None
        from .share import make_private  # (its upper, empty, stays: the folder, private now, no longer uses it)

        make_private(folder, "d-run", f"the kernel refuses an overlay here ({err.strerror}): ")
        return dir_fd, userns.plan_maps if outer is None else partial(inner_maps, outer)
    for fd in (dir_fd, lower, overlay, upper, work):
        os.close(fd)
    return root, userns.plan_maps if outer is None else partial(inner_maps, outer)


def unshare(root: str) -> None:
    """d-pull --unshare DIR: make a shared folder private, with the changes its overlay holds (a copy of the merged
    tree, mounted on the work folder), while no pull and no container uses it."""
    from .share import is_shared, make_private

    folder = PullDir(root)
    folder.require_complete()
    with locked(folder.state / "lock", f"another d-pull is writing {printable(str(folder.root))}"):
        if not is_shared(folder):  # asked under the lock: another --unshare may have just made it private
            raise Error(f"{printable(str(folder.root))} shares no files with other folders", "it is private already")
        held = hold_folder(folder.root, fcntl.LOCK_EX, f"{printable(str(folder.root))} is in use by a container")
        try:
            if holds_changes(folder):
                merged = mount_merged(folder, held)
                make_private(folder, "d-pull", "with the changes of its --rw runs: ", merged)
                libc("umount2", bytes(merged), MNT_DETACH)
            else:
                make_private(folder, "d-pull")
            remove_tree(folder.state / OVERLAY)
        finally:
            os.close(held)


def mount_merged(folder: PullDir, dir_fd: int) -> Path:
    """The merged tree, mounted read-only on the work folder in a namespace of d-pull's own: its path."""
    try:
        enter_namespace()
        _, lower, _, upper, work = pin(folder, dir_fd)
        mount_overlay(work, f"lowerdir={fd_path(upper)}:{fd_path(lower)}", MS_RDONLY)
    except OSError as err:
        raise Error(f"cannot mount the overlay of {printable(str(folder.root))}: {err.strerror}") from None
    return folder.state / OVERLAY / "work"
