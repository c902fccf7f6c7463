"""Comparing file trees: every entry's type, mode, owner, content or link target, mtime, and hard-link groups."""

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    owner: tuple[int, int] | None
    payload: object  # content, link target or device number
    mtime_ns: int | None


def snapshot(root: Path) -> tuple[dict[str, Entry], set[frozenset[str]]]:
    """Every entry below `root` (and root itself, as "."), and the groups of paths that share an inode."""
    entries, inodes = {}, {}
    for directory, dirs, files in os.walk(root):
        for path in [Path(directory)] if Path(directory) == root else []:
            entries["."] = describe(path)
        for name in dirs + files:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            entries[relative] = describe(path)
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, set()).add(relative)
    return entries, {frozenset(group) for group in inodes.values() if len(group) > 1}


def describe(path: Path) -> Entry:
    st = path.lstat()
    kind = stat.filemode(st.st_mode)[0]
    payload = {
        "-": lambda: path.read_bytes(),
        "l": lambda: os.readlink(path),
        "c": lambda: (os.major(st.st_rdev), os.minor(st.st_rdev)),
        "b": lambda: (os.major(st.st_rdev), os.minor(st.st_rdev)),
    }.get(kind, lambda: None)()
    return Entry(kind, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid), payload, st.st_mtime_ns)


def without(tree: tuple[dict[str, Entry], set], **fields: None) -> tuple[dict[str, Entry], set]:
    entries, groups = tree
    return {path: replace(entry, **fields) for path, entry in entries.items()}, groups


def tree_without_folder_times(root: Path) -> tuple[dict, set]:
    """The snapshot, but for the times of folders, which layers need not list (made when first needed)."""
    entries, links = snapshot(root)
    return {
        path: replace(entry, mtime_ns=None) if entry.kind == "d" else entry for path, entry in entries.items()
    }, links
