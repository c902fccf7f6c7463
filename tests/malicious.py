"""Malicious layers as named table rows, and the helpers that apply test layers as root or as a real
ordinary user (shared by test_rootfs.py and test_apply.py).

Each row builds its layers from the absolute path of a folder outside the rootfs (`out`), so that rows can
aim at it by absolute name and by symlink. Either the apply is refused with an error naming the member
(`refused`), or the member is neutralised: its write lands inside the rootfs, at `inside` when given.
"""

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from images import Tar, compress

from dutils.apply import Skipped, apply_layer
from dutils.errors import printable

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
USER = "dutest"
PWNED = b"pwned"
OLD = 1_000_000_000  # a marker's mtime, so that any write to it shows
JOURNAL = ".rootfs.d-utils-journal"


@dataclass(frozen=True)
class Layer:
    """A layer blob on disk as apply_layer takes it."""

    blob: Path
    media_type: str
    diff_id: str


def write_layer(directory: Path, tar: bytes, compression: str = "gzip") -> Layer:
    data = compress(tar, compression)
    blob = directory / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    blob.chmod(0o644)
    return Layer(blob, MEDIA[compression], "sha256:" + hashlib.sha256(tar).hexdigest())


def write_streamed_layer(directory: Path, chunks: Iterable[bytes]) -> Layer:
    """A gzip layer written from `chunks` of tar data as they come: a layer much larger than memory."""
    tar_sha256, partial = hashlib.sha256(), directory / "layer.partial"
    with partial.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as out:
        for chunk in chunks:
            tar_sha256.update(chunk)
            out.write(chunk)
    blob_sha256 = hashlib.sha256()
    with partial.open("rb") as blob:
        while piece := blob.read(1 << 20):
            blob_sha256.update(piece)
    blob = partial.rename(directory / blob_sha256.hexdigest())
    blob.chmod(0o644)
    return Layer(blob, MEDIA["gzip"], "sha256:" + tar_sha256.hexdigest())


