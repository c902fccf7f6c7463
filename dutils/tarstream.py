"""A streaming tar reader for layers: entries one at a time, none kept once passed, every header record capped.

Python's tarfile keeps every member it read (611 MB for a million entries) and reads a pax record or a GNU long
name whole, whatever size its header claims. This reader holds one entry at a time and refuses a header record
larger than 1 MiB, as Go's archive/tar (umoci's reader) does, before reading any of it. It reads what layers
hold: ustar, pax (local and global records) and GNU tar (long names and links, base-256 numbers, sparse files in
the old GNU format and in pax 0.0, 0.1 and 1.0, read as Go's archive/tar reads them, their maps capped).
"""

import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator

BLOCK = 512
MAX_RECORD = 1 << 20  # bytes in one pax record set or GNU long name: Go's archive/tar maxSpecialFileSize
BUFFER = 1 << 20
MAX_SPARSE_SIZE = 1 << 40  # bytes a sparse file may claim, holes included: no layer holds more than this
MAX_DIGITS = 40  # of a number in a pax record: 2**64 has 20, a time to the nanosecond past 1e19 s has 30

REGULAR, HARD_LINK, SYMLINK, CHAR, BLOCK_DEVICE, DIRECTORY, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
LINKS = (HARD_LINK, SYMLINK)
DEVICES = (CHAR, BLOCK_DEVICE)
HEADER_ONLY = {HARD_LINK, SYMLINK, CHAR, BLOCK_DEVICE, DIRECTORY, FIFO}  # no data follows, whatever `size` says
PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX = b"x", b"g", b"X"
LONG_NAME, LONG_LINK, SPARSE = b"L", b"K", b"S"
RECORDS = {PAX_LOCAL, SOLARIS_PAX, PAX_GLOBAL, LONG_NAME, LONG_LINK}  # headers that extend the next entry's
ZEROS = bytes(BLOCK)
USTAR = b"ustar\x0000"  # POSIX magic and version: only this format has the name prefix field
XATTR = "SCHILY.xattr."
# What a pax global record may set for every later entry: a name, link target, size or attribute given to them all
# would make them one, and Go's archive/tar (umoci, containerd) applies no global record at all.
GLOBAL_KEYS = ("uid", "gid", "mtime")
NAMES = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())  # os.fsdecode's, without its checks
# mode, uid, gid, size, mtime and checksum as GNU tar, Go and Python write them: octal digits, each field ended by
# a NUL (the checksum's by a NUL and a space). Told by one translation (every octal digit to 0), read by one unpack.
USUAL = b"0000000\0" * 3 + b"00000000000\0" * 2 + b"000000\0 "
OCTAL_TO_ZERO = bytes.maketrans(b"1234567", b"0000000")
USUAL_FIELDS = struct.Struct("7sx7sx7sx11sx11sx6s")
OCTAL = (8,) * 6  # int's base, for each
FIELDS = ((100, 108, "mode"), (108, 116, "uid"), (116, 124, "gid"), (124, 136, "size"), (136, 148, "mtime"))


class TarError(Exception):
    """The data is not a tar archive this reader accepts; the message says why, in one line."""


class RecordTooLarge(TarError):
    """A header record over MAX_RECORD: refused before it is read."""


class Member:
    """One member. `mtime` is the header's whole seconds (int) or a pax record's decimal text (str)."""

    sparse: list[tuple[int, int]] | None = None  # a sparse file's (offset, length) regions of data
    devmajor = devminor = 0

    def __init__(self, kind: bytes, numbers: list[int]) -> None:
        self.kind, (self.mode, self.uid, self.gid, self.size, self.mtime) = kind, numbers
        self.mode &= 0o7777
        self.xattrs: dict[str, bytes] = {}

    def isdir(self) -> bool:
        return self.kind == DIRECTORY

    def issym(self) -> bool:
        return self.kind == SYMLINK

    def islnk(self) -> bool:
        return self.kind == HARD_LINK

    def isdevice(self) -> bool:
        return self.kind in DEVICES

    def isfifo(self) -> bool:
        return self.kind == FIFO

    def isreg(self) -> bool:
        """As in tar, any type this reader does not know is a regular file with its data."""
        return self.kind not in HEADER_ONLY


