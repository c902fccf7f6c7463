"""A streaming tar reader for layers: entries one at a time, none kept once passed, every header record capped.

Python's tarfile keeps every member it read (611 MB for a million entries) and reads a pax record or a GNU long
name whole, whatever size its header claims. This reader holds one entry at a time and refuses a header record
larger than 1 MiB, as Go's archive/tar (umoci's reader) does, before reading any of it. It reads what layers
hold: ustar, pax (local and global records) and GNU tar (long names and links, base-256 numbers); GNU sparse
files, which no image builder writes, are refused.
"""

import os
from collections.abc import Iterator

BLOCK = 512
MAX_RECORD = 1 << 20  # bytes in one pax record set or GNU long name: Go's archive/tar maxSpecialFileSize
BUFFER = 1 << 20

REGULAR, HARD_LINK, SYMLINK, CHAR, BLOCK_DEVICE, DIRECTORY, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
LINKS = (HARD_LINK, SYMLINK)
HEADER_ONLY = {HARD_LINK, SYMLINK, CHAR, BLOCK_DEVICE, DIRECTORY, FIFO}  # no data follows, whatever `size` says
PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX = b"x", b"g", b"X"
LONG_NAME, LONG_LINK, SPARSE = b"L", b"K", b"S"
USTAR = b"ustar\x0000"  # POSIX magic and version: only this format has the name prefix field
XATTR = "SCHILY.xattr."


class TarError(Exception):
    """The data is not a tar archive this reader accepts; the message says why, in one line."""


class RecordTooLarge(TarError):
    """A header record over MAX_RECORD: refused before it is read."""


class Member:
    """One member. `mtime` is the header's whole seconds (int) or a pax record's decimal text (str)."""

    __slots__ = ("name", "kind", "mode", "uid", "gid", "size", "mtime", "linkname", "devmajor", "devminor", "xattrs")

    def __init__(self) -> None:
        self.xattrs: dict[str, bytes] = {}

    def isdir(self) -> bool:
        return self.kind == DIRECTORY

    def issym(self) -> bool:
        return self.kind == SYMLINK

    def islnk(self) -> bool:
        return self.kind == HARD_LINK

    def isdevice(self) -> bool:
        return self.kind in (CHAR, BLOCK_DEVICE)

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
        self.globals: dict[str, bytes] = {}  # pax global records, applied to every later entry

    def __iter__(self) -> Iterator[Member]:
        while True:
            self.skip(self.unread)
            entry = self.next_entry()
            if entry is None:
                return
            yield entry

    def chunks(self, entry: Member) -> Iterator[bytes]:
        """The data of `entry`, the current entry, in pieces of at most BUFFER bytes."""
        left = entry.size
        while left:
            piece = self.take_some(min(left, BUFFER))
            if not piece:
                raise TarError(f"{entry.name}: unexpected end of data")
            left -= len(piece)
            self.unread -= len(piece)
            yield piece

    # -- headers

    def next_entry(self) -> Member | None:
        """The next member, its extended records applied, or None at the end of the archive."""
        records: dict[str, bytes] = {}
        long_name = long_link = None
        while True:
            block = self.take_header()
            if block is None:
                return None
            kind = block[156:157]
            size = number(block[124:136], "size")
            if size < 0:
                raise TarError("negative size in a header")
            if kind in (PAX_LOCAL, SOLARIS_PAX, PAX_GLOBAL, LONG_NAME, LONG_LINK):
                data = self.take_record(size, kind)
                if kind == PAX_GLOBAL:
                    self.globals.update(parse_pax(data))
                    if sum(len(k) + len(v) for k, v in self.globals.items()) > MAX_RECORD:
                        raise TarError(f"pax global records larger than {MAX_RECORD} bytes in all")
                elif kind in (PAX_LOCAL, SOLARIS_PAX):
                    records = parse_pax(data)
                elif kind == LONG_NAME:
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            if kind == SPARSE:
                raise TarError("GNU sparse files are not supported")
            entry = make_member(
                block, kind, size, long_name, long_link, self.globals | records if self.globals else records
            )
            self.unread = entry.size + -entry.size % BLOCK if entry.isreg() else 0
            return entry

    def take_header(self) -> bytes | None:
        """The next header block; None at the end: a zero block, or the end of the data on a block boundary."""
        block = self.take_some(BLOCK)
        if not block:
            return None
        if len(block) < BLOCK:
            block += self.take_exactly(BLOCK - len(block))
        if block.count(0) == BLOCK:
            return None
        check_sum(block)
        return block

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

    def skip(self, size: int) -> None:
        while size:
            piece = self.take_some(min(size, BUFFER))
            if not piece:
                raise TarError("unexpected end of data")
            size -= len(piece)
        self.unread = 0


