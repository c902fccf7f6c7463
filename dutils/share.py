"""Folders that share disk: the store of applied trees in the cache, and the folders made from them.

CACHE/trees/HEX is the image whose chain of layers (the OCI chain id of its diff_ids) is sha256:HEX, applied once by
the same machinery as a folder's rootfs (HEX/rootfs, its log in HEX/.d-pull/applied, resumed the same way), starting
from a hard-linked copy of the tree of the longest chain below it that the store holds: applying never writes into
an existing file (each entry is created afresh), so that tree stays as it was. HEX/anchor, written last, says the tree
is complete; each folder made from the tree by hard links holds another link to it, DIR/.d-pull/shared, so its link
count is 1 + the folders using the tree, and its mtime the tree's last use. A folder made by hard links shares its
files' inodes with the store and its siblings: before anything writes into them (d-run --rw), the folder is made
private by a copy (make_private), or d-run writes through an overlay (overlay.py).
"""

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import Error, printable
from .folder import AppliedLog
from .locks import locked
from .store import ANCHOR, OVERLAY, TREE_SIZE, PullDir, libc, remove_tree, touch, trees_folder, write_atomic

SHARED = "shared"  # DIR/.d-pull/shared: a hard link to the anchor of the tree DIR/rootfs is linked from
FICLONE = 0x40049409  # ioctl: make a file share another's blocks (XFS, Btrfs)
RENAME_EXCHANGE = 2
MAKING = "making"  # DIR/.d-pull/making: private (0700), where make_rootfs makes DIR/rootfs before moving it in
# find's test for what find_exposed lists (as root sees): FIFOs, other users' symlinks, and files and devices that are
# other users' or writable by group or others (a symlink's own mode is always 0777)
EXPOSED = ["(", "-type", "p", "-o", "-type", "l", "!", "-uid", "0", "-o", "!", "-type", "d", "!", "-type", "l"]
EXPOSED += ["(", "!", "-uid", "0", "-o", "-perm", "/022", ")", ")"]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain id of each prefix of the layers: the first layer's diff_id, then sha256 of "PARENT DIFF_ID"."""
    chain = list(diff_ids[:1])
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


