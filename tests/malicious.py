"""Malicious layers as named table rows, and the helpers that apply test layers as root or as a real
ordinary user (shared by test_rootfs.py and test_apply.py).

Each row builds its layers from the absolute path of a folder outside the rootfs (`out`), so that rows can
aim at it by absolute name and by symlink. Either the apply is refused with an error naming the member
(`refused`), or the member is neutralised: its write lands inside the rootfs, at `inside` when given.
"""

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from images import Tar, compress

from dutils.apply import Skipped, apply_layer

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


ROWS = [
    Row("dotdot-name", lambda out: [Tar().file("../../victim.txt", PWNED)], inside="victim.txt"),
    Row("absolute-name", lambda out: [Tar().file(f"{out}/victim.txt", PWNED)], inside="{out}/victim.txt"),
    Row(
        "long-pax-name-with-dotdot",
        lambda out: [Tar().file("a/" + "b/../" * 40 + "../" * 12 + "victim.txt", PWNED)],
        inside="victim.txt",
    ),
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
        "dir-replaced-by-symlink-then-child",
        lambda out: [Tar().dir("d").file("d/a", b"a").symlink("d", out).file("d/victim.txt", PWNED)],
        inside="{out}/victim.txt",
    ),
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
    Row("whiteout-of-dotdot-path", lambda out: [Tar().whiteout("../../victim.txt")]),
    Row("whiteout-naming-dotdot", lambda out: [raw_whiteout("d/.wh...")], refused="member d/.wh..."),
    Row(
        "whiteout-through-earlier-symlink",
        lambda out: [Tar().symlink("evil", out), Tar().whiteout("evil/victim.txt")],
    ),
    Row(
        "opaque-through-symlinked-dir",
        lambda out: [Tar().symlink("evil", out).symlink("up", "../.."), Tar().opaque("evil").opaque("up")],
    ),
    Row(
        "symlink-loop",
        lambda out: [Tar().symlink("a", "b").symlink("b", "a").file("a/victim.txt", PWNED)],
        refused="member a/victim.txt",
    ),
    Row("root-turned-into-symlink", lambda out: [Tar().symlink(".", out)], refused="member ."),
]


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
