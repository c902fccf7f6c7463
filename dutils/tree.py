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

from .rootfs import DIR_FLAGS, Place, Root, Trail, children, lstat_or_none
from .store import current_umask, remove_entry
from .store import swap_fd as swap

WHITEOUT = ".wh."
OWNER_RWX = 0o700


class Tree(Root):
    """One layer's changes to `rootfs`; `finish()` puts directory modes and times back."""

    def __init__(self, rootfs: Path, layer: str) -> None:
        self.rootless = os.geteuid() != 0  # decided once: an ordinary user cannot chown or mknod
        self.umask = current_umask()  # the bits that creating a file with its mode does not give it
        self.kept = Hashes()  # paths this layer wrote, and their ancestors (trail_hashes): whiteouts spare them
        self.kept_folder = ("", 0)  # the folder parent() marked last (all up to the root are), and its hash
        self.ids: list[int] = []  # the journal ids of the folders on the last trail entered, from the root down
        # The owner of an entry this layer makes, before any chown; none once a setgid folder is met (an entry
        # made in one takes its group): chown then always.
        self.made_owner: tuple = (os.geteuid(), os.getegid())
        self.made: tuple[int, str] | None = None  # the folder make_dir() made last (parent's journal id, name)
        rootfs.mkdir(parents=True, exist_ok=True)
        root = rootfs.lstat()
        self.journal = Journal(journal_path(rootfs), (layer, root.st_dev, root.st_ino))
        top = os.open(rootfs.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        super().__init__(top, rootfs.name)

    def __exit__(self, *_: object) -> None:
        super().__exit__()
        self.journal.close()

    def _enter(self, fd: int, name: str, path: Trail | str, st: os.stat_result) -> int:
        """Open directory `name` for use, saving its metadata first and giving an ordinary user rwx on it. Saved
        under its parent's journal id (the folder one up the trail), so that no record holds a whole path."""
        depth, mode = len(path), stat.S_IMODE(st.st_mode)
        parent, here = (self.ids[depth - 1], path[-1]) if depth else (0, "")
        store = (parent, here) != self.made  # one this run made has no change to cover yet: its record may wait
        self.ids[depth:] = [self.journal.save_first(parent, here, mode, st.st_atime_ns, st.st_mtime_ns, store)]
        if st.st_mode & stat.S_ISGID:
            self.made_owner = ()
        if self.rootless and st.st_mode & OWNER_RWX != OWNER_RWX:
            os.chmod(name, mode | OWNER_RWX, dir_fd=fd, follow_symlinks=False)
        return os.open(name, DIR_FLAGS, dir_fd=fd)

    def parent(self, name: str) -> Place:
        """Where entry `name` goes, its missing parent directories made."""
        place = super().parent(name)
        folder, _, base = place.path.rpartition("/")  # marked as this layer's, with its parents: whiteouts spare them
        if folder != self.kept_folder[0]:
            hashes = trail_hashes(folder.split("/") if folder else [])
            for value in reversed(hashes[1:]):  # up to the first folder already marked
                if value in self.kept:
                    break
                self.kept.add(value)
            self.kept_folder = (folder, hashes[-1])
        if base:
            self.kept.add(hash((self.kept_folder[1], base)))  # a path written again may be added again: harmless
        return place

    def make_dir(self, place: Place, mode: int) -> tuple:
        """A directory at `place` (the last resolved) with `mode` and owner rwx: a directory over a directory keeps
        the children; over anything else it replaces it. Its owner now."""
        if mode & stat.S_ISGID:
            self.made_owner = ()
        try:
            os.mkdir(place.name, mode & 0o777 | OWNER_RWX, dir_fd=place.fd)  # with its mode: finish() need not chmod
        except FileExistsError:
            st = os.lstat(place.name, dir_fd=place.fd)
            if not stat.S_ISDIR(st.st_mode):
                self.clear(place.fd, place.name)
                return self.make_dir(place, mode)
            # Writable while its attributes are set; a setgid bit this layer takes away goes now, before entries
            # made inside take its group (the rest of the mode waits for finish()).
            keep = stat.S_IMODE(st.st_mode) if not (st.st_mode ^ mode) & 0o7000 else mode & 0o7777
            if keep | OWNER_RWX != stat.S_IMODE(st.st_mode):
                os.chmod(place.name, keep | OWNER_RWX, dir_fd=place.fd, follow_symlinks=False)
            return st.st_uid, st.st_gid
        self.made = (self.ids[place.path.count("/")], place.name)
        return self.made_owner

    def clear(self, fd: int, name: str) -> None:
        """Remove whatever is at `name` in `fd`: a file, a link, or a directory with everything in it."""
        st = lstat_or_none(name, fd)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            self.forget()
        if stat.S_ISDIR(st.st_mode):
            remove_entry(fd, name)
        else:
            os.unlink(name, dir_fd=fd)

    def hide(self, place: Place) -> None:
        """A whiteout: remove what lower layers have at `place`, sparing what this layer wrote."""
        if not place.path or trail_hashes(place.path.split("/"))[-1] not in self.kept:
            self.clear(place.fd, place.name)
            return
        st = lstat_or_none(place.name, place.fd)
        if st is not None and stat.S_ISDIR(st.st_mode):
            trail = Trail(place.path.split("/"))
            with Place(self._enter(place.fd, place.name, trail, st), "", place.path) as inside:
                self.hide_children(inside.fd, trail)

    def hide_children(self, fd: int, trail: list[str]) -> None:
        """An opaque whiteout: hide every lower-layer entry below the open directory `fd` (at `trail`), one directory
        open at a time (back up through ".."), so that no depth is too deep."""
        trail = Trail(trail)
        hashes = trail_hashes(trail)  # of the folders on the trail, to tell a child's at once
        fd = os.dup(fd)
        todo = [children(fd)]
        try:
            while todo:
                if not todo[-1]:
                    todo.pop()
                    if todo:
                        fd = swap(fd, os.open("..", DIR_FLAGS, dir_fd=fd))
                        del trail[-1], hashes[-1]
                    continue
                name = todo[-1].pop()
                value = hash((hashes[-1], name))
                if value not in self.kept:
                    self.clear(fd, name)
                    continue
                st = lstat_or_none(name, fd)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    trail.append(name)
                    hashes.append(value)
                    fd = swap(fd, self._enter(fd, name, trail, st))
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
            self.clear(place.fd, place.name)
            os.link(target.name, place.name, src_dir_fd=target.fd, dst_dir_fd=place.fd, follow_symlinks=False)

    def set_dir_later(self, place: Place, mode: int, mtime_ns: int) -> None:
        """This layer's mode and mtime for a directory, put on by finish(); `place` was the last resolved."""
        parent = self.ids[place.path.count("/")] if place.path else 0
        self.journal.save(parent, place.name if place.path else "", mode, mtime_ns, mtime_ns)

    def finish(self) -> None:
        """Put the saved modes and times on directories, each after all below it so that parents stay enterable: depth
        first through the journal's tree, one directory open at a time (down by name, up through ".."). Children are
        read a batch at a time, each told a leaf or not in the same query: a leaf is put back from its parent."""
        root = self.journal.children(0)[0][0]  # the only record without a parent
        stack = [([*root[:5], 0], *self.journal.children(root[0]))]  # entered folders: record, batch, more
        fd = os.dup(self.root)
        try:
            while True:
                record, batch, more = stack[-1]
                if not batch and more:  # the batch is used up, and the folder has more children after it
                    stack[-1] = (record, *self.journal.children(record[0], record[-1]))
                elif batch:
                    child = batch.pop()
                    record[-1] = child[1]  # the children up to this name are done
                    if not child[5]:
                        self._restore(fd, *child[1:5])  # no record below it: never entered
                    elif (st := lstat_or_none(child[1], fd)) is not None and stat.S_ISDIR(st.st_mode):
                        fd = swap(fd, os.open(child[1], DIR_FLAGS, dir_fd=fd))
                        stack.append(([*child[:5], 0], *self.journal.children(child[0])))
                    # else no longer a directory: it and all below it are gone
                elif len(stack) == 1:
                    break
                else:
                    stack.pop()
                    fd = swap(fd, os.open("..", DIR_FLAGS, dir_fd=fd))
                    self._restore(fd, *record[1:5])
        finally:
            os.close(fd)
        self._restore(self.top, self.root_name, *record[2:5])
        self.journal.close()
        self.journal.remove()

    def _restore(self, fd: int, name: str | bytes, mode: int, atime_ns: int, mtime_ns: int) -> None:
        st = lstat_or_none(name, fd)
        if st is not None and stat.S_ISDIR(st.st_mode):
            if stat.S_IMODE(st.st_mode) != mode:  # most folders are made with theirs: chmod costs 4 system calls
                os.chmod(name, mode, dir_fd=fd, follow_symlinks=False)
            os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)


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


