"""The state of a pull folder that d-pull alone writes: holding it for a pull, the log of the layers applied to its
rootfs, and the lock file that pins folders to digests."""

from __future__ import annotations  # Path for type checkers only: d-pull --lock's no-op decides without pathlib

import _thread  # threading's Lock, without the threading module
import contextlib
import os
from collections.abc import Callable, Iterator

from .errors import Error
from .locks import locked
from .manifest import Platform, compatible, parse_platform
from .store import PullDir, check_digest, make_folder, open_cache, read_small_json, remove_tree, write_atomic

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from pathlib import Path


@contextlib.contextmanager
def claimed(folder: PullDir, cache: Path) -> Iterator[None]:
    """Hold `folder` for a pull (lock it, share the trusted cache); a pull that recorded nothing leaves no trace."""
    from .cache import in_use  # here: a settled folder (d-pull's no-op) never loads the cache's module

    root, record = folder.root, folder.read_record()  # first: says in one line when DIR cannot be read
    folder.check_trusted()
    refuse_links(folder)
    if record is None and not folder.state.is_dir() and root.is_dir() and any(root.iterdir()):
        raise Error(f"{root} exists and was not made by d-pull", "choose a new folder; this one is left untouched")
    made_root = not root.exists()
    with contextlib.suppress(OSError):  # private, as umoci makes its bundle: what a root pull wrote is root's alone
        root.mkdir(0o700, parents=True)  # (make_folder says why when it cannot be made)
    if record is None and not folder.state.is_dir() and root.is_dir():  # an empty folder made before, too
        root.chmod(0o700)
    make_folder(folder.state, "folder")
    with locked(folder.state / "lock", f"another d-pull is writing {root}"):
        try:
            with in_use(open_cache(cache)):
                yield
        finally:
            if folder.read_record() is None:
                remove_tree(folder.state)
                if made_root:
                    with contextlib.suppress(OSError):
                        root.rmdir()


def settled(folder: PullDir, reference: str, wanted: Platform, pinned: Callable[[], str | None]) -> bool:
    """Complete for the manifest `pinned()` names (a lock's, or what a tag names now: asked, and its error raised, only
    for a folder otherwise complete), on a platform `wanted` runs, and trusted: the one decision of the manifest task's
    up-to-date check and of d-pull's no-op. Anything amiss on disk is not settled: the full path says why."""
    try:
        record = folder.read_record()
        # the image's own platform, which the one asked for may accept without naming it (386 on amd64)
        runs = record and record.reference == reference and parse_platform(record.platform) in compatible(wanted)
        if not (runs and folder.is_complete(record)):
            return False
        folder.check_trusted()
    except Error:
        return False
    return record.digest == pinned()


def refuse_links(folder: PullDir) -> None:
    """DIR/.d-pull and DIR/rootfs are ours to write: never through a link to somewhere else."""
    for path in (folder.state, folder.rootfs):
        if path.is_symlink():
            raise Error(f"{path} is a symbolic link", f"d-pull writes only inside {folder.root}: remove the link")


def remove_folder(folder: PullDir) -> None:
    """`doit clean`: remove `folder` if d-pull made it; never the cache, never another folder."""
    refuse_links(folder)
    if folder.read_record() or folder.state.is_dir():
        with locked(folder.state / "lock", f"another d-pull is writing {folder.root}"):
            remove_tree(folder.root)


class AppliedLog:
    """DIR/.d-pull/applied: the digests of the layers applied to DIR/rootfs, in order. A line is appended as each
    layer is done: the log survives a kill, and costs the same per layer however many there are."""

    def __init__(self, folder: PullDir) -> None:
        self.path, self.rootfs = folder.state / "applied", folder.rootfs
        self.done: list[str] | None = None

    def applied(self) -> list[str]:
        if not self.rootfs.is_dir():
            return []
        if self.done is None:
            self.done = []
            with contextlib.suppress(FileNotFoundError):
                self.done = self.path.read_text().split()
        return self.done

    def is_applied(self, n: int, digest: str) -> bool:
        return self.applied()[n : n + 1] == [digest]

    def note(self, n: int, digest: str) -> None:
        """Layer `n` is applied (its rootfs exists by then)."""
        done = self.applied()
        if len(done) != n:  # applied again after an interruption (or a line cut short): what followed is void
            del done[n:]
            write_atomic(self.path, "".join(f"{d}\n" for d in done).encode())
        with open(self.path, "a") as out:
            out.write(digest + "\n")
            out.flush()
            os.fsync(out.fileno())
        done.append(digest)

    def start_over(self) -> None:
        """Another image replaces the rootfs: remove it, and what was applied to it."""
        remove_tree(self.rootfs)
        self.path.unlink(missing_ok=True)
        self.done = []


class LockFile:
    """sandboxes.lock, sorted JSON to commit: per folder, its reference, tag digest and platform manifest digest."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(path)  # a str: see the module's imports
        self.mutex = _thread.allocate_lock()  # folders resolve side by side

    def read(self) -> dict[str, dict]:
        hint = "restore it, or delete it to lock anew"
        data = read_small_json(self.path, hint)
        try:
            entries = {} if data is None else data["sandboxes"]
            for entry in entries.values():  # a digest names files: nothing else passes
                check_digest(entry["digest"]), check_digest(entry["manifest"])
            return entries
        except (KeyError, TypeError, AttributeError, Error) as err:
            raise Error(f"{self.path} is damaged ({err})", hint) from None

    def entry(self, folder: Path, reference: str) -> dict | None:
        """What the lock pins `folder` to, unless it names another reference (the dodo.py changed since)."""
        entry = self.read().get(os.path.relpath(folder, os.path.dirname(self.path)))
        return entry if entry and entry.get("reference") == reference else None

    def manifest(self, folder: Path, reference: str) -> str | None:
        """The manifest the lock pins `folder` to; None also when the lock is damaged (the full path says so)."""
        with contextlib.suppress(Error):
            return (self.entry(folder, reference) or {}).get("manifest")
        return None

    def pin(self, folder: Path, entry: dict) -> None:
        import json  # here: a no-op writes no lock file
        from pathlib import Path

        with self.mutex:
            entries = self.read() | {os.path.relpath(folder, os.path.dirname(self.path)): entry}
            data = json.dumps({"sandboxes": entries}, indent=2, sort_keys=True) + "\n"
            write_atomic(Path(self.path), data.encode())
