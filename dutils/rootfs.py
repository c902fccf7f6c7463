"""The rootfs as a tree that a layer changes safely: resolve in root, clobber, put directories back.

Every path a layer names is resolved from the root down, one component at a time, through directory fds
opened with O_NOFOLLOW: a symlink met on the way is re-rooted at the rootfs (as filepath-securejoin does) and
`..` stops at the root, so no member reaches outside. The last component is never followed: it is lstat-ed,
replaced or created relative to its parent's fd.

Each directory the layer enters is recorded (mode and times, before any change) and put back when the layer
is finished: adding children then leaves lower directories' mtimes alone, and an ordinary user may give
read-only directories owner rwx while writing into them. The records go to a journal beside the rootfs (on
disk, not in memory) before the change they cover, so an application killed half-way and run again puts back
exactly what the first run found.
"""

import array
import bisect
import errno
import heapq
import os
import stat
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .store import current_umask, remove_entry
from .store import swap_fd as swap

WHITEOUT = ".wh."
MAX_LINKS = 40  # symlinks followed while resolving one name, as the kernel's limit
OWNER_RWX = 0o700
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def clean(name: str) -> str:
    """A member name as a path below the root: `..` clamped at the root, `.` and leading `/` dropped."""
    if name[:1] not in ("", "/", ".") and "/." not in name and "//" not in name and not name.endswith("/"):
        return name  # nothing to normalise (most names): normpath costs every entry of a layer twice this check
    return os.path.normpath("/" + name).lstrip("/")


def lstat_or_none(name: str, fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None


class Place:
    """Where an entry goes: `name` in the open directory `fd`; `path` is its resolved path below the root."""

    def __init__(self, fd: int, name: str, path: str) -> None:
        self.fd, self.name, self.path = fd, name, path

    def __enter__(self) -> "Place":
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def make_missing_dir(fd: int, name: str) -> None:
    os.mkdir(name, 0o755, dir_fd=fd)
    os.chmod(name, 0o755, dir_fd=fd, follow_symlinks=False)  # whatever the umask


def stop_absent(fd: int, name: str) -> None:
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


class Root:
    """Names resolved inside the directory `name` of the open directory `top` (both closed on exit).

    Symbolic links met on the way are handed to `_link_target` (re-rooted by default) and every directory
    entered to `_enter`: subclasses add their policy there (a layer's journal, refusing links, owners).
    """

    def __init__(self, top: int, name: str) -> None:
        self.top, self.root_name = top, name
        self.last: tuple[list[str], int, str] | None = None  # the last parent resolved: names, fd, path
        st = os.lstat(name, dir_fd=top)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
        self.root = self._enter(top, name, "", st)

    def __enter__(self) -> "Root":
        return self

    def __exit__(self, *_: object) -> None:
        self.forget()
        os.close(self.root)
        os.close(self.top)

    def _enter(self, fd: int, name: str, path: str, st: os.stat_result) -> int:
        """Open directory `name` (at `path` below the root, `st` its lstat) to resolve names in it."""
        return os.open(name, DIR_FLAGS, dir_fd=fd)

    def _link_target(self, fd: int, name: str, path: str) -> str:
        """The target of the symbolic link `name` met at `path`: followed inside the root."""
        return os.readlink(name, dir_fd=fd)

    def _walk(self, name: str, on_absent: Callable[[int, str], None]) -> Place:
        """Open the parent of `name` inside the root, resolving symlinks there; the last part is not followed."""
        path = clean(name)
        if not path:
            return Place(os.dup(self.top), self.root_name, "")
        *dirs, base = path.split("/")
        if self.last and self.last[0] == dirs:  # the common case: the same parent as the previous entry
            return Place(os.dup(self.last[1]), base, join(self.last[2], base))
        todo, done, links = deque(dirs), [], 0
        fd = os.dup(self.root)
        try:
            while todo:
                part = todo.popleft()
                if part in ("", "."):
                    continue
                if part == "..":
                    done[-1:] = []
                    fd = swap(fd, self._open_dirs(done))
                    continue
                st = lstat_or_none(part, fd)
                if st is None:
                    on_absent(fd, part)
                    st = os.lstat(part, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), join("/".join(done), part))
                    target = self._link_target(fd, part, join("/".join(done), part))
                    if target.startswith("/"):
                        done = []
                        fd = swap(fd, self._open_dirs(done))
                    todo.extendleft(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), join("/".join(done), part))
                done.append(part)
                fd = swap(fd, self._enter(fd, part, "/".join(done), st))
        except BaseException:
            os.close(fd)
            raise
        self.forget()
        self.last = (dirs, os.dup(fd), "/".join(done))
        return Place(fd, base, join("/".join(done), base))

    def forget(self) -> None:
        """Drop the remembered parent: a directory or symlink went away, names may resolve differently."""
        if self.last:
            os.close(self.last[1])
            self.last = None

    def _open_dirs(self, parts: list[str]) -> int:
        """Open the already resolved directory `parts` afresh from the root."""
        fd = os.dup(self.root)
        try:
            for part in parts:
                fd = swap(fd, os.open(part, DIR_FLAGS, dir_fd=fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, name: str) -> Place:
        """Where entry `name` goes, its missing parent directories made."""
        return self._walk(name, make_missing_dir)

    def find(self, name: str) -> Place | None:
        """Where entry `name` is, or None when one of its parents is missing; nothing is made."""
        try:
            return self._walk(name, stop_absent)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def resolve(self, name: str, on_absent: Callable[[int, str], None]) -> Place:
        """Where `name` leads, its last component followed too when it is a symlink (as open(2) follows it)."""
        for _ in range(MAX_LINKS):
            place = self._walk(name, on_absent)
            st = lstat_or_none(place.name, place.fd)
            if st is None or not stat.S_ISLNK(st.st_mode):
                return place
            with place:
                target = self._link_target(place.fd, place.name, place.path)
            name = target if target.startswith("/") else join(place.path.rpartition("/")[0], target)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)