class TarReader:
    """Iterate over the entries of the tar stream `stream` (anything with read(n)); read each one's data with
    `chunks()` before going on (what is left unread is skipped)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buffer, self.offset = b"", 0
        self.unread = 0  # data bytes of the current entry not yet read, plus its padding to a block
        self.globals: dict[str, bytes] = {}  # pax global records of GLOBAL_KEYS, checked once, for every later entry

    def __iter__(self) -> Iterator[Member]:
        while True:
            if self.unread:
                self.skip(self.unread)
            entry = self.next_entry()
            if entry is None:
                return
            yield entry

    def extents(self, entry: Member) -> Iterable[tuple[int, bytes]]:
        """The data of `entry`, the current entry, in pieces of at most BUFFER bytes, each with its offset in the
        file (a sparse file's holes are between them)."""
        start, end = self.offset, self.offset + self.unread
        if entry.sparse is None and end <= len(self.buffer):  # the usual small file: in the buffer, padding too
            self.offset, self.unread = end, 0
            return [(0, self.buffer[start : start + entry.stored])] if entry.stored else []
        return self.pieces(entry)

    def pieces(self, entry: Member) -> Iterator[tuple[int, bytes]]:
        for offset, length in entry.sparse if entry.sparse is not None else [(0, entry.stored)]:
            while length:
                piece = self.take_some(min(length, BUFFER))
                if not piece:
                    raise TarError(f"{entry.name}: unexpected end of data")
                yield offset, piece
                offset, length = offset + len(piece), length - len(piece)
                self.unread -= len(piece)

    # -- headers

    def next_entry(self) -> Member | None:
        """The next member, its extended records applied, or None at the end of the archive."""
        records: dict[str, bytes] = {}
        long_name = long_link = None
        while True:
            block = self.take_header()
            if block is None:
                return None
            kind, numbers = block[156:157], header_numbers(block)
            if kind in RECORDS:
                data = self.take_record(numbers[3], kind)
                if kind == PAX_GLOBAL:
                    self.globals.update(global_records(parse_pax(data)))
                elif kind in (PAX_LOCAL, SOLARIS_PAX):
                    records = parse_pax(data)
                elif kind == LONG_NAME:
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            entry = make_member(
                block, kind, numbers, long_name, long_link, self.globals | records if self.globals else records
            )
            entry.stored = entry.size  # bytes of data in the archive (a sparse file's are fewer than its size)
            if kind == SPARSE or records and any(key.startswith("GNU.sparse.") for key in records):
                self.read_sparse(entry, block, records)
            self.unread = entry.stored + -entry.stored % BLOCK if entry.kind not in HEADER_ONLY else 0
            return entry

    def read_sparse(self, entry: Member, block: bytes, records: dict[str, bytes]) -> None:
        """A GNU sparse file as Go's archive/tar reads it, its map in the header and extension blocks (old GNU format),
        pax records (0.0, 0.1) or before the data (1.0); unknown versions are regular files, as Go reads them."""
        version = (records.get("GNU.sparse.major"), records.get("GNU.sparse.minor"))
        if entry.kind == SPARSE:
            entry.kind, entry.size = REGULAR, number(block[483:495], "sparse real size")
            numbers, extended, read = old_gnu_map(block[386:482]), block[482], 0
            while extended:
                if read >= MAX_RECORD:
                    raise RecordTooLarge(f"{entry.name}: a GNU sparse map larger than {MAX_RECORD} bytes")
                block, read = self.take_exactly(BLOCK), read + BLOCK
                numbers += old_gnu_map(block[:504])
                extended = block[504]
        elif version == (b"1", b"0"):
            numbers = self.sparse_map_in_data(entry)
        elif version in ((b"0", b"0"), (b"0", b"1")) or (version == (None, None) and records.get("GNU.sparse.map")):
            numbers = [decimal(n, "GNU.sparse.map") for n in records.get("GNU.sparse.map", b"").split(b",") if n]
            if len(numbers) != 2 * decimal(records.get("GNU.sparse.numblocks", b"0"), "GNU.sparse.numblocks"):
                raise TarError(f"{entry.name}: a GNU sparse map of another length than its numblocks")
        else:
            return
        if records.get("GNU.sparse.name"):
            entry.name = os.fsdecode(records["GNU.sparse.name"])
        size = records.get("GNU.sparse.size") or records.get("GNU.sparse.realsize")
        entry.size = decimal(size, "GNU.sparse.size") if size else entry.size
        entry.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))
        check_sparse(entry)

    def sparse_map_in_data(self, entry: Member) -> list[int]:
        """pax 1.0: decimal lines (how many regions, then each one's offset and length) in blocks before the data."""
        blocks, lines, count = [], 0, None
        while count is None or lines < 1 + 2 * count:
            if len(blocks) * BLOCK >= min(MAX_RECORD, entry.stored):
                raise RecordTooLarge(f"{entry.name}: a GNU sparse map larger than {MAX_RECORD} bytes, or its data")
            blocks.append(self.take_exactly(BLOCK))
            lines += blocks[-1].count(b"\n")
            if count is None and lines:
                count = decimal(b"".join(blocks).partition(b"\n")[0], "GNU sparse map")
        entry.stored -= len(blocks) * BLOCK
        numbers = b"".join(blocks).split(b"\n")[1 : 1 + 2 * count]
        return [decimal(n, "GNU sparse map") for n in numbers]

    def take_header(self) -> bytes | None:
        """The next header block; None at the end: a zero block, or the end of the data on a block boundary."""
        block = self.take_some(BLOCK)
        if 0 < len(block) < BLOCK:
            block += self.take_exactly(BLOCK - len(block))
        return block if block and block != ZEROS else None

    def take_record(self, size: int, kind: bytes) -> bytes:
        """A pax record set or a GNU long name, refused before it is read when larger than MAX_RECORD."""
        if size > MAX_RECORD:
            what = "GNU long name" if kind in (LONG_NAME, LONG_LINK) else "pax header record"
            raise RecordTooLarge(f"a {what} of {size} bytes, larger than the {MAX_RECORD}-byte limit")
        data = self.take_exactly(size)
        self.skip(-size % BLOCK)
        return data

    # -- the byte stream

    def take_some(self, size: int) -> bytes:
        """Up to `size` bytes (fewer only where the buffer or the stream ends; empty at the end)."""
        if self.offset == len(self.buffer):
            self.buffer, self.offset = self.stream.read(BUFFER), 0
        piece = self.buffer[self.offset : self.offset + size]
        self.offset += len(piece)
        return piece

    def take_exactly(self, size: int) -> bytes:
        pieces, left = [], size
        while left:
            piece = self.take_some(left)
            if not piece:
                raise TarError("unexpected end of data")
            pieces.append(piece)
            left -= len(piece)
        return b"".join(pieces)

    def detach_data(self) -> tuple[int, int]:
        """For a stream the caller positions itself: how many bytes were read ahead of the current entry's data, and
        how many of its data (and padding) are unread; both forgotten, so that the next header is read afresh."""
        ahead, unread = len(self.buffer) - self.offset, self.unread
        self.buffer, self.offset, self.unread = b"", 0, 0
        return ahead, unread

    def skip(self, size: int) -> None:
        while size:
            piece = self.take_some(min(size, BUFFER))
            if not piece:
                raise TarError("unexpected end of data")
            size -= len(piece)
        self.unread = 0


