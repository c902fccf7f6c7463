"""The journal of one layer's application: what `rootfs.Tree.finish()` puts back on directories, kept on disk.

Apart from rootfs.py because of sqlite3, which d-run (it imports rootfs's resolver) need not load.
"""

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path


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
