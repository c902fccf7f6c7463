"""One layer's changes to the rootfs, and the journal that lets a killed application put directories back.

Each directory the layer enters is recorded (mode and times, before any change) and put back when the layer
is finished: adding children then leaves lower directories' mtimes alone, and an ordinary user may give
read-only directories owner rwx while writing into them. The records go to a journal beside the rootfs (on
disk, not in memory) before the change they cover, so an application killed half-way and run again puts back
exactly what the first run found. Apart from rootfs.py because of sqlite3, which d-run (it imports the
resolver) need not load: it costs d-run's start-up 12 ms.
"""

import array
import bisect
import contextlib
import errno
import heapq
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from .rootfs import DIR_FLAGS, Place, Root, children, join, lstat_or_none
from .store import current_umask, remove_entry
from .store import swap_fd as swap

WHITEOUT = ".wh."
OWNER_RWX = 0o700


class Tree(Root):
    """One layer's changes to `rootfs`; `finish()` puts directory modes and times back."""

    def __init__(self, rootfs: Path, layer: str) -> None:
        self.rootless = os.geteuid() != 0  # decided once: an ordinary user cannot chown or mknod
        self.umask = current_umask()  # the bits that creating a file with its mode does not give it
        self.kept = Hashes()  # paths this layer wrote, and their ancestors: whiteouts spare them
        rootfs.mkdir(parents=True, exist_ok=True)
        root_stat = rootfs.lstat()
        header = (layer, root_stat.st_dev, root_stat.st_ino)
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


class Journal:
    """What finish() puts back on directories: path -> (mode, atime_ns, mtime_ns), in an SQLite file beside the
    rootfs. Why not a dict in memory: a layer of a million directories would hold them all (~330 MB), where memory
    must stay flat; SQLite keeps them on disk, already ordered by path for finish(), through a cache of a few MB. In
    WAL mode without syncs a committed record is handed to the kernel at once (one write), so it survives a kill -9
    of this process, as the appended lines of the earlier journal did. Paths are bytes: names need not be UTF-8."""

    KNOWN = 1 << 16  # paths remembered as saved, so that entering a directory again asks no query
    BATCH = 1 << 10  # records of save() stored at once

    def __init__(self, path: Path, header: tuple[str, int, int]) -> None:
        self.path = path
        self.known: set[str] = set()
        self.pending: list[tuple[bytes, int, int, int]] = []
        self.db = self._resume(header) or self._create(header)

    def _resume(self, header: tuple[str, int, int]) -> sqlite3.Connection | None:
        """The journal of a killed run of this same layer on this same rootfs, or None."""
        if self.path.is_symlink() or not self.path.is_file():
            return None
        db = sqlite3.connect(self.path, isolation_level=None)  # each statement its own transaction
        try:
            self._prepare(db)
            if db.execute("SELECT layer, dev, ino FROM header").fetchone() == header:
                return db
        except sqlite3.DatabaseError:
            pass  # not a journal, or one of an older version: start afresh
        db.close()
        return None

    def _create(self, header: tuple[str, int, int]) -> sqlite3.Connection:
        self.remove()
        with sqlite_errors(self.path):
            db = sqlite3.connect(self.path, isolation_level=None)
            self._prepare(db)
            db.execute("CREATE TABLE header (layer TEXT, dev INTEGER, ino INTEGER)")
            db.execute(
                "CREATE TABLE dirs (path BLOB PRIMARY KEY, mode INTEGER, atime INTEGER, mtime INTEGER) WITHOUT ROWID"
            )
            db.execute("INSERT INTO header VALUES (?, ?, ?)", header)
        return db

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        # One process uses it (no shared-memory file); a commit is a write(2) to the WAL, never an fsync.
        for pragma in ("locking_mode = EXCLUSIVE", "journal_mode = WAL", "synchronous = OFF"):
            db.execute(f"PRAGMA {pragma}")

    def save_first(self, path: str, mode: int, atime_ns: int, mtime_ns: int) -> None:
        """Record what `path` is before this layer changes it, unless a record exists; stored once this returns."""
        if path not in self.known:
            with sqlite_errors(self.path):
                self.db.execute(
                    "INSERT OR IGNORE INTO dirs VALUES (?, ?, ?, ?)", (os.fsencode(path), mode, atime_ns, mtime_ns)
                )
            self._know(path)

    def save(self, path: str, mode: int, atime_ns: int, mtime_ns: int) -> None:
        """Record what `path` must be once the layer is applied, over any earlier record. Stored in batches: a
        run killed before it would make the same record again, as it applies the same entry again."""
        self.pending.append((os.fsencode(path), mode, atime_ns, mtime_ns))
        if len(self.pending) >= self.BATCH:
            self._store_pending()
        self._know(path)

    def _store_pending(self) -> None:
        with sqlite_errors(self.path):
            self.db.executemany("INSERT OR REPLACE INTO dirs VALUES (?, ?, ?, ?)", self.pending)
        self.pending.clear()

    def _know(self, path: str) -> None:
        if len(self.known) >= self.KNOWN:
            self.known.clear()
        self.known.add(path)

    def in_reverse_order(self) -> Iterator[tuple[str, int, int, int]]:
        """Every record, by path from last to first (the table's own order: nothing is sorted in memory)."""
        self._store_pending()
        with sqlite_errors(self.path):
            for path, *saved in self.db.execute("SELECT path, mode, atime, mtime FROM dirs ORDER BY path DESC"):
                yield os.fsdecode(path), *saved

    def close(self) -> None:
        self.db.close()  # writes the WAL into the file and removes it

    def remove(self) -> None:
        for name in (self.path.name, f"{self.path.name}-wal"):
            self.path.with_name(name).unlink(missing_ok=True)


@contextlib.contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """SQLite's failures as the OSError that they are, so that a full disk is reported as one."""
    try:
        yield
    except sqlite3.Error as err:
        code = errno.ENOSPC if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL else errno.EIO
        raise OSError(code, str(err), str(path)) from None
