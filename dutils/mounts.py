"""d-run's mount points and volumes: each made inside DIR, resolved as the container will see it, through
descriptors, and handed to bwrap free of links (bwrap makes its mount points by following links *before* it
pivots into the new root). Standard library and small dutils modules only: d-run's start-up imports this.
"""

import contextlib
import fcntl
import os
import stat
import sys
from collections.abc import Callable

from . import sandbox
from .errors import Error, printable
from .rootfs import DIR_FLAGS, MAX_LINKS, Place, Root, children, join, lstat_or_none, make_missing_dir, stop_absent
from .store import NotRegular, PullDir, open_regular, remove_entry

# ----- folders d-run resolves in -------------------------------------------------------------------


class Sealed(Root):
    """A folder whose links d-run refuses rather than follows: a volume or a host folder, which a container
    may have written (a link there would be resolved by bwrap on the host)."""

    def __init__(self, top: int, name: str, label: str) -> None:
        self.label = label
        super().__init__(top, name)

    def _link_target(self, fd: int, name: str, path: str) -> str:
        raise Error(f"{self.label}/{path} is a symbolic link", "d-run follows no link in a volume: remove it")


class Owned(Sealed):
    """DIR/volumes: every folder in it a real folder of the user's own, before it is bound."""

    def _enter(self, fd: int, name: str, path: str, st: os.stat_result) -> int:
        if st.st_uid != os.geteuid():
            shown = join(self.label, path)
            raise Error(f"{shown} is owned by uid {st.st_uid}, not by you", "remove it, or pull into a new folder")
        return super()._enter(fd, name, path, st)

    def open_volume(self, rootfs: Root, target: str, skipped: list[int]) -> int:
        """DIR/volumes/<target> as an O_PATH descriptor: a real folder of the user's own, made on first use as
        a copy of what the image holds at `target`, as Docker does (`skipped` counts what is not copied)."""
        with self._walk(target, make_folder) as place:  # parents made as by another d-run starting at once
            st = lstat_or_none(place.name, place.fd)
            if st is None:
                folder = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=place.fd)
                try:  # another d-run of DIR may be making it: the second waits and takes the first's
                    fcntl.flock(folder, fcntl.LOCK_EX)
                    if lstat_or_none(place.name, place.fd) is None:
                        make_volume(place, rootfs, target, skipped)
                finally:
                    os.close(folder)
                st = os.lstat(place.name, dir_fd=place.fd)
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
                raise Error(f"{self.label}/{place.path} is {kind}", "remove it: d-run makes it again")
            return self._enter(place.fd, place.name, place.path, st)  # checked as every folder on the way is


# ----- mount points ------------------------------------------------------------------------------------


