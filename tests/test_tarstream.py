"""tarstream: reads what tarfile reads (ustar, pax, GNU, as tarfile and GNU tar write them), keeps nothing,
and refuses what it cannot read in one line."""

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from catalogue import catalogue
from malicious import END, file_entry, pax_record, ustar_header

from dutils.tarstream import MAX_RECORD, RecordTooLarge, TarError, TarReader


def read_all(data: bytes) -> list[tuple]:
    """Every entry of `data` as a tuple of its fields, its content included."""
    reader = TarReader(io.BytesIO(data))
    return [
        (e.name, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.linkname, e.devmajor, e.devminor, e.xattrs, content)
        for e in reader
        for content in [b"".join(reader.chunks(e)) if e.isreg() else None]
    ]


def read_with_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [
            (
                info.name,
                info.type if info.type != tarfile.AREGTYPE else tarfile.REGTYPE,
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


def test_numbers_in_base_256_and_old_directories() -> None:
    header = bytearray(ustar_header(b"old-dir/", b"\0"))
    header[108:116] = b"\x80" + (3_000_000_000).to_bytes(7, "big")  # GNU base-256 uid
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    [entry] = TarReader(io.BytesIO(bytes(header) + END))
    assert (entry.name, entry.isdir(), entry.uid) == ("old-dir", True, 3_000_000_000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01" * 1024, "checksum"),
        (ustar_header(b"f", size=100) + b"x" * 50, "unexpected end of data"),
        (ustar_header(b"f")[:300], "unexpected end of data"),
        (ustar_header(b"s", b"S") + END, "GNU sparse files are not supported"),
        (pax_record("GNU.sparse.major=1") + file_entry(b"x") + END, "GNU sparse files are not supported"),
        (ustar_header(b"././@PaxHeader", b"x", 9) + b"99 a=b\n\0\0" + bytes(503) + END, "malformed pax header"),
        (ustar_header(b"././@PaxHeader", b"x", 9) + b"9 a_b_c\n\0" + bytes(503) + END, "malformed pax header"),
        (pax_record("size=12x") + file_entry(b"x") + END, "invalid pax size record"),
    ],
    ids=["not-a-tar", "data-cut", "header-cut", "gnu-sparse", "pax-sparse", "pax-length", "pax-no-equals", "pax-size"],
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