def trail_hashes(trail: list[str]) -> list[int]:
    """The hashes of the root (0) and of each folder down `trail`, each from its parent's and its own name."""
    hashes = [0]
    for name in trail:
        hashes.append(hash((hashes[-1], name)))
    return hashes


class Journal:
    """What finish() puts back on directories, in an SQLite file beside the rootfs (not in memory, which a million
    directories would fill): a tree of records (id, parent's id, name as bytes, mode, atime_ns, mtime_ns; the root's
    has parent 0 and an empty name), so that a folder n deep costs one record of its own name, never its path. In WAL
    mode without syncs a committed transaction is handed to the kernel at once (one write): it survives a kill -9.
    One is committed every BATCH records, or at once for a record that must be stored before the change it covers."""

    VERSION = 2  # of the tables: a journal of another is not resumed
    KNOWN = 1 << 16  # folders remembered as saved, with their ids, so that entering one again asks no query
    BATCH = 1 << 10  # records written in one transaction at most

    def __init__(self, path: Path, header: tuple[str, int, int]) -> None:
        self.path = path
        self.known: dict[tuple[int, str], int] = {}
        self.waiting = 0  # records written in the open transaction
        self.db = self._resume(header) or self._create(header)
        self.next = self.db.execute("SELECT coalesce(max(id), 0) + 1 FROM folders").fetchone()[0]  # ids given out

    def _resume(self, header: tuple[str, int, int]) -> sqlite3.Connection | None:
        """The journal of a killed run of this same layer on this same rootfs, or None."""
        if self.path.is_symlink() or not self.path.is_file():
            return None
        db = sqlite3.connect(self.path, isolation_level=None)  # each statement its own transaction
        try:
            self._prepare(db)
            if (
                db.execute("PRAGMA user_version").fetchone() == (Journal.VERSION,)
                and db.execute("SELECT * FROM head").fetchone() == header
            ):
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
            db.execute(f"PRAGMA user_version = {Journal.VERSION}")
            db.execute("CREATE TABLE head (layer TEXT, dev INTEGER, ino INTEGER)")
            db.execute(  # one B-tree, in the order finish() reads it
                "CREATE TABLE folders (parent INTEGER, name BLOB, id INTEGER, mode INTEGER, atime INTEGER,"
                " mtime INTEGER, PRIMARY KEY (parent, name)) WITHOUT ROWID"
            )
            db.execute("INSERT INTO head VALUES (?, ?, ?)", header)
        return db

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        # One process uses it (no shared-memory file); a commit is a write(2) to the WAL, never an fsync.
        for pragma in ("locking_mode = EXCLUSIVE", "journal_mode = WAL", "synchronous = OFF"):
            db.execute(f"PRAGMA {pragma}")

    def save_first(self, parent: int, name: str, mode: int, atime_ns: int, mtime_ns: int, store: bool = True) -> int:
        """Record what folder `name` in the folder of id `parent` is before this layer changes it, unless a record
        exists; stored once this returns when `store` (else with the next batch: a folder this run made). Its id."""
        found = self.known.get((parent, name))
        if found is None:
            row = (parent, os.fsencode(name))
            query = "INSERT OR IGNORE INTO folders VALUES (?, ?, ?, ?, ?, ?)"
            if self._write(query, (*row, self.next, mode, atime_ns, mtime_ns), store) == 1:
                found, self.next = self.next, self.next + 1
            else:  # a folder already recorded is not written again: one query more
                with sqlite_errors(self.path):
                    found = self.db.execute("SELECT id FROM folders WHERE parent = ? AND name = ?", row).fetchone()[0]
            if len(self.known) >= self.KNOWN:
                self.known.clear()
            self.known[(parent, name)] = found
        return found

    def save(self, parent: int, name: str, mode: int, atime_ns: int, mtime_ns: int) -> None:
        """Record what folder `name` in the folder of id `parent` must be once the layer is applied, over any record.
        Stored in batches: a run killed before would make it again, as it applies the same entry again."""
        query = (
            "INSERT INTO folders VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (parent, name) DO UPDATE SET"
            " mode = excluded.mode, atime = excluded.atime, mtime = excluded.mtime"
        )
        self._write(query, (parent, os.fsencode(name), self.next, mode, atime_ns, mtime_ns), False)
        self.next += 1  # unused if the folder has a record already: ids need only grow

    def _write(self, query: str, row: tuple, store: bool) -> int:
        """Run `query` on `row` in the open transaction, committed now when `store`; how many rows it changed."""
        with sqlite_errors(self.path):
            if not self.db.in_transaction:
                self.db.execute("BEGIN")
            changed = self.db.execute(query, row).rowcount
        self.waiting += 1
        if store or self.waiting >= self.BATCH:
            self.commit()
        return changed

    def commit(self) -> None:
        if self.waiting:
            with sqlite_errors(self.path):
                self.db.execute("COMMIT")  # one write
            self.waiting = 0

    def children(self, parent: int, after: bytes | int = 0) -> tuple[list[tuple], bool]:
        """The next batch of children of the folder of id `parent` whose names sort after `after`, the last in name
        order first: (id, name, mode, atime_ns, mtime_ns, whether it has children), and whether more may follow. The
        default, 0, sorts before every name, even the root's empty one: SQLite puts any number before any BLOB."""
        self.commit()
        query = (
            "SELECT id, name, mode, atime, mtime, EXISTS (SELECT 1 FROM folders AS c WHERE c.parent = f.id)"
            " FROM folders AS f WHERE parent = ? AND name > ? ORDER BY name LIMIT ?"
        )
        with sqlite_errors(self.path):
            batch = self.db.execute(query, (parent, after, self.BATCH)).fetchall()
        batch.reverse()
        return batch, len(batch) == self.BATCH

    def close(self) -> None:
        self.commit()  # the records waiting are of folders on disk
        self.db.close()  # writes the WAL into the file and removes it

    def remove(self) -> None:
        for name in (self.path.name, f"{self.path.name}-wal"):
            self.path.with_name(name).unlink(missing_ok=True)


def journal_path(rootfs: Path) -> Path:
    return rootfs.parent / f".{rootfs.name}.d-utils-journal"


@contextlib.contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """SQLite's failures as the OSError that they are, so that a full disk is reported as one."""
    try:
        yield
    except sqlite3.Error as err:
        code = errno.ENOSPC if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL else errno.EIO
        raise OSError(code, str(err), str(path)) from None