# Another d-run of the same DIR starting at once may make a mount point first: EEXIST is then what we wanted.
def make_empty_file(fd: int, name: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mknod(name, stat.S_IFREG | 0o644, dir_fd=fd)


def make_folder(fd: int, name: str) -> None:
    with contextlib.suppress(FileExistsError):
        make_missing_dir(fd, name)


def make_mount_point(root: Root, path: str, make: Callable[[int, str], None]) -> str:
    """Make `path` below `root` exist, by `make` (make_folder or make_empty_file) when it does not yet,
    and return it resolved. A mount needs a folder to go on a folder, and a non-folder on a non-folder."""
    with root.resolve(path, make_folder) as place:
        st = lstat_or_none(place.name, place.fd)
        if st is None:
            make(place.fd, place.name)
            st = os.lstat(place.name, dir_fd=place.fd)
        if stat.S_ISDIR(st.st_mode) != (make is make_folder):
            kind = "a folder" if make is make_folder else "a file"
            raise Error(f"/{place.path} is not {kind}, and {kind} must be bound there", "remove it, or drop the mount")
        return place.path


def check_unswappable(root_fd: int, path: str) -> None:
    """Refuse the mount point `path` (below the rootfs `root_fd`, free of links) when another user could rename an
    entry on its way: bwrap looks it up again as it mounts, following links, as root in a root run. Asked only of a
    DIR others can enter, where a root pull's folders may be a host user's (the image's uid 1000), and /tmp anyone's:
    a folder on the way must be the user's or root's, and writable by no one else (or sticky, the entry in it theirs)."""
    names, mine = [name for name in path.split("/") if name], (os.geteuid(), 0)
    fd = os.dup(root_fd)
    try:
        for n, name in enumerate(names):
            folder, entry = os.fstat(fd), os.lstat(name, dir_fd=fd)
            problem = f"belongs to uid {folder.st_uid}" if folder.st_uid not in mine else ""
            if folder.st_mode & 0o022 and not (folder.st_mode & stat.S_ISVTX and entry.st_uid in mine):
                problem = problem or "is writable by other users"
            if problem:
                raise Error(
                    f"refusing the mount point {path}: /{'/'.join(names[:n])} {problem}, who could swap what is on"
                    " its way for a link while bwrap mounts it",
                    "make DIR private to you (chmod go-x DIR), or mount elsewhere",
                )
            if n < len(names) - 1:
                parent, fd = fd, os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(parent)
    finally:
        os.close(fd)


class MountTable:
    """What bwrap will have mounted when it comes to each destination, in its own order: the rootfs at /,
    then (target free of links, source descriptor or None for a tmpfs it makes, label for messages)."""

    def __init__(self, rootfs: Root, open_to_others: bool = False) -> None:
        self.rootfs, self.open_to_others = rootfs, open_to_others  # DIR: see check_unswappable
        self.mounts: list[tuple[str, int | None, str]] = []

    def covering(self, path: str) -> tuple[tuple[str, int | None, str] | None, str]:
        """The mount that `path` lies in (None: the rootfs, no mount) and the rest of `path` inside it."""
        found, rest = None, path
        for mount in self.mounts:
            target = mount[0]
            if (path == target or path.startswith(target + "/")) and (found is None or len(target) >= len(found[0])):
                found, rest = mount, path[len(target) :]
        return found, rest.lstrip("/")

    def place(self, target: str, make: Callable[[int, str], None], mounted: bool = True) -> str:
        """Make `target` exist (see make_mount_point), resolved as the container will see it, and return it free of
        links: a link in the rootfs that leads into a mount hands the rest over to what is mounted there. `mounted`:
        bwrap mounts there (not only changes into it, as into the working folder, once inside)."""
        path = target
        for _ in range(MAX_LINKS):
            mount, rest = self.covering(path)
            try:
                if mount is None:
                    resolved = "/" + make_mount_point(self.rootfs, rest, make)
                    if resolved == path or self.covering(resolved)[0] is None:
                        if mounted and self.open_to_others:
                            check_unswappable(self.rootfs.root, resolved)
                        return resolved
                    path = resolved
                    continue
                _, fd, label = mount
                if fd is None and rest and label in ("/proc", "/dev"):  # bwrap's own, links in them
                    raise Error(f"{target} leads into {label}, which d-run leaves as bwrap makes it", "remove the link")
                if fd is not None:
                    with Sealed(os.dup(fd), ".", label) as sealed:
                        make_mount_point(sealed, rest, make)
                return path
            except OSError as err:
                raise Error(f"cannot make the mount point {target}: {err.strerror} ({printable(rest)})") from None
        raise Error(f"cannot make the mount point {target}: too many symbolic links")

    def add(self, target: str, fd: int | None, label: str) -> None:
        self.mounts.append((target, fd, label))


# ----- anonymous volumes -------------------------------------------------------------------------------


def make_volume(place: Place, rootfs: Root, target: str, skipped: list[int]) -> None:
    """Fill a scratch folder beside `place`, then rename it into place: a volume is made whole or not at all."""
    partial = f".{place.name}.partial-{os.getpid()}"
    os.mkdir(partial, 0o755, dir_fd=place.fd)
    try:
        seed = find_folder(rootfs, target)
        if seed is not None:
            with seed, Root(os.dup(seed.fd), seed.name) as tree:
                if not seed.path:
                    raise Error(f"the volume {target} leads to the image's root folder", "remove it from Volumes")
                dest = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=place.fd)
                try:
                    skipped[0] += copy_tree(tree, dest)
                finally:
                    os.close(dest)
        os.rename(partial, place.name, src_dir_fd=place.fd, dst_dir_fd=place.fd)
    except BaseException:
        with contextlib.suppress(OSError):  # the first failure is the one to report
            remove_entry(place.fd, partial)
        raise


