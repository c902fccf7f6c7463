"""Folders that share disk: the store of applied trees in the cache, and the folders made from them.

CACHE/trees/HEX is the image whose chain of layers (the OCI chain id of its diff_ids) is sha256:HEX, applied once by
the same machinery as a folder's rootfs (HEX/rootfs, its log in HEX/.d-pull/applied, resumed the same way), starting
from a hard-linked copy of the tree of the longest chain below it that the store holds: applying never writes into
an existing file (each entry is created afresh), so that tree stays as it was. HEX/anchor, written last, says the tree
is complete; each folder made from the tree by hard links holds another link to it, DIR/.d-pull/shared, so its link
count is 1 + the folders using the tree, and its mtime the tree's last use. A folder made by hard links shares its
files' inodes with the store and its siblings: before anything writes into them (d-run --rw), the folder is made
private by a copy (make_private).
"""

import ctypes
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import Error, printable
from .folder import AppliedLog
from .store import ANCHOR, PullDir, hold_folder, locked, remove_tree, touch, trees_folder, write_atomic

SHARED = "shared"  # DIR/.d-pull/shared: a hard link to the anchor of the tree DIR/rootfs is linked from
FICLONE = 0x40049409  # ioctl: make a file share another's blocks (XFS, Btrfs)
RENAME_EXCHANGE = 2


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain id of each prefix of the layers: the first layer's diff_id, then sha256 of "PARENT DIFF_ID"."""
    chain = list(diff_ids[:1])
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


class StoreTree:
    """The applied tree of the layers `diff_ids` in the store of `cache`."""

    def __init__(self, cache: Path, diff_ids: Sequence[str]) -> None:
        self.diff_ids = list(diff_ids)
        self.below = [trees_folder(cache) / chain.removeprefix("sha256:") for chain in chain_ids(diff_ids)]
        self.folder = PullDir(self.below.pop())
        self.name = self.folder.root.name
        self.anchor = self.folder.root / ANCHOR

    def complete(self) -> bool:
        return self.anchor.exists()

    def build(self, apply_onto: Callable[..., None], *args: object) -> None:
        """Apply an image's layers once into the cache's store of trees, for the folders that share them (by the pull's
        `apply_onto(rootfs, log, keys, *args)`); a process building the same tree is waited for."""
        self.folder.root.parent.mkdir(exist_ok=True)
        self.folder.root.parent.chmod(0o700)  # no one else reaches its trees' /tmp (1777) or root's setuid files
        self.folder.state.mkdir(parents=True, exist_ok=True)
        with locked(self.folder.state / "lock"):
            if self.complete():
                return
            log = AppliedLog(self.folder)  # diff_ids: the same tree whatever the layers' compression
            if not log.applied():
                self.start_from_below(log)
            apply_onto(self.folder.rootfs, log, self.diff_ids, *args)
            write_atomic(self.anchor, f"{self.name}\n".encode())

    def start_from_below(self, log: AppliedLog) -> None:
        """A hard-linked copy of the longest complete tree below this one, if the store holds one."""
        remove_tree(self.folder.rootfs)  # a copy that a kill cut short
        for depth in range(len(self.below), 0, -1):
            base = self.below[depth - 1]
            if (base / ANCHOR).exists():
                copy_tree(base / "rootfs", self.folder.rootfs, ["-l"])
                touch(base / ANCHOR)
                for n, diff_id in enumerate(self.diff_ids[:depth]):
                    log.note(n, diff_id)
                return

    def make_rootfs(self, folder: PullDir, log: AppliedLog, digests: list[str], note: Callable[[str], None]) -> None:
        """Make DIR/rootfs from the store's tree: by hard links, by a reflink copy where the filesystem clones (then
        the folder is private), else by a plain copy (the cache on another filesystem). Then the log says every layer
        is applied."""
        log.start_over()
        (folder.state / SHARED).unlink(missing_ok=True)
        if os.stat(self.anchor).st_dev != os.stat(folder.root).st_dev:
            note(f"the cache is on another filesystem than {printable(str(folder.root))}: copying, not sharing")
            how = []
        else:
            how = ["--reflink=always"] if clones(self.anchor, folder.state) else ["-l"]
        copy_tree(self.folder.rootfs, folder.rootfs, how)
        if how == ["-l"]:
            os.link(self.anchor, folder.state / SHARED)
        touch(self.anchor)
        for n, digest in enumerate(digests):
            log.note(n, digest)


def clones(source: Path, folder: Path) -> bool:
    """Whether the filesystem of `folder` can clone `source` (a reflink): tried on one file."""
    with open(source, "rb") as original, tempfile.TemporaryFile(dir=folder) as copy:
        try:
            fcntl.ioctl(copy.fileno(), FICLONE, original.fileno())
        except OSError:
            return False
    return True


def copy_tree(source: Path, target: Path, how: list[str]) -> None:
    """`cp -a` (with `how`: -l hard links, --reflink=…) of `source` to the new `target`. An ordinary user copies in a
    user namespace of its own where it is root: its mode-0000 folders and files are read there as root reads them.
    bwrap makes it, not unshare(1): Ubuntu's AppArmor gives capabilities only in namespaces that bwrap made."""
    argv = ["cp", "-a", *how, "--no-target-directory", "--", str(source), str(target)]
    if os.geteuid() != 0:
        argv = ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0", "--cap-add", "ALL", "--bind", "/", "/", *argv]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if done.returncode:
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise Error(f"cannot copy {printable(str(source))}: {printable(said)}")


def is_shared(folder: PullDir) -> bool:
    return os.path.lexists(folder.state / SHARED)


def make_private(folder: PullDir, program: str) -> None:
    """Give DIR/rootfs files of its own (a copy, by reflinks where the filesystem clones), so that nothing written
    into it reaches the store or another folder; swapped in at once, so that a kill leaves the one or the other."""
    print(f"{program}: copying the files {printable(str(folder.rootfs))} shares, to make it private", file=sys.stderr)
    copy = folder.root / ".rootfs.private"
    remove_tree(copy)  # a copy that a kill cut short
    copy_tree(folder.rootfs, copy, ["--reflink=auto"])
    libc = ctypes.CDLL(None, use_errno=True)
    at_cwd = -100
    if libc.renameat2(at_cwd, bytes(copy), at_cwd, bytes(folder.rootfs), RENAME_EXCHANGE):
        code = ctypes.get_errno()
        raise Error(f"cannot replace {printable(str(folder.rootfs))}: {os.strerror(code)}")
    remove_tree(copy)
    (folder.state / SHARED).unlink()


def unshare(root: str) -> None:
    """d-pull --unshare DIR: make a shared folder private, while no pull and no container uses it."""
    folder = PullDir(root)
    folder.require_complete()
    if not is_shared(folder):
        raise Error(f"{printable(str(folder.root))} shares no files with other folders", "it is private already")
    with locked(folder.state / "lock", f"another d-pull is writing {printable(str(folder.root))}"):
        held = hold_folder(folder.root, fcntl.LOCK_EX, f"{printable(str(folder.root))} is in use by a container")
        try:
            make_private(folder, "d-pull")
        finally:
            os.close(held)