def make_member(
    block: bytes, kind: bytes, size: int, long_name: bytes | None, long_link: bytes | None, records: dict
) -> Member:
    entry = Member()
    name = long_name if long_name is not None else text(block[0:100])
    if long_name is None and block[257:265] == USTAR and block[345] != 0:
        name = text(block[345:500]) + b"/" + name
    if kind == b"\0":  # old tars: a regular file, or a directory when the name ends in a slash (as Go reads it)
        kind = DIRECTORY if name.endswith(b"/") else REGULAR
    entry.kind, entry.size = kind, size
    link = long_link if long_link is not None else text(block[157:257]) if kind in LINKS else b""
    entry.mode = number(block[100:108], "mode") & 0o7777
    entry.uid, entry.gid = number(block[108:116], "uid"), number(block[116:124], "gid")
    entry.mtime = number(block[136:148], "mtime")
    if entry.isdevice():
        entry.devmajor, entry.devminor = number(block[329:337], "devmajor"), number(block[337:345], "devminor")
    else:
        entry.devmajor = entry.devminor = 0
    if records:
        apply_records(entry, records, name, link)
    else:
        entry.name, entry.linkname = os.fsdecode(name), os.fsdecode(link)
    if kind == DIRECTORY:
        entry.name = entry.name.rstrip("/") or "/"  # named as tar lists it, in messages too
    if entry.uid < 0 or entry.gid < 0 or entry.size < 0:
        raise TarError(f"{entry.name}: negative owner or size in its header")
    return entry


def apply_records(entry: Member, records: dict[str, bytes], name: bytes, link: bytes) -> None:
    """pax records override the header's fields; extended attributes come only from them."""
    if any(key.startswith("GNU.sparse.") for key in records):
        raise TarError(f"{os.fsdecode(name)}: GNU sparse files are not supported")
    if any(b"\0" in records.get(key, b"") for key in ("path", "linkpath")) or any("\0" in key for key in records):
        raise TarError(f"{os.fsdecode(name)}: a NUL byte in a pax name, link target or attribute name")
    entry.name = os.fsdecode(records.get("path", name))
    entry.linkname = os.fsdecode(records.get("linkpath", link))
    for key in ("uid", "gid", "size"):
        if key in records:
            setattr(entry, key, decimal(records, key))
    if records.get("mtime"):  # an empty record means the header field
        entry.mtime = records["mtime"].decode("ascii", "replace")
    entry.xattrs = {key.removeprefix(XATTR): value for key, value in records.items() if key.startswith(XATTR)}


def text(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def number(field: bytes, what: str) -> int:
    """A numeric header field: octal digits padded with spaces or NULs (as Go trims them), or GNU's base-256."""
    if field[0] & 0x80:
        if field[0] & 0x40:  # negative, two's complement
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.strip(b" \0")
    if not digits:
        return 0
    if not digits.isdigit():  # isdigit: no sign, no underscores, which int() would take
        raise TarError(f"invalid {what} field {digits!r} in a header")
    try:
        return int(digits, 8)
    except ValueError:
        raise TarError(f"invalid {what} field {digits!r} in a header") from None


def check_sum(block: bytes) -> None:
    """The header checksum, as unsigned bytes (POSIX) or as signed ones (some old tars)."""
    stored = number(block[148:156], "checksum")
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(byte >= 0x80 for byte in block[:148] + block[156:]):
        raise TarError("bad header checksum: not a tar archive, or a damaged one")


def parse_pax(data: bytes) -> dict[str, bytes]:
    """pax records, `LENGTH KEY=VALUE\\n` each; trailing NUL padding is allowed."""
    records, offset = {}, 0
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
        records[key.decode("utf-8", "surrogateescape")] = value[:-1]
        offset = end
    return records


def decimal(records: dict[str, bytes], key: str) -> int:
    value = records[key]
    if not value.isdigit():
        raise TarError(f"invalid pax {key} record {value[:40]!r}")
    return int(value)