def find_folder(rootfs: Root, path: str) -> Place | None:
    """Where the image holds the folder `path` (links followed inside it), or None when it holds none."""
    try:
        place = rootfs.resolve(path, stop_absent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    st = lstat_or_none(place.name, place.fd)
    if st is None or not stat.S_ISDIR(st.st_mode):
        place.__exit__()
        return None
    return place


def copy_tree(source: Root, dest: int) -> int:
    """Copy the tree `source` into the empty folder `dest`, links as links; returns how many device nodes, FIFOs
    and sockets it skipped (never opened). No recursion: a deep tree costs a list, not the stack."""
    with source.find("") as place:
        st = os.lstat(place.name, dir_fd=place.fd)
    skipped, folders, todo = 0, [(".", st)], [""]  # "." below `dest`: `dest` itself
    last, src = None, -1  # the folder listed last, kept open: depth first, its child is most often next
    while todo:
        path = todo.pop()
        parent, _, base = path.rpartition("/")
        if parent == last:
            folder = os.open(base, DIR_FLAGS, dir_fd=src)
        else:
            place = source.find(path)
            if place is None:
                continue  # gone since it was listed
            with place:
                folder = os.open(place.name, DIR_FLAGS, dir_fd=place.fd)
        if src >= 0:
            os.close(src)
        last, src = path, folder
        for name in children(src):
            st = os.lstat(name, dir_fd=src)
            copied = join(path, name)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(copied, 0o700, dir_fd=dest)  # filled first, its own mode set last
                folders.append((copied, st))
                todo.append(copied)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=src), copied, dir_fd=dest)
                os.utime(copied, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dest, follow_symlinks=False)
            elif not stat.S_ISREG(st.st_mode) or not copy_file(src, name, dest, copied):
                skipped += 1
    if src >= 0:
        os.close(src)
    for copied, st in reversed(folders):  # children before their parents
        os.chmod(copied, stat.S_IMODE(st.st_mode), dir_fd=dest)
        os.utime(copied, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dest)
    return skipped


def copy_file(src: int, name: str, dest: int, copied: str) -> bool:
    """Copy the regular file `name` of `src` to `copied` below `dest`; False when it is no regular file."""
    try:
        fd_in = open_regular(name, os.O_RDONLY, dir_fd=src)
    except NotRegular:
        return False  # swapped since it was listed
    try:
        st = os.fstat(fd_in)
        fd_out = open_regular(copied, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dest)
        try:
            while os.sendfile(fd_out, fd_in, None, 1 << 30):
                pass
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return True


# ----- descriptors bwrap inherits ----------------------------------------------------------------------


def inheritable(fd: int) -> int:
    os.set_inheritable(fd, True)
    return fd


def open_source(mount: sandbox.Mount) -> int:
    """The host path of a -v, opened once (bwrap binds the descriptor, never the path again)."""
    try:
        return inheritable(os.open(mount.source, os.O_PATH | os.O_CLOEXEC))
    except FileNotFoundError:
        source = os.path.abspath(mount.source)
        raise Error(
            f"volume {mount.source}:{mount.target}: {source} does not exist", "create it, or fix the -v option"
        ) from None
    except OSError as err:
        raise Error(f"volume {mount.source}:{mount.target}: {err.strerror}") from None


def open_volumes(dir_fd: int, label: str, target: str) -> Owned:
    """DIR/volumes, made when missing (for the anonymous volume `target`); a link or another user's folder there is
    refused. In a folder of others (root's, opened to all) nothing is written: one line says what to do instead."""
    try:
        os.mkdir("volumes", 0o755, dir_fd=dir_fd)
    except FileExistsError:  # made before, or by another d-run of DIR starting at once
        pass
    except PermissionError:
        raise Error(
            f"anonymous volume {target}: {label} cannot be made, the folder is not yours",
            f"bind a folder of yours there (-v HOST:{target}), or pull into a folder of your own",
        ) from None
    try:
        return Owned(os.dup(dir_fd), "volumes", label)
    except NotADirectoryError:
        raise Error(f"{label} is not a folder (a symbolic link?)", "remove it: d-run makes it again") from None


def open_sources(pull: PullDir, dir_fd: int, rootfs: Root, mounts: list[sandbox.Mount]) -> list[int | None]:
    """Each mount's source as a descriptor bwrap inherits (None for a tmpfs), anonymous volumes made first (in
    mount order, so a volume's folder holds the folders of the volumes below it)."""
    sources, skipped = [], [0]
    anonymous = [mount.target for mount in mounts if not mount.source and mount.tmpfs is None]
    with open_volumes(dir_fd, str(pull.volumes), anonymous[0]) if anonymous else contextlib.nullcontext() as volumes:
        for mount in mounts:
            if mount.source or mount.tmpfs is not None:
                sources.append(open_source(mount) if mount.source else None)
                continue
            try:
                sources.append(inheritable(volumes.open_volume(rootfs, mount.target, skipped)))
            except OSError as err:
                raise Error(f"anonymous volume {mount.target}: cannot make it in {pull.volumes}: {err}") from None
    if skipped[0]:
        print(
            f"d-run: warning: {skipped[0]} device nodes, FIFOs or sockets of the image not copied into new volumes",
            file=sys.stderr,
        )
    return sources