class Tree(Root):
    """One layer's changes to `rootfs`; `finish()` puts directory modes and times back."""

    def __init__(self, rootfs: Path, layer: str) -> None:
        self.rootless = os.geteuid() != 0  # decided once: an ordinary user cannot chown or mknod
        self.umask = current_umask()  # the bits that creating a file with its mode does not give it
        self.kept = Hashes()  # paths this layer wrote, and their ancestors: whiteouts spare them
        rootfs.mkdir(parents=True, exist_ok=True)
        root_stat = rootfs.lstat()
        header = (layer, root_stat.st_dev, root_stat.st_ino)
        from .journal import Journal  # sqlite3 costs d-run's start-up 12 ms: loaded only to apply layers

        self.journal = Journal(rootfs.parent / f".{rootfs.name}.d-utils-journal", header)
        top = os.open(rootfs.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        super().__init__(top, rootfs.name)

    def __exit__(self, *_: object) -> None:
        super().__exit__()
        self.journal.close()

    def _enter(self, fd: int, name: str, path: str, st: os.stat_result) -> int:
        """Open directory `name` for use, saving its metadata first and giving an ordinary user rwx on it."""
        self.journal.save_first(path, stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns)
        if self.rootless and st.st_mode & OWNER_RWX != OWNER_RWX:
            os.chmod(name, stat.S_IMODE(st.st_mode) | OWNER_RWX, dir_fd=fd, follow_symlinks=False)
        return os.open(name, DIR_FLAGS, dir_fd=fd)

    def parent(self, name: str) -> Place:
        """Where entry `name` goes, its missing parent directories made."""
        place = super().parent(name)
        self.keep(place.path)
        return place

    def keep(self, path: str) -> None:
        """Mark `path` and its ancestors as written by this layer (up to the first ancestor already marked)."""
        kept = self.kept
        while path and hash(path) not in kept:
            kept.add(hash(path))
            path = path.rpartition("/")[0]

    def is_kept(self, path: str) -> bool:
        return hash(path) in self.kept

    def clear(self, place: Place) -> None:
        """Remove whatever is at `place`: a file, a link, or a directory with everything in it."""
        st = lstat_or_none(place.name, place.fd)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            self.forget()
        if stat.S_ISDIR(st.st_mode):
            remove_entry(place.fd, place.name)
        else:
            os.unlink(place.name, dir_fd=place.fd)

    def hide(self, place: Place) -> None:
        """A whiteout: remove what lower layers have at `place`, sparing what this layer wrote."""
        if not self.is_kept(place.path):
            self.clear(place)
            return
        st = lstat_or_none(place.name, place.fd)
        if st is not None and stat.S_ISDIR(st.st_mode):
            with Place(self._enter(place.fd, place.name, place.path, st), "", place.path) as inside:
                self.hide_children(inside.fd, inside.path)

    def hide_children(self, fd: int, path: str) -> None:
        """An opaque whiteout: hide every lower-layer entry below the open directory `fd` at `path`. Iterative,
        one directory open at a time (back up through ".."), so no depth is too deep."""
        fd = os.dup(fd)
        todo = [children(fd)]
        try:
            while todo:
                if not todo[-1]:
                    todo.pop()
                    if todo:
                        fd, path = swap(fd, os.open("..", DIR_FLAGS, dir_fd=fd)), path.rpartition("/")[0]
                    continue
                name = todo[-1].pop()
                child = join(path, name)
                if not self.is_kept(child):
                    self.clear(Place(fd, name, child))
                    continue
                st = lstat_or_none(name, fd)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    fd, path = swap(fd, self._enter(fd, name, child, st)), child
                    todo.append(children(fd))
        finally:
            os.close(fd)

    def hard_link(self, place: Place, target_name: str) -> None:
        """Make `place` another name of the entry `target_name` (resolved inside the root, not followed)."""
        target = self.find(target_name)
        if target is None or target.name.startswith(WHITEOUT):
            raise FileNotFoundError(errno.ENOENT, "hard link target not found", target_name)
        with target:
            source = lstat_or_none(target.name, target.fd)
            if source is None:
                raise FileNotFoundError(errno.ENOENT, "hard link target not found", target_name)
            if stat.S_ISDIR(source.st_mode):
                raise IsADirectoryError(errno.EISDIR, "hard link target is a directory", target_name)
            existing = lstat_or_none(place.name, place.fd)
            if existing and (existing.st_dev, existing.st_ino) == (source.st_dev, source.st_ino):
                return  # already done, by an earlier run of this layer
            self.clear(place)
            os.link(target.name, place.name, src_dir_fd=target.fd, dst_dir_fd=place.fd, follow_symlinks=False)

    def set_dir_later(self, place: Place, mode: int, mtime_ns: int) -> None:
        """This layer's mode and mtime for a directory, applied by finish() once its children are written."""
        self.journal.save(place.path, mode, mtime_ns, mtime_ns)

    def finish(self) -> None:
        """Put the saved modes and times on directories, each after all below it so that parents stay enterable.
        In reverse order of their paths (a path sorts after its ancestors), which also keeps a subtree together:
        the parent open for one directory is mostly the next one's too, or below it (reached through ".."), so
        that no depth costs a walk each."""
        last, last_fd = None, -1  # the parent directory opened last, its fd
        try:
            for path, *saved in self.journal.in_reverse_order():
                parent, _, name = path.rpartition("/")
                fd = os.dup(self.top) if not path else self._open_folder(parent, last, last_fd)
                if fd is None:
                    continue  # something on the way is no longer a directory: this one is gone
                if path:
                    if last_fd >= 0:
                        os.close(last_fd)
                    last, last_fd = parent, os.dup(fd)
                with Place(fd, name if path else self.root_name, path) as place:
                    self._restore(place, *saved)
        finally:
            if last_fd >= 0:
                os.close(last_fd)
        self.journal.close()
        self.journal.remove()

    def _restore(self, place: Place, mode: int, atime_ns: int, mtime_ns: int) -> None:
        st = lstat_or_none(place.name, place.fd)
        if st is not None and stat.S_ISDIR(st.st_mode):
            os.chmod(place.name, mode, dir_fd=place.fd, follow_symlinks=False)
            os.utime(place.name, ns=(atime_ns, mtime_ns), dir_fd=place.fd, follow_symlinks=False)

    def _open_folder(self, path: str, last: str | None, last_fd: int) -> int | None:
        """Open the resolved directory `path`: up from `last` (open as `last_fd`) when it lies below, else from
        the root; None when something on the way is no longer a directory."""
        below = last is not None and (not path or last == path or last.startswith(path + "/"))
        try:
            if not below:
                return self._open_dirs(path.split("/") if path else [])
            fd = os.dup(last_fd)
            try:
                for _ in range(depth(last) - depth(path)):
                    fd = swap(fd, os.open("..", DIR_FLAGS, dir_fd=fd))
            except BaseException:
                os.close(fd)
                raise
            return fd
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise


class Hashes:
    """A set of path hashes in 8 bytes each, so that a layer of millions of entries stays small: the latest
    additions in a set, merged now and then into a sorted array searched by bisection."""

    RECENT = 1 << 16  # hashes held in the set before a merge (a few MB)

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.merged = array.array("q")

    def add(self, value: int) -> None:
        self.recent.add(value)
        if len(self.recent) >= self.RECENT:
            self.merged = array.array("q", heapq.merge(self.merged, sorted(self.recent)))
            self.recent = set()

    def __contains__(self, value: int) -> bool:
        if value in self.recent:
            return True
        at = bisect.bisect_left(self.merged, value)
        return at < len(self.merged) and self.merged[at] == value


def depth(path: str) -> int:
    return path.count("/") + 1 if path else 0


def children(fd: int) -> list[str]:
    """The names in the directory open as `fd` (an O_PATH fd cannot be listed: open it for reading)."""
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        return os.listdir(listing)
    finally:
        os.close(listing)