class StoreTree:
    """The applied tree of the layers `diff_ids` in the store of `cache`."""

    def __init__(self, cache: Path, diff_ids: Sequence[str], digests: Sequence[str]) -> None:
        self.diff_ids, self.digests = list(diff_ids), list(digests)
        self.below = [trees_folder(cache) / chain.removeprefix("sha256:") for chain in chain_ids(diff_ids)]
        self.folder = PullDir(self.below.pop())
        self.name = self.folder.root.name
        self.anchor = self.folder.root / ANCHOR
        self.blobs = self.folder.state / "blobs"  # the layers' blobs that last applied into it, the one resumed too
        # its files a folder must not share (find_exposed), \0-ended; named anew when what it lists grew (FIFOs, links)
        self.exposed = self.folder.state / "unshared"

    def complete(self) -> bool:
        return self.anchor.exists()

    def build(self, note: Callable[[str], None], apply_onto: Callable[..., None], *args: object) -> None:
        """Apply an image's layers once into the cache's store of trees, for the folders that share them (by the pull's
        `apply_onto(rootfs, log, keys, *args)`); a process building the same tree is waited for."""
        for folder in (self.folder.root.parent, self.folder.root):  # whatever the umask: check_cache trusts 0700
            folder.mkdir(0o700, exist_ok=True)
            folder.chmod(0o700)  # no one else reaches its trees' /tmp (1777) or root's setuid files
        with locked(self.folder.state / "lock", waiting=f"d-pull: waiting for another pull applying {self.name[:12]}"):
            if self.complete():
                return
            log = AppliedLog(self.folder)  # diff_ids: the same tree whatever the layers' compression
            done, recorded = len(log.applied()), self.blobs.read_text().split() if self.blobs.exists() else []
            # a layer cut short is resumed only by its own blob: another's files (an image whose config claims this
            # tree's diff_ids, found out only at the layer's end) would stay under the layers that follow
            if not done or recorded[done : done + 1] != self.digests[done : done + 1]:
                self.start_from_below(log, note)
            self.exposed.unlink(missing_ok=True)  # found again once the tree is complete
            write_atomic(self.blobs, "".join(f"{d}\n" for d in self.digests).encode())
            try:
                apply_onto(self.folder.rootfs, log, self.diff_ids, *args)
            except Exception:  # a layer that failed its check, or anything else: no half-applied tree is kept
                log.start_over()
                raise
            write_atomic(self.folder.root / TREE_SIZE, b"%d\n" % self.disk_use())
            write_atomic(self.anchor, f"{self.name}\n".encode())

    def disk_use(self) -> int:
        """The disk the tree's files use, each once however many names it has, as root sees them (as_root): an
        ordinary user's walk would miss what the image's folders of mode 0000 hold."""
        argv = ["find", str(self.folder.rootfs), "!", "-type", "d", "-printf", "%i %b\\n"]
        blocks = dict(line.split() for line in as_root(argv, f"measure {self.name}").decode().splitlines())
        return 512 * sum(map(int, blocks.values()))

    def start_from_below(self, log: AppliedLog, note: Callable[[str], None]) -> None:
        """A hard-linked copy of the longest complete tree below this one, if the store holds one."""
        from .tree import journal_path  # here: sqlite3 costs a folder made from a complete tree 10 ms

        log.start_over()  # a copy that a kill cut short, or a tree applied by other blobs: void their journal too
        journal_path(self.folder.rootfs).unlink(missing_ok=True)  # (a new rootfs may get the old one's inode number)
        for depth in range(len(self.below), 0, -1):
            base = self.below[depth - 1]
            if (base / ANCHOR).exists():
                link_tree(base / "rootfs", self.folder.rootfs, note)
                touch(base / ANCHOR)
                for n, diff_id in enumerate(self.diff_ids[:depth]):
                    log.note(n, diff_id)
                return

    def make_rootfs(self, folder: PullDir, log: AppliedLog, note: Callable[[str], None]) -> None:
        """Make DIR/rootfs from the store's tree: by hard links, by a reflink copy where the filesystem clones (then
        the folder is private), else by a plain copy (the cache on another filesystem). Then the log says every layer
        is applied. Made in DIR/.d-pull/making, which no one else can enter, and moved into place whole: copy_exposed
        works by path, which another user owning a folder of the image (a root pull's uid 1000) could otherwise lead
        elsewhere with a link, in a DIR opened to others."""
        log.start_over()
        (folder.state / SHARED).unlink(missing_ok=True)
        remove_tree(folder.state / OVERLAY)  # --rw changes go with the old image, as a private folder's do (--update)
        making = folder.state / MAKING
        remove_tree(making)  # what a kill left
        making.mkdir(0o700)
        rootfs = making / "rootfs"
        if os.stat(self.anchor).st_dev != os.stat(folder.root).st_dev:
            note(f"the cache is on another filesystem than {printable(str(folder.root))}: copying, not sharing")
            how = []
        else:
            how = ["--reflink=always"] if clones(self.anchor, making) else ["-l"]
        if how != ["-l"]:
            copy_tree(self.folder.rootfs, rootfs, how)
        if linked := how == ["-l"] and link_tree(self.folder.rootfs, rootfs, note):
            paths = (self.folder.rootfs, rootfs, self.exposed)
            if not self.find_exposed() or os.geteuid() == 0:
                copy_exposed(*paths)
            else:  # as root (as_root): the image may hold folders its user cannot write; -P: no module from the cwd
                argv = [sys.executable, "-P", "-m", "dutils.share", *map(str, paths)]
                as_root(argv, f"copy the exposed files of {self.name}")
        os.rename(rootfs, folder.rootfs)
        making.rmdir()
        if linked:
            os.link(self.anchor, folder.state / SHARED)
        touch(self.anchor)
        for n, digest in enumerate(self.digests):
            log.note(n, digest)

    def find_exposed(self) -> bool:
        """Whether the tree has files someone else could change in place (which copy_exposed copies): found once for
        all its folders (a complete tree never changes, and the cache, so its folders too, has one owner), listed in
        `exposed`. Those writable by group or others, or (a root pull's) another user's, as the image's uid 1000 is
        a host user's, their symlinks too (times, group); and every FIFO, one pipe between the containers of every
        folder otherwise. as_root reads them all, in folders an ordinary user cannot read too."""
        if not self.exposed.exists():
            argv = ["find", str(self.folder.rootfs), "-mindepth", "1", *EXPOSED, "-printf", "%P\\0"]
            write_atomic(self.exposed, as_root(argv, f"read {self.name}"))
        return self.exposed.stat().st_size > 0


def copy_exposed(tree: Path, rootfs: Path, listed: Path) -> None:
    """Give `rootfs`, linked from `tree`, a copy of each file `listed` (find_exposed): through a folder opened to
    others (0711), a write into it would reach the store and every sibling. A file's hard links stay one."""
    copies, times = {}, {}
    for name in map(os.fsdecode, listed.read_bytes().split(b"\0")[:-1]):
        path, source = os.path.join(rootfs, name), os.path.join(tree, name)
        info, folder = os.lstat(path), os.path.dirname(path)
        times.setdefault(folder, os.lstat(folder))
        os.unlink(path)  # the folder is complete only once its log says so: a kill here is no harm
        if info.st_ino in copies:
            os.link(copies[info.st_ino], path)
            continue
        if stat.S_ISREG(info.st_mode):
            shutil.copyfile(source, path, follow_symlinks=False)
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(source), path)
        else:
            os.mknod(path, info.st_mode, info.st_rdev)
        os.lchown(path, info.st_uid, info.st_gid)  # first: it clears setuid bits and capabilities
        shutil.copystat(source, path, follow_symlinks=False)  # mode, times, extended attributes
        copies[info.st_ino] = path
    for folder, was in times.items():
        os.utime(folder, ns=(was.st_atime_ns, was.st_mtime_ns), follow_symlinks=False)