def ustar_header(name: bytes, kind: bytes = b"0", size: int = 0, linkname: bytes = b"", mode: int = 0o644) -> bytes:
    """One ustar header block exactly as given: any bytes in the name (up to 100), any size claimed."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\0" % mode
    block[108:124] = b"0000000\0" * 2  # uid, gid
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


END = bytes(1024)  # a tar's end: two zero blocks


def apply_all(layers: list[Layer], rootfs: Path) -> Skipped:
    total = Skipped()
    for layer in layers:
        total = total + apply_layer(layer.blob, layer.media_type, layer.diff_id, rootfs)
    return total


def raw_whiteout(name: str) -> Tar:
    """A whiteout entry named exactly `name` (the builder's whiteout() makes only sensible names)."""
    return Tar().raw(tarfile.TarInfo(name), b"")


@dataclass(frozen=True)
class Row:
    name: str
    layers: Callable[[str], list[Tar]]  # given the absolute path of a folder outside the rootfs
    refused: str = ""  # what the error must name; empty when the member is neutralised instead
    inside: str = ""  # where a neutralised write lands, below the rootfs ("{out}" is the outside folder)


class Raw(Tar):
    """A layer given as tar bytes exactly (headers that tarfile would not write), where a row wants a Tar."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def to_bytes(self) -> bytes:
        return self.data


def gnu_long_name(name: bytes, kind: bytes = b"L") -> bytes:
    """A GNU long name (`L`) or long link (`K`) record setting the next member's name or link target."""
    return ustar_header(b"././@LongLink", kind, len(name) + 1) + name + bytes(-(len(name) + 1) % 512 + 1)


def pax_record(*records: str, kind: bytes = b"x") -> bytes:
    """A pax header holding `KEY=VALUE` records (any bytes in them), for the next member (or, of kind `g`, every
    later one)."""
    data = b"".join(map(pax_line, records))
    return ustar_header(b"././@PaxHeader", kind, len(data)) + data + bytes(-len(data) % 512)


def pax_line(record: str) -> bytes:
    data = record.encode("utf-8", "surrogateescape") + b"\n"
    length = len(data) + 1 + len(str(len(data)))
    length += len(str(length)) - len(str(len(data)))  # the length counts its own digits
    return b"%d " % length + data


ESCAPES = "\x1b]0;owned\x07\x1b[2J\r\n\x9bname"  # retitle, clear the screen, a new line, a C1 escape


# Classes of attack, each a table of named rows. Every row aims at the marker `victim.txt` in the folder outside
# the rootfs (`out`) or beside the rootfs; none may change it.
CLASSES: dict[str, list[Row]] = {
    "names": [
        Row("dotdot-name", lambda out: [Tar().file("../../victim.txt", PWNED)], inside="victim.txt"),
        Row("absolute-name", lambda out: [Tar().file(f"{out}/victim.txt", PWNED)], inside="{out}/victim.txt"),
        Row(
            "long-pax-name-with-dotdot",
            lambda out: [Tar().file("a/" + "b/../" * 40 + "../" * 12 + "victim.txt", PWNED)],
            inside="victim.txt",
        ),
        Row(
            "gnu-long-name-absolute",
            lambda out: [Raw(gnu_long_name(f"{out}/{'x/../' * 30}victim.txt".encode()) + file_entry(PWNED) + END)],
            inside="{out}/victim.txt",
        ),
        Row(
            "control-characters-in-name",
            lambda out: [Tar().file(f"../{ESCAPES}", PWNED)],
            inside=ESCAPES,
        ),
        Row(
            "control-characters-in-refused-name",
            lambda out: [Tar().hardlink(ESCAPES, "../missing")],
            refused="member " + printable(ESCAPES) + ":",
        ),
        Row(
            "bytes-not-utf8-in-name",
            lambda out: [Raw(ustar_header(b"../../\xff\xfe\x80victim.txt", size=5) + PWNED + bytes(507) + END)],
            inside=os.fsdecode(b"\xff\xfe\x80victim.txt"),
        ),
        Row(
            "nul-byte-in-pax-path",
            lambda out: [Raw(pax_record(f"path=victim.txt\0{out}/victim.txt") + file_entry(PWNED) + END)],
            refused="NUL byte in a pax name",
        ),
        Row(
            "nul-byte-in-pax-link-target",
            lambda out: [Raw(pax_record(f"linkpath={out}\0x") + ustar_header(b"evil", b"2") + END)],
            refused="NUL byte in a pax name",
        ),
    ],
    "symlinks": [
        Row(
            "symlink-to-root-then-write-same-layer",
            lambda out: [Tar().symlink("evil", "/").file(f"evil{out}/victim.txt", PWNED)],
            inside="{out}/victim.txt",
        ),
        Row(
            "symlink-from-earlier-layer-then-write",
            lambda out: [Tar().symlink("evil", out), Tar().file("evil/victim.txt", PWNED)],
            inside="{out}/victim.txt",
        ),
        Row(
            "relative-symlink-up-then-write",
            lambda out: [Tar().dir("d").symlink("d/up", "../../../.."), Tar().file("d/up/victim.txt", PWNED)],
            inside="victim.txt",
        ),
        Row(
            "symlink-chain-out",
            lambda out: [
                Tar().symlink("a", "b").symlink("b", "c").symlink("c", "../../.."),
                Tar().file("a/victim.txt", PWNED),
            ],
            inside="victim.txt",
        ),
        Row(
            "symlink-chain-absolute-across-layers",
            lambda out: [
                Tar().symlink("a", "/b"),
                Tar().symlink("b", f"/c/{'../' * 8}{out}"),
                Tar().file("a/victim.txt", PWNED),
            ],
            inside="{out}/victim.txt",
        ),
        Row(
            "dir-replaced-by-symlink-then-child",
            lambda out: [Tar().dir("d").file("d/a", b"a").symlink("d", out).file("d/victim.txt", PWNED)],
            inside="{out}/victim.txt",
        ),
        Row(
            "symlink-through-proc-self-root",
            lambda out: [Tar().symlink("p", f"/proc/self/root{out}"), Tar().file("p/victim.txt", PWNED)],
            inside="proc/self/root{out}/victim.txt",
        ),
        Row(
            "symlink-loop",
            lambda out: [Tar().symlink("a", "b").symlink("b", "a").file("a/victim.txt", PWNED)],
            refused="member a/victim.txt",
        ),
        Row(
            "symlink-self-loop-across-layers",
            lambda out: [Tar().symlink("s", "s/s"), Tar().file("s/victim.txt", PWNED)],
            refused="member s/victim.txt",
        ),
    ],
    "hard-links": [
        Row(
            "symlink-up-then-hardlink-through-it",
            lambda out: [Tar().symlink("up", "../../..").hardlink("stolen", "up/victim.txt")],
            refused="member stolen",
        ),
        Row(
            "hardlink-through-earlier-symlink",
            lambda out: [Tar().symlink("evil", out), Tar().hardlink("stolen", "evil/victim.txt")],
            refused="member stolen",
        ),
        Row("hardlink-to-etc-passwd", lambda out: [Tar().hardlink("stolen", "/etc/passwd")], refused="member stolen"),
        Row("hardlink-to-dotdot", lambda out: [Tar().hardlink("stolen", "../../victim.txt")], refused="member stolen"),
        Row(
            "hardlink-to-symlink-then-write-through-it",
            lambda out: [Tar().symlink("evil", out), Tar().hardlink("h", "evil").file("h/victim.txt", PWNED)],
            inside="{out}/victim.txt",
        ),
        Row(
            "hardlink-replacing-a-file-written-through",
            lambda out: [Tar().file("f", b"inside").hardlink("f", "../../victim.txt")],
            refused="member f",
        ),
    ],
    "whiteouts": [
        Row("whiteout-of-dotdot-path", lambda out: [Tar().whiteout("../../victim.txt")]),
        Row("whiteout-naming-dotdot", lambda out: [raw_whiteout("d/.wh...")], refused="member d/.wh..."),
        Row("whiteout-absolute-outside", lambda out: [Tar().whiteout(f"{out}/victim.txt")]),
        Row(
            "whiteout-through-earlier-symlink",
            lambda out: [Tar().symlink("evil", out), Tar().whiteout("evil/victim.txt")],
        ),
        Row(
            "whiteout-through-symlink-chain",
            lambda out: [Tar().symlink("a", "b").symlink("b", f"../../{out}"), Tar().whiteout("a/victim.txt")],
        ),
        Row(
            "whiteout-whose-parent-links-outside-same-layer",
            lambda out: [Tar().symlink("evil", out).whiteout("evil/victim.txt").whiteout("evil")],
        ),
        Row(
            "opaque-through-symlinked-dir",
            lambda out: [Tar().symlink("evil", out).symlink("up", "../.."), Tar().opaque("evil").opaque("up")],
        ),
        Row(
            "opaque-through-symlink-chain",
            lambda out: [Tar().symlink("a", "b").symlink("b", out), Tar().opaque("a").opaque("b").opaque(".")],
        ),
    ],
    "devices": [
        Row(
            "device-through-earlier-symlink", lambda out: [Tar().symlink("evil", out), Tar().device("evil/victim.txt")]
        ),
        Row("block-device-through-dotdot", lambda out: [Tar().device("../../victim.txt", "block", 7, 0)]),
        Row("fifo-through-symlink", lambda out: [Tar().symlink("evil", out).fifo("evil/victim.txt")]),
    ],
    "the-root": [
        Row("root-turned-into-symlink", lambda out: [Tar().symlink(".", out)], refused="member ."),
        Row("root-turned-into-file", lambda out: [Tar().file("/", PWNED)], refused="member /"),
        Row("root-turned-into-hardlink", lambda out: [Tar().file("f").hardlink("..", "f")], refused="member .."),
        Row("root-turned-into-device", lambda out: [Tar().device("./")], refused="member ./"),
    ],
}
ROWS = [row for rows in CLASSES.values() for row in rows]


def file_entry(data: bytes, name: bytes = b"placeholder") -> bytes:
    """A regular file's header and data, its name set by a preceding long name or pax record when there is one."""
    return ustar_header(name, size=len(data)) + data + bytes(-len(data) % 512)


def outside_state(roots: list[Path]) -> dict[str, tuple]:
    """Every entry under `roots` except in folders called rootfs: type, mode, content or target, mtime."""
    state = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "rootfs"]
            for name in dirs + files:
                if name == JOURNAL:
                    continue  # apply_layer's own bookkeeping beside the rootfs, left by a refused layer
                path = Path(directory, name)
                st = path.lstat()
                content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
                link = os.readlink(path) if path.is_symlink() else None
                # The folder holding a rootfs also holds apply_layer's journal: its mtime moves.
                mtime = None if (path / "rootfs").is_dir() else st.st_mtime_ns
                state[str(path)] = (st.st_mode, content, link, mtime)
    return state


