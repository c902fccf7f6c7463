"""The apply stage: one layer blob, streamed and verified, applied onto DIR/rootfs as an OCI changeset.

One loop over the tar entries (read by tarstream, which keeps none and caps header records): a whiteout hides
lower-layer entries, any other entry replaces what was at its path (a directory over a directory keeps the
children). Paths are resolved by tree.Tree, which keeps every change inside the rootfs. Every entry replaces
whatever is at its path, so running the same layer again over a killed run gives exactly the tree of one clean
run: a file the killed run left half-written is written again.
"""

import contextlib
import errno
import hashlib
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from decimal import ROUND_DOWN, Context, Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

import zstandard
from isal import igzip, igzip_lib

from .errors import Error
from .oci import COMPRESSION
from .rootfs import Place, clean
from .tarstream import CHAR, Member, RecordTooLarge, TarError, TarReader
from .tree import OWNER_RWX, WHITEOUT, Tree

DECOMPRESSORS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    "tar": lambda raw: raw,
    "gzip": lambda raw: igzip.IGzipFile(fileobj=raw, mode="rb"),
    "zstd": lambda raw: zstandard.ZstdDecompressor(max_window_size=WINDOW).stream_reader(raw, read_across_frames=True),
}
# isal refuses a gzip header (its name or comment field) longer than its buffer with OverflowError.
CORRUPT_DATA = (OSError, EOFError, OverflowError, igzip_lib.IsalError, zstandard.ZstdError)
OPAQUE = WHITEOUT + WHITEOUT + ".opq"
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
# A zstd frame asks for a window this large at most: buildah's and podman's zstd:chunked layers ask 32 MiB
# (`zstd -19` writes 8 MiB). A frame that asks more (`zstd --long`, --ultra -21 and up) is refused, not allocated.
WINDOW = 32 << 20
SHOWN = 200  # characters of a name shown in a message, at each end: a name may be a MiB long
AHEAD = 4  # chunks decompressed ahead of the tar reader: memory stays bounded
MAX_SECONDS = 2**63 // 10**9  # os.utime takes nanoseconds as a signed 64-bit number
# Digits past the nanosecond are cut toward zero, as Go's archive/tar (umoci) does; 40 digits hold any time above.
NANOSECONDS = Context(prec=40, rounding=ROUND_DOWN)