def make_member(
    block: bytes, kind: bytes, numbers: list[int], long_name: bytes | None, long_link: bytes | None, records: dict
) -> Member:
    name = long_name if long_name is not None else text(block[0:100])
    if long_name is None and block[345] and block[257:265] == USTAR:
        name = text(block[345:500]) + b"/" + name
    if kind == b"\0":  # old tars: a regular file, or a directory when the name ends in a slash (as Go reads it)
        kind = DIRECTORY if name.endswith(b"/") else REGULAR
    entry = Member(kind, numbers)
    link = long_link if long_link is not None else text(block[157:257]) if kind in LINKS else b""
    if kind in DEVICES:
        entry.devmajor, entry.devminor = number(block[329:337], "devmajor"), number(block[337:345], "devminor")
    if records:
        apply_records(entry, records, name, link)
    else:
        entry.name, entry.linkname = name.decode(*NAMES), link.decode(*NAMES)
    if kind == DIRECTORY:
        entry.name = entry.name.rstrip("/") or "/"  # named as tar lists it, in messages too
    return entry


def apply_records(entry: Member, records: dict[str, bytes], name: bytes, link: bytes) -> None:
    """pax records override the header's fields; extended attributes come only from them."""
    if any(b"\0" in records.get(key, b"") for key in ("path", "linkpath")) or any("\0" in key for key in records):
        raise TarError(f"{os.fsdecode(name)}: a NUL byte in a pax name, link target or attribute name")
    entry.name = os.fsdecode(records.get("path", name))
    entry.linkname = os.fsdecode(records.get("linkpath", link))
    for key in ("uid", "gid", "size"):
        if key in records:
            setattr(entry, key, decimal(records[key], f"pax {key} record"))
    if records.get("mtime"):  # an empty record means the header field
        entry.mtime = records["mtime"].decode("ascii", "replace")
    entry.xattrs = {key.removeprefix(XATTR): value for key, value in records.items() if key.startswith(XATTR)}


