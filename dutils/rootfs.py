"""Names resolved inside a root folder, never outside it: the resolver that d-pull's layer tree and d-run share.

Every path is resolved from the root down, one component at a time, through directory fds opened with
O_NOFOLLOW: a symlink met on the way is re-rooted at the root (as filepath-securejoin does) and `..` stops at
the root, so no name reaches outside. The last component is never followed: it is lstat-ed, replaced or
created relative to its parent's fd. A layer's entries start from the folders of the previous entry that
they share (each entered the same way), until a link is on the way.
"""

import errno
import os
import stat
from collections import deque
from collections.abc import Callable

from .store import swap_fd as swap

MAX_LINKS = 40  # symlinks followed while resolving one name, as the kernel's limit
KEPT = 64  # folders kept open by parent() at most (a descriptor each): a deeper name is walked from the root
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
    """Where an entry goes: `name` in the open directory `fd`; `path` is its resolved path below the root. A `lent`
    descriptor belongs to the Root, which keeps it for the next entry: the place does not close it."""

    def __init__(self, fd: int, name: str, path: str, lent: bool = False) -> None:
        self.fd, self.name, self.path, self.lent = fd, name, path, lent

    def __enter__(self) -> "Place":
        return self

    def __exit__(self, *_: object) -> None:
        if not self.lent:
            os.close(self.fd)


def make_missing_dir(fd: int, name: str) -> None:
    os.mkdir(name, 0o755, dir_fd=fd)
    os.chmod(name, 0o755, dir_fd=fd, follow_symlinks=False)  # whatever the umask


def stop_absent(fd: int, name: str) -> None:
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


class Trail(list):
    """The folders from the root to one, as a walk goes; its text, their path, is joined only when shown."""

    def __str__(self) -> str:
        return "/".join(self)


class Root:
    """Names resolved inside the directory `name` of the open directory `top` (both closed on exit).

    Symbolic links met on the way are handed to `_link_target` (re-rooted by default) and every directory
    entered to `_enter`: subclasses add their policy there (a layer's journal, refusing links, owners).
    """

    def __init__(self, top: int, name: str) -> None:
        self.top, self.root_name = top, name
        # The folders of the last parent() that met no link, from the root's child down (names, fds): the next
        # entry's parent is most often the same or near it. `stale` when a walk or a removal may change them.
        self.names = Trail()
        self.fds: list[int] = []
        self.folder: str | None = None  # their path, once parent() has opened them all
        self.stale = False
        st = os.lstat(name, dir_fd=top)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
        self.root = self._enter(top, name, Trail(), st)

    def __enter__(self) -> "Root":
        return self

    def __exit__(self, *_: object) -> None:
        self._drop(0)
        os.close(self.root)
        os.close(self.top)

    def _enter(self, fd: int, name: str, path: Trail | str, st: os.stat_result) -> int:
        """Open directory `name` (at `path` below the root, `st` its lstat) to resolve names in it (keep no Trail)."""
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
        todo, done, links = deque(dirs), Trail(), 0
        self.forget()  # _enter sees a new trail: what subclasses remember of the last one is gone
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
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), join(str(done), part))
                    target = self._link_target(fd, part, join(str(done), part))
                    if target.startswith("/"):
                        done.clear()
                        fd = swap(fd, self._open_dirs(done))
                    todo.extendleft(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), join(str(done), part))
                done.append(part)
                fd = swap(fd, self._enter(fd, part, done, st))
        except BaseException:
            os.close(fd)
            raise
        return Place(fd, base, join(str(done), base))

    def forget(self) -> None:
        """Drop the remembered folders at the next parent() (a place lent stays open): names may resolve anew."""
        self.stale = True

    def _drop(self, keep: int) -> None:
        """Close the remembered folders past the first `keep`."""
        for fd in self.fds[keep:]:
            os.close(fd)
        del self.names[keep:], self.fds[keep:]
        self.folder = None

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
        """Where entry `name` goes, its missing parent directories made. Found from the folders of the previous
        call (a lent place, valid until the next call) while no link is on the way; else walked from the root."""
        path = clean(name)
        if not path:
            return Place(self.top, self.root_name, "", lent=True)
        folder, _, base = path.rpartition("/")
        if self.stale or folder != self.folder:  # keep the folders this name shares with the last one
            dirs = folder.split("/") if folder else []
            same = [*map(str.__eq__, dirs, self.names), False]
            self._drop(0 if self.stale else same.index(False))
            self.stale = False
            fd = self.fds[-1] if self.fds else self.root
            for part in dirs[len(self.names) :]:  # plain names: clean() took out ".", ".." and empty ones
                st = lstat_or_none(part, fd)
                if st is None:
                    make_missing_dir(fd, part)
                    st = os.lstat(part, dir_fd=fd)
                if not stat.S_ISDIR(st.st_mode) or len(self.fds) >= KEPT:  # a link, not a folder, or deep: walk it
                    self._drop(0)
                    return self._walk(name, make_missing_dir)
                fd = self._enter(fd, part, Trail(dirs[: len(self.names) + 1]), st)
                self.names.append(part)
                self.fds.append(fd)
            self.folder = folder
        return Place(self.fds[-1] if self.fds else self.root, base, path, lent=True)

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


def children(fd: int) -> list[str]:
    """The names in the directory open as `fd` (an O_PATH fd cannot be listed: open it for reading)."""
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        return os.listdir(listing)
    finally:
        os.close(listing)