# -- running as a real ordinary user (conftest's `unprivileged` fixture: d-utils in a venv of Debian's python)


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: to chown, make devices and runuser")


def make_workspace() -> Path:
    """A folder the ordinary user can reach (pytest's tmp_path is private to root) with a pull folder it owns."""
    workspace = Path(tempfile.mkdtemp(prefix="d-utils-apply-"))
    workspace.chmod(0o755)
    (workspace / "pull").mkdir()
    shutil.chown(workspace / "pull", USER, USER)
    return workspace


RUN_AS_USER = """
import json, sys
from pathlib import Path
from dutils.apply import apply_layer
from dutils.errors import Error
print("ready", flush=True)
results = []
for blob, media_type, diff_id, rootfs in json.loads(sys.argv[1]):
    try:
        results.append(vars(apply_layer(Path(blob), media_type, diff_id, Path(rootfs))))
    except Error as err:
        results.append(str(err))
print(json.dumps(results))
"""


def user_command(user, steps: list[tuple[Layer, Path]]) -> list[str]:
    """The command that applies each layer onto its rootfs, printing "ready" once started, then a JSON list
    with, for each layer, Skipped's fields or the error's line."""
    jobs = [[str(layer.blob), layer.media_type, layer.diff_id, str(rootfs)] for layer, rootfs in steps]
    return [str(user.bin / "python"), "-c", RUN_AS_USER, json.dumps(jobs)]


def apply_as_user(user, workspace: Path, steps: list[tuple[Layer, Path]]) -> list[dict | str]:
    """Apply each layer onto its rootfs as the ordinary user `user` (conftest's Unprivileged)."""
    path = {"PATH": f"{user.bin}:/usr/sbin:/usr/bin:/sbin:/bin"}  # where runuser is, for subprocess to find
    command = user_command(user, steps)
    done = user.run(command, capture_output=True, text=True, timeout=120, cwd=workspace, env=path)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def plant_markers(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"original")
        os.utime(path, (OLD, OLD))


def check_outcome(row: Row, error: str, rootfs: Path, out: Path) -> None:
    if row.refused:
        assert row.refused in error
        assert error.startswith("layer sha256:")
    else:
        assert error == ""
        if row.inside:
            assert (rootfs / row.inside.format(out=out).lstrip("/")).read_bytes() == PWNED