def text(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def header_numbers(block: bytes) -> list[int]:
    """The header's mode, uid, gid, size and mtime, its checksum checked first (as unsigned bytes, as POSIX says,
    or as signed ones, as some old tars wrote it)."""
    if block[100:156].translate(OCTAL_TO_ZERO) == USUAL:
        *numbers, stored = map(int, USUAL_FIELDS.unpack_from(block, 100), OCTAL)
    else:
        numbers, stored = [], number(block[148:156], "checksum")
    # adler32's low half is 1 + the sum of the bytes modulo 65521: exact for 256 bytes, and 3 times faster than sum()
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    unsigned += 8 * 32 - sum(block[148:156])  # the checksum field counted as spaces, as POSIX says
    if stored != unsigned and stored != unsigned - 256 * sum(byte >= 0x80 for byte in block[:148] + block[156:]):
        raise TarError("bad header checksum: not a tar archive, or a damaged one")  # nor as signed bytes (old tars)
    if numbers:
        return numbers
    numbers = [number(block[start:end], what) for start, end, what in FIELDS]
    if min(numbers[1:4]) < 0:  # base-256 can say so; pax records cannot
        raise TarError("negative owner or size in a header")
    return numbers


def number(field: bytes, what: str) -> int:
    """A numeric header field: octal digits padded with spaces or NULs (as Go trims them), or GNU's base-256."""
    digits = field.strip(b" \0")
    if digits.isdigit():  # the common case first. isdigit: no sign, no underscores, which int() would take
        try:
            return int(digits, 8)
        except ValueError:
            raise TarError(f"invalid {what} field {digits!r} in a header") from None
    if field[0] & 0x80:
        if field[0] & 0x40:  # negative, two's complement
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    if digits:
        raise TarError(f"invalid {what} field {digits!r} in a header")
    return 0


def parse_pax(data: bytes) -> dict[str, bytes]:
    """pax records, `LENGTH KEY=VALUE\\n` each; trailing NUL padding is allowed."""
    records, offset, regions = {}, 0, []
    while offset < len(data) and data[offset] != 0:
        space = data.find(b" ", offset, offset + 20)
        length = data[offset:space]
        if space < 0 or not length.isdigit() or int(length) < space - offset + 3:
            raise TarError("malformed pax header record")
        end = offset + int(length)
        record = data[space + 1 : end]
        key, equals, value = record.partition(b"=")
        if end > len(data) or not record.endswith(b"\n") or not equals:
            raise TarError("malformed pax header record")
        name, value = key.decode("utf-8", "surrogateescape"), value[:-1]
        if name in ("GNU.sparse.offset", "GNU.sparse.numbytes"):  # pax 0.0: repeated, in pairs, in order
            if (name == "GNU.sparse.offset") != (len(regions) % 2 == 0) or b"," in value:
                raise TarError("malformed GNU sparse map in a pax header")
            regions.append(value)
        else:
            records[name] = value
        offset = end
    if regions:
        records["GNU.sparse.map"] = b",".join(regions)
    return records


def global_records(records: dict[str, bytes]) -> dict[str, bytes]:
    """The records of a pax global header that later entries take, checked here once: a few short numbers."""
    kept = {key: records[key] for key in GLOBAL_KEYS if records.get(key)}
    for key, value in kept.items():
        if len(value) > MAX_DIGITS or key != "mtime" and not value.isdigit():
            raise TarError(f"invalid pax {key} record {value[:40]!r}")
    return kept


def decimal(value: bytes, what: str) -> int:
    if not value.isdigit() or len(value) > MAX_DIGITS:  # no number of a header is longer; int() is quadratic
        raise TarError(f"invalid {what} {value[:40]!r}")
    return int(value)


def old_gnu_map(field: bytes) -> list[int]:
    """Offsets and lengths of the old GNU format, 12 octal bytes each, up to the first empty offset."""
    end = next((at for at in range(0, len(field), 24) if field[at] == 0), len(field))
    return [number(field[at : at + 12], "sparse map") for at in range(0, end, 12)]


def check_sparse(entry: Member) -> None:
    """Regions in order, apart, inside a real size of at most MAX_SPARSE_SIZE, adding up to the data stored."""
    if not 0 <= entry.size <= MAX_SPARSE_SIZE:
        raise TarError(f"{entry.name}: a sparse file of {entry.size} bytes, over the {MAX_SPARSE_SIZE}-byte limit")
    end = total = 0
    for offset, length in entry.sparse:
        if offset < end or length < 0 or offset + length > entry.size:
            raise TarError(f"{entry.name}: a GNU sparse map out of order or past the file's size")
        end, total = offset + length, total + length
    if total != entry.stored:
        raise TarError(f"{entry.name}: a GNU sparse map of {total} bytes of data, where {entry.stored} are stored")
