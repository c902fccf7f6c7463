"""tarstream: reads what tarfile reads (ustar, pax, GNU, as tarfile and GNU tar write them), keeps nothing,
and refuses what it cannot read in one line."""

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from catalogue import SPARSE_FORMATS, SPARSE_IDS, catalogue, gnu_sparse_tar, sparse_source
from malicious import END, file_entry, pax_record, ustar_header

from dutils.tarstream import MAX_RECORD, RecordTooLarge, TarError, TarReader


def read_all(data: bytes) -> list[tuple]:
    """Every entry of `data` as a tuple of its fields, its content included (a sparse file's holes as zeros)."""
    reader = TarReader(io.BytesIO(data))
    return [
        (e.name, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.linkname, e.devmajor, e.devminor, e.xattrs, content)
        for e in reader
        for content in [content_of(reader, e) if e.isreg() else None]
    ]


def content_of(reader: TarReader, entry) -> bytes:
    content = bytearray(entry.size)
    for offset, piece in reader.extents(entry):
        content[offset : offset + len(piece)] = piece
    return bytes(content)


def read_with_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [
            (
                info.name,
                info.type if info.type not in (tarfile.AREGTYPE, tarfile.GNUTYPE_SPARSE) else tarfile.REGTYPE,
                info.mode,
                info.uid,
                info.gid,
                info.size if info.isreg() else info.size,
                info.pax_headers.get("mtime") or int(info.mtime),
                info.linkname if info.issym() or info.islnk() else "",
                info.devmajor if info.ischr() or info.isblk() else 0,
                info.devminor if info.ischr() or info.isblk() else 0,
                {
                    key.removeprefix("SCHILY.xattr."): value.encode("utf-8", "surrogateescape")
                    for key, value in info.pax_headers.items()
                    if key.startswith("SCHILY.xattr.")
                },
                archive.extractfile(info).read() if info.isreg() else None,
            )
            for info in archive
        ]


@pytest.mark.parametrize("index", range(len(catalogue())))
def test_catalogue_layers_read_as_tarfile_reads_them(index: int) -> None:
    data = catalogue()[index].to_bytes()
    assert read_all(data) == read_with_tarfile(data)


@pytest.mark.parametrize("tar_format", ["gnu", "ustar", "posix"])
def test_gnu_tar_archives_read_as_tarfile_reads_them(tar_format: str, tmp_path: Path) -> None:
    """Long names (split into ustar's prefix, or in GNU or pax records) and link targets, a big owner id, a fifo,
    as GNU tar writes them in each format."""
    source = tmp_path / "source"
    repeat = 2 if tar_format == "ustar" else 10  # ustar holds 100 bytes of link target
    deep = source / ("long-folder-name-" * repeat) / ("and-another-" * repeat)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"content")
    (source / ("p" * 90) / ("q" * 90)).mkdir(parents=True)  # a name that ustar splits into prefix and name
    (source / ("p" * 90) / ("q" * 90) / "file").write_bytes(b"in a long path")
    (source / "link").symlink_to((deep / "file").relative_to(source))
    (source / "hard").hardlink_to(deep / "file")
    subprocess.run(["mkfifo", str(source / "fifo")], check=True)
    archive = tmp_path / "archive.tar"
    owner = ["--owner=3000000:3000000"] if tar_format == "gnu" else []
    command = ["tar", f"--format={tar_format}", *owner, "-cf", str(archive), "-C", str(source), "."]
    subprocess.run(command, check=True)
    data = archive.read_bytes()
    assert read_all(data) == read_with_tarfile(data)


@pytest.mark.parametrize(("tar_format", "version"), SPARSE_FORMATS, ids=SPARSE_IDS)
def test_gnu_tar_sparse_files_read_as_tarfile_reads_them(tar_format: str, version: str | None, tmp_path: Path) -> None:
    data = gnu_sparse_tar(sparse_source(tmp_path), tar_format, version)
    assert b"GNU.sparse" in data or tar_format == "gnu"
    ours = read_all(data)
    assert ours == read_with_tarfile(data)
    assert {name: len(content) for name, kind, *_, content in ours if kind == b"0"} == {
        "./holes": 16 << 20,
        "./all-hole": 3 << 20,
        "./dense": 8000,
    }


def test_numbers_in_base_256_and_old_directories() -> None:
    header = bytearray(ustar_header(b"old-dir/", b"\0"))
    header[108:116] = b"\x80" + (3_000_000_000).to_bytes(7, "big")  # GNU base-256 uid
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    [entry] = TarReader(io.BytesIO(bytes(header) + END))
    assert (entry.name, entry.isdir(), entry.uid) == ("old-dir", True, 3_000_000_000)


def with_numbers(header: bytes, **fields: bytes) -> bytes:
    """`header` with numeric fields (mode, uid, size, checksum) written as given, its checksum put right unless given."""
    block = bytearray(header)
    for name, value in fields.items():
        start = {"mode": 100, "uid": 108, "size": 124, "checksum": 148}[name]
        block[start : start + len(value)] = value
    if "checksum" not in fields:
        block[148:156] = b" " * 8
        block[148:156] = b"%07o\0" % sum(block[:512])  # seven digits: not the usual form either
    return bytes(block)


