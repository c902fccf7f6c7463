"""d-cache: the cache's lifecycle (blobs, and the store of applied trees). List it; prune what no pull has used for a
while, never what one is using: every pull holds a shared lock on the cache while it runs, and pruning takes it
exclusively. A tree may go at any time: the folders made from it hold links to its files."""

import argparse
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .errors import Error
from .locks import locked
from .progress import human
from .store import (
    ANCHOR,
    TREE_SIZE,
    blob_folder,
    cache_dir,
    cache_lock,
    check_cache,
    open_cache,
    pruned_marker,
    read_small,
    remove_tree,
    trees_folder,
    write_atomic,
)

MAX_AGE = 30 * 86400  # seconds: entries unused this long are pruned after a pull, as in the original tool
PRUNE_EVERY = 86400


class Entry(NamedTuple):
    path: Path
    size: int
    used: float  # the mtime: set when written, refreshed whenever a pull uses the blob (a tree: its anchor)
    folders: int | None = None  # a tree's: the folders hard-linked from it (its anchor's other links)


def list_entries(cache: Path) -> list[Entry]:
    """Blobs, partial downloads and their locks, and the store's trees, oldest use first."""
    entries = []
    for path in blob_folder(cache).glob("*"):
        with contextlib.suppress(FileNotFoundError):
            info = path.stat()
            entries.append(Entry(path, info.st_size, info.st_mtime))
    for path in trees_folder(cache).glob("*"):
        with contextlib.suppress(FileNotFoundError):
            info = (path / ANCHOR).stat() if (path / ANCHOR).exists() else path.stat()  # else: being built, or cut
            entries.append(Entry(path, tree_size(path), info.st_mtime, info.st_nlink - 1))
    return sorted(entries, key=lambda e: e.used)


def tree_size(path: Path) -> int:
    """The bytes of the files below `path`, each file once however many names it has: as share.py counted them once
    the tree was complete, else (a tree being built) walked here."""
    with contextlib.suppress(OSError, ValueError):
        return int(read_small(path / TREE_SIZE, 64))
    sizes = {}
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(folder, name))
                sizes[info.st_ino] = info.st_blocks * 512
    return sum(sizes.values())


def remove_older(cache: Path, max_age: float) -> list[Entry]:
    """Remove the entries unused for `max_age` seconds (0: all), under the cache's lock."""
    now = time.time()
    removed = [e for e in list_entries(cache) if now - e.used >= max_age]
    for entry in removed:
        remove_tree(entry.path)
    write_atomic(pruned_marker(cache), b"")  # a new file: never through a link planted under its name
    return removed


def prune_if_due(cache: Path) -> None:
    """After a pull: at most once a day, and only when no other pull is running (never wait for one)."""
    with contextlib.suppress(OSError):
        if time.time() - pruned_marker(cache).lstat().st_mtime < PRUNE_EVERY:
            return
    with contextlib.suppress(Error, OSError), locked(cache_lock(cache), "busy"):
        remove_older(cache, MAX_AGE)


def in_use(cache: Path) -> contextlib.AbstractContextManager[None]:
    """Held by a pull for as long as it runs, so that pruning never removes a blob under it."""
    return locked(cache_lock(cache), kind=fcntl.LOCK_SH)


@contextlib.contextmanager
def held_alone(cache: Path) -> Iterator[None]:
    """The cache's lock taken whole, waiting for the running pulls to finish, and saying so."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(cache_lock(cache), "busy"))
        except Error:
            print(f"d-cache: waiting for the pulls using {cache} to finish", file=sys.stderr, flush=True)
            stack.enter_context(locked(cache_lock(cache)))
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d-cache", description="List or prune d-pull's blob cache.")
    cache_help = "the cache (default: $D_UTILS_CACHE, else $XDG_CACHE_HOME/d-utils or ~/.cache/d-utils)"
    parser.add_argument("--cache", metavar="FOLDER", help=cache_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="every cached blob and tree with its size and when a pull last used it")
    pruning = commands.add_parser("prune", help="remove what no pull has used recently (waits for running pulls)")
    age = pruning.add_mutually_exclusive_group()
    age.add_argument("--days", type=float, default=MAX_AGE / 86400, help="unused for this many days (default 30)")
    age.add_argument("--all", action="store_true", help="everything")
    args = parser.parse_args(argv)
    cache = cache_dir(args.cache)
    try:
        if args.command == "list":
            entries = list_entries(check_cache(cache)) if os.path.lexists(cache) else []  # none: nothing made
            for e in entries:
                used = "" if e.folders is None else f"tree, folders: {e.folders}  "
                print(
                    f"{human(e.size):>10}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.used))}  {used}{e.path.name}"
                )
            print(f"{len(entries)} entries, {human(sum(e.size for e in entries))} in {cache}")
        else:
            with held_alone(open_cache(cache)):
                removed = remove_older(cache, 0 if args.all else args.days * 86400)
            print(f"removed {len(removed)} entries, {human(sum(e.size for e in removed))} from {cache}")
    except OSError as err:
        print(f"d-cache: error: {cache}: {err.strerror}", file=sys.stderr)
        return 1
    except Error as err:
        print(f"d-cache: error: {err}", file=sys.stderr)
        return 1
    return 0