@dataclass
class Skipped:
    """What an ordinary user cannot reproduce; the caller warns once with the totals."""

    devices: int = 0
    xattrs: int = 0
    owners: int = 0  # entries owned by someone other than root, now owned by the user

    def __add__(self, other: "Skipped") -> "Skipped":
        return Skipped(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def total(self) -> int:
        return self.devices + self.xattrs + self.owners

    def describe(self) -> str:
        counts = [(self.devices, "device nodes"), (self.xattrs, "privileged extended attributes")]
        parts = [f"{count} {what} skipped" for count, what in counts if count]
        if self.owners:
            parts.append(f"{self.owners} entries owned by other users in the image now belong to you")
        return "as an ordinary user: " + ", ".join(parts)


class VerifyingReader:
    """The uncompressed layer, hashed as it is read; decompression failures become one-line errors.

    A thread of its own decompresses and hashes up to AHEAD chunks ahead of the tar reader: both release the GIL,
    so that they overlap with the parsing and the writing. Use it as a context manager: leaving stops the thread.
    """

    def __init__(self, raw: BinaryIO, compression: str, layer: str) -> None:
        self.stream = DECOMPRESSORS[compression](raw)
        self.compression, self.layer = compression, layer
        self.sha256 = hashlib.sha256()
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(AHEAD)
        self.stopped = threading.Event()
        self.pump = threading.Thread(target=self._decompress, name=f"decompress {layer}", daemon=True)

    def __enter__(self) -> "VerifyingReader":
        self.pump.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        while self.pump.is_alive():  # unblock its put(), then wait for it to see `stopped`
            with contextlib.suppress(queue.Empty):
                self.chunks.get_nowait()
            self.pump.join(0.05)

    def _decompress(self) -> None:
        data: bytes | BaseException = b"-"
        while data and not self.stopped.is_set():
            try:
                data = self.stream.read(CHUNK)
                self.sha256.update(data)
            except CORRUPT_DATA as err:
                data = Error(f"{self.layer}: corrupt {self.compression} data ({err})")
            except BaseException as err:  # the thread's edge: the reader re-raises it
                data = err
            while not self.stopped.is_set():
                with contextlib.suppress(queue.Full):
                    self.chunks.put(data, timeout=0.1)
                    break
            if isinstance(data, BaseException):
                return

    def read(self, _size: int = CHUNK) -> bytes:
        """The next piece of the stream (up to CHUNK bytes, whatever `_size` asks); empty at its end."""
        data = self.chunks.get()
        if isinstance(data, BaseException):
            self.chunks.put(data)  # every later read fails the same way
            raise data
        if not data:
            self.chunks.put(data)  # and the end stays the end
        return data

    def check(self, diff_id: str) -> None:
        """Read what follows the tar's end marker too, then compare the whole stream with `diff_id`."""
        while self.read(CHUNK):
            pass
        digest = f"sha256:{self.sha256.hexdigest()}"
        if digest != diff_id:
            raise Error(f"{self.layer}: uncompressed content is {digest}, the image config says {diff_id}")


def apply_layer(blob: Path, media_type: str, diff_id: str, rootfs: Path) -> Skipped:
    """Apply the verified layer `blob` onto `rootfs`; safe to run again after an interruption."""
    layer = f"layer sha256:{blob.name}"
    if media_type not in COMPRESSION:
        raise Error(f"{layer}: unsupported layer media type {media_type!r}")
    skipped = Skipped()
    try:
        with (
            blob.open("rb") as raw,
            Tree(rootfs, diff_id) as tree,
            VerifyingReader(raw, COMPRESSION[media_type], layer) as stream,
        ):
            apply_members(stream, tree, skipped, layer)
            stream.check(diff_id)
            tree.finish()
    except OSError as err:  # the blob, the rootfs itself or a full disk; a member's failures are reported as its own
        raise (
            disk_full(blob, media_type, rootfs, layer)
            if err.errno == errno.ENOSPC
            else Error(f"{layer}: {describe_os_error(err)}")
        ) from None
    return skipped


def disk_full(blob: Path, media_type: str, rootfs: Path, layer: str) -> Error:
    """How much file data the layer holds, or as far as it can be read: past where the disk filled up, it was not."""
    needed, free = 0, shutil.disk_usage(rootfs).free
    with blob.open("rb") as raw, contextlib.suppress(TarError, *CORRUPT_DATA):
        for entry in TarReader(DECOMPRESSORS[COMPRESSION[media_type]](raw)):
            needed += entry.stored if entry.isreg() else 0
    return Error(
        f"{layer}: disk full in {rootfs}: the layer unpacks to {needed} bytes and {free} bytes are free",
        "free some space and run the same command again; the layers already applied are kept",
    )


def apply_members(stream: VerifyingReader, tree: Tree, skipped: Skipped, layer: str) -> None:
    reader = TarReader(stream)
    try:
        for entry in reader:
            try:
                apply_member(reader, entry, tree, skipped)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise  # apply_layer says how much space the layer needs
                raise Error(f"{layer}: member {shorten(entry.name)}: {describe_os_error(err)}") from None
    except RecordTooLarge as err:
        raise Error(f"{layer}: refused: {err}", "the layer is malformed or hostile") from None
    except TarError as err:
        raise Error(f"{layer}: corrupt tar data ({shorten(str(err))})") from None


def apply_member(reader: TarReader, entry: Member, tree: Tree, skipped: Skipped) -> None:
    if WHITEOUT in entry.name:  # a whiteout, or a reserved name (cleaning a name joins none of its parts)
        parents, _, base = clean(entry.name).rpartition("/")
        if any(part.startswith(WHITEOUT) for part in parents.split("/")):
            return  # inside a reserved name (AUFS metadata such as .wh..wh.plnk/ in old layers): not content
        if base.startswith(WHITEOUT):
            apply_whiteout(entry.name, base, tree)
            return
    with tree.parent(entry.name) as place:
        if not place.path and not entry.isdir():
            raise IsADirectoryError(errno.EISDIR, "refusing to turn the root into a non-directory")
        if entry.isreg():  # the common case first; as in tar, so is any unknown type
            write_file(reader, entry, tree, place, skipped)
        elif entry.islnk():
            tree.hard_link(place, entry.linkname)  # no metadata: it is the target's
        elif entry.isdevice() and tree.rootless:
            tree.clear(place.fd, place.name)  # the layer says something else is there: the old entry goes at least
            skipped.devices += 1
        elif entry.isdir():
            owner = tree.make_dir(place, entry.mode)
            # Owner rwx until finish() puts the mode and times: children may follow, in this layer's later entries.
            # Set now only setuid, setgid and sticky bits, which entries made inside may inherit.
            mode = entry.mode | OWNER_RWX if entry.mode & 0o7000 else None
            set_metadata(place.name, place.fd, entry, mode, tree, skipped, owner)
            tree.set_dir_later(place, entry.mode, mtime_ns(entry))
        else:  # a symlink, a device or a FIFO
            tree.clear(place.fd, place.name)
            make_node(place, entry)
            mode = None if entry.issym() else entry.mode  # a symlink has no mode of its own
            set_metadata(place.name, place.fd, entry, mode, tree, skipped, tree.made_owner)
            os.utime(place.name, ns=(mtime_ns(entry),) * 2, dir_fd=place.fd, follow_symlinks=False)


def make_node(place: Place, entry: Member) -> None:
    if entry.issym():
        os.symlink(entry.linkname, place.name, dir_fd=place.fd)  # any target: it is never followed here
    elif entry.isfifo():
        os.mkfifo(place.name, 0o600, dir_fd=place.fd)
    else:
        kind = stat.S_IFCHR if entry.kind == CHAR else stat.S_IFBLK
        os.mknod(place.name, kind | 0o600, os.makedev(entry.devmajor, entry.devminor), dir_fd=place.fd)


def write_file(reader: TarReader, entry: Member, tree: Tree, place: Place, skipped: Skipped) -> None:
    """Created afresh (never through what was there: a lower layer's hard link keeps its content), written, and
    given its metadata through the open descriptor. A run killed half-way may leave a partly written file: the
    next run of this layer replaces it, as it replaces every entry of it."""
    mode = entry.mode & 0o777  # made with its mode (a read-only one too: the new descriptor still writes)
    try:
        fd = os.open(place.name, FILE_FLAGS, mode, dir_fd=place.fd)
    except FileExistsError:
        tree.clear(place.fd, place.name)
        fd = os.open(place.name, FILE_FLAGS, mode, dir_fd=place.fd)
    try:
        for offset, piece in reader.extents(entry):
            while piece:  # once, but where the disk fills up
                written = os.pwrite(fd, piece, offset)
                piece, offset = piece[written:], offset + written
        if entry.sparse is not None:
            os.ftruncate(fd, entry.size)  # the holes are left unwritten: sparse where the filesystem allows
        # chmod only where the umask took bits away, or for setuid, setgid and sticky bits (chown clears them)
        mode = entry.mode if entry.mode & (tree.umask | 0o7000) else None
        set_metadata(fd, None, entry, mode, tree, skipped, tree.made_owner)
        os.utime(fd, ns=(mtime_ns(entry),) * 2)
    finally:
        os.close(fd)


def set_metadata(
    target: str | int, dir_fd: int | None, entry: Member, mode: int | None, tree: Tree, skipped: Skipped, owner: tuple
) -> None:
    """On the open file `target`, or on the entry named `target` in `dir_fd` (not followed), owned by `owner` now
    (empty: not known). Owner first (chown clears setuid bits), then attributes and mode (None: as it is, for a
    symlink or a file made with it); the caller puts times on last (a folder's: finish(), after its children)."""
    by_name = {} if dir_fd is None else {"dir_fd": dir_fd, "follow_symlinks": False}
    if tree.rootless:
        skipped.owners += bool(entry.uid or entry.gid)
    elif (entry.uid, entry.gid) != owner:
        os.chown(target, entry.uid, entry.gid, **by_name)
    if entry.xattrs:
        # setxattr takes no directory fd, but /proc resolves this one without following
        set_xattrs(target if dir_fd is None else f"/proc/self/fd/{dir_fd}/{target}", entry, skipped)
    if mode is not None:
        os.chmod(target, mode, **by_name)


def set_xattrs(target: str | int, entry: Member, skipped: Skipped) -> None:
    for key, value in entry.xattrs.items():
        try:
            os.setxattr(target, key, value, follow_symlinks=isinstance(target, int))  # an fd is never a link
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP):  # privileged (trusted.*, security.*)
                raise
            skipped.xattrs += 1