def test_numbers_in_the_forms_other_tars_write() -> None:
    """Padded with spaces (old GNU tar), NULs or nothing: read field by field, as the usual form is read at once."""
    usual = ustar_header(b"f", size=3, mode=0o755) + b"abc" + bytes(509) + END
    other = with_numbers(usual, mode=b"   755 \0", uid=b"0000000 ", size=b"00000000003 ")
    assert read_all(other) == read_all(usual)
    assert (
        read_all(with_numbers(ustar_header(b"f", size=9) + END, size=b"\0" * 12))[0][5] == 0
    )  # no digits: zero, as Go reads it


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01" * 1024, "checksum"),
        (with_numbers(ustar_header(b"f"), mode=b"+000755\0") + END, "invalid mode field"),  # int() takes a sign
        (with_numbers(ustar_header(b"f"), size=b"0000_000001\0") + END, "invalid size field"),  # and underscores
        (with_numbers(ustar_header(b"f"), uid=b"\xff" * 8) + END, "negative owner or size"),  # base-256
        (ustar_header(b"f", size=100) + b"x" * 50, "unexpected end of data"),
        (ustar_header(b"f")[:300], "unexpected end of data"),
        (
            pax_record("GNU.sparse.map=0,2,1,1", "GNU.sparse.numblocks=2", "GNU.sparse.size=9")
            + file_entry(b"xyz")
            + END,
            "out of order",
        ),
        (
            pax_record("GNU.sparse.map=0,1,1,1", "GNU.sparse.numblocks=2", "GNU.sparse.size=1")
            + file_entry(b"xy")
            + END,
            "past the file's size",
        ),
        (
            pax_record("GNU.sparse.map=0,1", "GNU.sparse.numblocks=1", "GNU.sparse.size=1") + file_entry(b"xy") + END,
            "1 bytes of data, where 2",
        ),
        (
            pax_record("GNU.sparse.map=0,1", "GNU.sparse.numblocks=2", "GNU.sparse.size=9") + file_entry(b"x") + END,
            "numblocks",
        ),
        (
            pax_record("GNU.sparse.map=0,1", "GNU.sparse.numblocks=1", f"GNU.sparse.size={1 << 50}")
            + file_entry(b"x")
            + END,
            "over the 1099511627776-byte limit",
        ),
        (
            pax_record("GNU.sparse.numbytes=1", "GNU.sparse.offset=0") + file_entry(b"x") + END,
            "malformed GNU sparse map",
        ),
        (
            pax_record("GNU.sparse.major=1", "GNU.sparse.minor=0") + file_entry(b"99999999999\n" + bytes(500)) + END,
            "larger than 1048576 bytes, or its data",
        ),
        (
            pax_record("GNU.sparse.major=1", "GNU.sparse.minor=0") + file_entry(b"x\n" + bytes(510)) + END,
            "invalid GNU sparse map",
        ),
        (ustar_header(b"././@PaxHeader", b"x", 9) + b"99 a=b\n\0\0" + bytes(503) + END, "malformed pax header"),
        (ustar_header(b"././@PaxHeader", b"x", 9) + b"9 a_b_c\n\0" + bytes(503) + END, "malformed pax header"),
        (pax_record("size=12x") + file_entry(b"x") + END, "invalid pax size record"),
    ],
    ids=[
        *(
            "not-a-tar",
            "signed-mode",
            "underscored-size",
            "negative-uid",
            "data-cut",
            "header-cut",
            "sparse-overlap",
            "sparse-past-the-end",
            "sparse-data-short",
        ),
        *(
            "sparse-numblocks",
            "sparse-huge",
            "sparse-0.0-unpaired",
            "sparse-1.0-endless-map",
            "sparse-1.0-not-a-number",
        ),
        *("pax-length", "pax-no-equals", "pax-size"),
    ],
)
def test_what_cannot_be_read_is_one_line(data: bytes, message: str) -> None:
    with pytest.raises(TarError, match=message) as caught:
        read_all(data)
    assert "\n" not in str(caught.value)


def test_a_record_over_the_cap_is_refused_unread() -> None:
    """Only the header is there: the reader never asks for the record's bytes."""
    header = ustar_header(b"././@LongLink", b"L", MAX_RECORD + 1)
    with pytest.raises(RecordTooLarge, match=f"GNU long name of {MAX_RECORD + 1} bytes"):
        read_all(header)
    read_all(ustar_header(b"././@LongLink", b"L", 7) + b"a-name\0" + bytes(505) + file_entry(b"x") + END)


def test_nothing_is_kept_of_entries_read() -> None:
    reader = TarReader(io.BytesIO(b"".join(ustar_header(b"f%d" % n) for n in range(100)) + END))
    names = [entry.name for entry in reader]
    assert len(names) == 100 and not hasattr(reader, "members")
    assert reader.__dict__.keys() == {"stream", "buffer", "offset", "unread", "globals"}