def clones(source: Path, folder: Path) -> bool:
    """Whether the filesystem of `folder` can clone `source` (a reflink): tried on one file."""
    with open(source, "rb") as original, tempfile.TemporaryFile(dir=folder) as copy:
        try:
            fcntl.ioctl(copy.fileno(), FICLONE, original.fileno())
        except OSError:
            return False
    return True


class TooManyLinks(Error):
    """A file has all the links its filesystem allows (ext4: 65,000, which a hostile image's links can take)."""


def link_tree(source: Path, target: Path, note: Callable[[str], None]) -> bool:
    """copy_tree by hard links, else (too many links) by a copy: whether it linked."""
    try:
        copy_tree(source, target, ["-l"])
        return True
    except TooManyLinks:
        note(f"a file of {printable(str(source))} has too many hard links: copying, not sharing")
    remove_tree(target)
    copy_tree(source, target, ["--reflink=auto"])
    return False


# Run "$@" with the folder $1 on a mount of its own that follows no symlink (nosymfollow: Linux 5.10)
NO_LINK_FOLLOWED = 'mount --bind -- "$1" "$1"; mount -o remount,bind,nosymfollow -- "$1"; shift; exec "$@"'


def copy_tree(source: Path, target: Path, how: list[str], reachable: bool = False) -> None:
    """`cp -a` (with `how`: -l hard links, --reflink=…) of `source` to the new `target`. `reachable`: others can
    change `source` while cp walks it (DIR/rootfs, where another user may own a folder, or write into the image's
    /tmp); as root, cp then walks it on a mount that follows no symlink: a folder swapped for a link between cp's
    lstat and its opendir would lead root's cp out of DIR, to copy what it finds there into the folder. (An
    ordinary user's cp reads only what that user may read, and its namespace may not be allowed to mount.)"""
    argv = ["cp", "-a", *how, "--no-target-directory", "--", str(source), str(target)]
    as_root(following_no_link(source, argv) if reachable and os.geteuid() == 0 else argv, f"copy {source}")


def following_no_link(folder: Path, argv: list[str]) -> list[str]:
    """`argv` run as root in a mount namespace of its own, where `folder` follows no symlink."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-euc", NO_LINK_FOLLOWED, "sh", str(folder), *argv]


def as_root(argv: list[str], what: str) -> bytes:
    """Run `argv` as root; its output. An ordinary user's runs in a user namespace of its own where it is root: its
    mode-0000 folders and files are read there as root reads them. bwrap makes it, not unshare(1): Ubuntu's AppArmor
    gives capabilities only in namespaces that bwrap made."""
    if os.geteuid() != 0:
        argv = ["bwrap", "--unshare-user", "--uid", "0", "--gid", "0", "--cap-add", "ALL", "--bind", "/", "/", *argv]
    english = os.environ | {"LC_ALL": "C"}  # whatever the user's language: "Too many links" is looked for
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False, env=english)
    if done.returncode:
        said = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        kind = TooManyLinks if os.strerror(errno.EMLINK).encode() in done.stderr else Error  # on any line
        raise kind(f"cannot {printable(what)}: {printable(said)}")
    return done.stdout


def is_shared(folder: PullDir) -> bool:
    return os.path.lexists(folder.state / SHARED)


def make_private(folder: PullDir, program: str, why: str = "", source: Path | None = None) -> None:
    """Give DIR/rootfs files of its own (a copy of `source`, DIR/rootfs by default, by reflinks where the filesystem
    clones), so that nothing written into it reaches the store or another folder; swapped in at once, so that a kill
    leaves the one or the other. Said in one line, `why` first."""
    shared = printable(str(folder.rootfs))
    print(f"{program}: {why}copying the files {shared} shares, to make it private", file=sys.stderr)
    making = folder.state / MAKING  # where no one else can enter, as make_rootfs makes a folder
    copy = making / "rootfs"
    try:
        remove_tree(making)  # a copy that a kill cut short
        making.mkdir(0o700)
        copy_tree(source or folder.rootfs, copy, ["--reflink=auto"], reachable=True)
        at_cwd = -100
        libc("renameat2", at_cwd, bytes(copy), at_cwd, bytes(folder.rootfs), RENAME_EXCHANGE)
        remove_tree(making)
        (folder.state / SHARED).unlink()
    except OSError as err:  # a folder left unremovable in the copy (made so by the image), say
        where = printable(os.fsdecode(err.filename or copy))
        raise Error(f"cannot make {shared} private: {where}: {err.strerror}") from None


if __name__ == "__main__":  # make_rootfs's copy_exposed, as root (as_root)
    copy_exposed(*map(Path, sys.argv[1:]))