def mtime_ns(entry: Member) -> int:
    """The entry's mtime in nanoseconds, exactly: a pax record may give nine decimals or more (cut toward zero,
    as Go's archive/tar does). A malformed time, or one the system cannot store, is refused."""
    if isinstance(entry.mtime, int) and abs(entry.mtime) < MAX_SECONDS:
        return entry.mtime * 1_000_000_000  # the header's whole seconds: the common case
    try:
        seconds = Decimal(entry.mtime)
    except InvalidOperation:
        seconds = Decimal("NaN")
    if not (seconds.is_finite() and seconds.copy_abs() < MAX_SECONDS):  # no arithmetic yet: "1e999999999" is cheap
        raise OSError(errno.ERANGE, f"modification time {str(entry.mtime)!r} is not one the system can store")
    return int(seconds.scaleb(9, NANOSECONDS))


def apply_whiteout(name: str, base: str, tree: Tree) -> None:
    if base == OPAQUE:
        place = tree.find(name)
        if place is not None:
            with place:
                tree.hide_children(place.fd, place.path.split("/")[:-1])
        return
    if base.startswith(WHITEOUT + WHITEOUT):
        return  # AUFS metadata (.wh..wh.aufs, .wh..wh.plnk), as Docker skips it
    hidden = base.removeprefix(WHITEOUT)
    if hidden in ("", ".", ".."):
        raise OSError(errno.EINVAL, f"refusing to white out {hidden!r}")
    place = tree.find(f"{name.rpartition('/')[0]}/{hidden}")
    if place is not None:
        with place:
            tree.hide(place)


def describe_os_error(err: OSError) -> str:
    return f"{err.strerror}: {shorten(str(err.filename))}" if err.filename else str(err.strerror or err)


def shorten(name: str) -> str:
    return name if len(name) <= 2 * SHOWN else f"{name[:SHOWN]}...{name[-SHOWN:]}"
