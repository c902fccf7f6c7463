"""apply: real layers (built with tests/images.py) applied as root and as a real ordinary user, compared
feature by feature, after simulated kills, and with umoci's unpacking of the same image."""

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from catalogue import (
    DEVICES,
    LONG,
    SPARSE_FORMATS,
    SPARSE_IDS,
    UNICODE,
    assert_same_as_umoci_rootless,
    catalogue,
    gnu_sparse_tar,
    sparse_source,
    umoci_unpack,
)
from images import Image, Tar, write_oci_layout
from malicious import MEDIA, USER, Layer, apply_all, apply_as_user, as_root, user_command, write_layer
from trees import snapshot

from dutils.apply import Skipped, apply_layer
from dutils.errors import Error

# -- features


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    (tmp_path / "blobs").mkdir()
    return tmp_path / "blobs"


def apply_catalogue(blobs: Path, rootfs: Path, compression: str = "gzip") -> Skipped:
    return apply_all([write_layer(blobs, tar.to_bytes(), compression) for tar in catalogue()], rootfs)


def tar_mtime(tar: Tar, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar.to_bytes())) as archive:
        return int(archive.getmember(name).mtime) * 1_000_000_000


@as_root
def test_catalogue_as_root_has_every_feature(blobs: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "pull" / "rootfs"
    skipped = apply_catalogue(blobs, rootfs)
    assert skipped == Skipped()
    entries, groups = snapshot(rootfs)

    for path in ["gone", "gone-dir", "opaque/lower", "opaque/lower-dir", "opaque2/sub/lower", "usr/bin/wall"]:
        assert path not in entries, path
    assert not [path for path in entries if ".wh." in path]
    assert list(tmp_path.joinpath("pull").iterdir()) == [rootfs]  # no journal left once done
    assert entries["opaque/upper"].payload == b"upper"
    assert entries["opaque2/sub/upper"].payload == b"upper"
    assert entries["both"].payload.startswith(b"written")
    assert entries["old-dir"].payload == b"a file over a directory"
    assert (entries["old-file"].kind, entries["old-file"].mode) == ("d", 0o750)
    assert entries["old-file/inside"].payload == b"a directory over a file"
    assert entries["chmod-me"].mode == 0o700 and "chmod-me/keep" in entries
    assert {"etc/passwd", "etc/passwd-again"} in groups
    assert {"usr/bin/tool", "usr/bin/tool-again", "usr/bin/tool-third"} in groups
    assert (entries["shared"].payload, entries["shared-link"].payload) == (b"v2", b"v1")
    assert entries["bin"].payload == b"a file over a symlink"
    assert (entries["etc/shadow"].kind, entries["etc/shadow"].payload) == ("l", "passwd")
    assert entries["etc/tool-link"].payload == "/usr/bin/tool"
    assert entries["dangling"].payload == "/nowhere/at/all"
    assert (entries["usr/bin/su"].mode, entries["usr/bin/su"].payload) == (0o4750, b"su v2")
    assert entries["tmp"].mode == 0o1777
    assert entries["ro"].mode == 0o555 and {"ro/inside", "ro/added", "ro/late"} <= entries.keys()
    assert entries["locked"].mode == 0 and entries["locked/sub/secret"].mode == 0
    assert entries["locked/sub/added"].payload.startswith(b"into a mode-0000")
    assert entries["zero-mode"].mode == 0
    assert entries["run/fifo"].kind == entries["run/fifo2"].kind == "p"
    assert entries["dev/null"].kind == "c" and entries["dev/null"].payload == (1, 3)
    assert entries["dev/loop0"].kind == "b" and entries["dev/zero"].payload == (1, 5)
    assert entries[UNICODE].payload == b"utf-8 name\n" and entries[LONG].payload == b"deep\n"
    assert entries["usr/bin/su"].owner == (0, 0) and entries["opaque"].owner == (0, 0)
    first = catalogue()[0]
    assert entries["ro"].mtime_ns == tar_mtime(first, "ro")  # children added later leave it alone
    assert entries["etc/passwd"].mtime_ns == tar_mtime(first, "etc/passwd")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_every_compression_gives_the_same_tree(compression: str, blobs: Path, tmp_path: Path) -> None:
    apply_catalogue(blobs, tmp_path / "gzip" / "rootfs")
    apply_catalogue(blobs, tmp_path / compression / "rootfs", compression)
    assert snapshot(tmp_path / compression / "rootfs") == snapshot(tmp_path / "gzip" / "rootfs")


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", "none"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"),
    ],
)
def test_every_layer_media_type_is_read(media_type: str, compression: str, blobs: Path, tmp_path: Path) -> None:
    layer = write_layer(blobs, Tar().file("hello", b"hi").to_bytes(), compression)
    apply_layer(layer.blob, media_type, layer.diff_id, tmp_path / "rootfs")
    assert (tmp_path / "rootfs" / "hello").read_bytes() == b"hi"


def test_unknown_media_type_is_named(blobs: Path, tmp_path: Path) -> None:
    layer = write_layer(blobs, Tar().file("hello").to_bytes())
    with pytest.raises(Error, match=r"layer sha256:[0-9a-f]{64}: unsupported .*application/x-rar"):
        apply_layer(layer.blob, "application/x-rar", layer.diff_id, tmp_path / "rootfs")


def corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x55 for b in data[middle : middle + 64]) + data[middle + 64 :]


@pytest.mark.parametrize(
    ("compression", "damage", "message"),
    [
        ("gzip", corrupt, "corrupt gzip data"),
        ("gzip", lambda data: data[: len(data) // 2], "corrupt gzip data"),
        ("zstd", lambda data: data[:4] + b"\xff" * 8 + data[12:], "corrupt zstd data"),  # no checksum by default
        ("none", lambda data: data[:700], "corrupt tar data"),
        ("none", lambda data: b"\x01" * 1024, "corrupt tar data"),
    ],
)
def test_corrupt_layers_fail_with_one_line_naming_the_layer(
    compression: str, damage, message: str, blobs: Path, tmp_path: Path
) -> None:
    tar = Tar().file("a", os.urandom(50_000)).file("b", b"b" * 50_000).to_bytes()
    layer = write_layer(blobs, tar, compression)
    layer.blob.write_bytes(damage(layer.blob.read_bytes()))
    with pytest.raises(Error, match=f"^layer sha256:{layer.blob.name}: {message}") as caught:
        apply_layer(layer.blob, layer.media_type, layer.diff_id, tmp_path / "rootfs")
    assert "\n" not in str(caught.value)


def test_diff_id_mismatch_is_an_error_naming_the_layer(blobs: Path, tmp_path: Path) -> None:
    layer = write_layer(blobs, Tar().file("hello").to_bytes())
    other = "sha256:" + "0" * 64
    with pytest.raises(Error, match=f"layer sha256:{layer.blob.name}: uncompressed content is sha256:.*{other}"):
        apply_layer(layer.blob, layer.media_type, other, tmp_path / "rootfs")


def test_reserved_whiteout_names_never_appear(blobs: Path, tmp_path: Path) -> None:
    """AUFS metadata of old layers is skipped, as Docker does; nothing else may make a .wh. name either."""
    tar = (
        Tar()
        .dir(".wh..wh.plnk")
        .file(".wh..wh.plnk/123.456", b"aufs hard link store")
        .file(".wh..wh.aufs")
        .file("a/.wh.dir/f", b"inside a whiteout name")
        .file(".wh..d-utils-partial/f", b"inside a name that whiteouts reserve")
        .file("kept", b"kept")
    )
    apply_all([write_layer(blobs, tar.to_bytes())], tmp_path / "rootfs")
    assert sorted(str(path.relative_to(tmp_path / "rootfs")) for path in (tmp_path / "rootfs").rglob("*")) == ["kept"]


def test_missing_parents_are_made_0755_whatever_the_umask(blobs: Path, tmp_path: Path) -> None:
    layer = write_layer(blobs, Tar().file("a/b/c", b"c").to_bytes())
    old = os.umask(0o077)
    try:
        apply_layer(layer.blob, layer.media_type, layer.diff_id, tmp_path / "rootfs")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rootfs" / "a" / "b").stat().st_mode) == 0o755


@as_root
def test_a_setgid_bit_a_layer_takes_away_gives_no_group_to_folders_made_inside(blobs: Path, tmp_path: Path) -> None:
    """As Docker and umoci apply it: D's new mode holds before D/x is made for D/x/f, so D/x takes no group 50."""
    lower = write_layer(blobs, Tar().dir("D", 0o2775, gid=50).to_bytes())
    upper = write_layer(blobs, Tar().dir("D", 0o755, gid=50).file("D/x/f", b"1").to_bytes())
    for layer in (lower, upper):
        apply_layer(layer.blob, layer.media_type, layer.diff_id, tmp_path / "rootfs")
    made = (tmp_path / "rootfs" / "D" / "x").stat()
    assert (made.st_gid, stat.S_IMODE(made.st_mode)) == (os.getegid(), 0o755)
    assert stat.S_IMODE((tmp_path / "rootfs" / "D").stat().st_mode) == 0o755


def xattr_layer() -> bytes:
    info = tarfile.TarInfo("labelled")
    info.size = 2
    info.pax_headers = {"SCHILY.xattr.user.comment": "hello", "SCHILY.xattr.trusted.secret": "x"}
    return Tar().raw(info, b"hi").to_bytes()


@as_root
def test_extended_attributes_are_set_as_root(blobs: Path, tmp_path: Path) -> None:
    layer = write_layer(blobs, xattr_layer())
    assert apply_all([layer], tmp_path / "rootfs") == Skipped()
    assert os.getxattr(tmp_path / "rootfs" / "labelled", "user.comment") == b"hello"
    assert os.getxattr(tmp_path / "rootfs" / "labelled", "trusted.secret") == b"x"


@pytest.mark.integration  # slow: a 512 MiB layer
def test_memory_stays_flat_as_a_layer_grows(tmp_path: Path) -> None:
    """A 512 MiB file is streamed through: the applying process never holds it."""
    size = 512 << 20
    raw, sha256 = tmp_path / "big.tar", hashlib.sha256()
    with raw.open("wb") as out, tarfile.open(fileobj=out, mode="w|") as archive:
        info = tarfile.TarInfo("big")
        info.size = size
        archive.addfile(info, io.BufferedReader(Zeros(size)))
    with raw.open("rb") as tar:
        while chunk := tar.read(1 << 20):
            sha256.update(chunk)
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (fork), pytest's own memory
    script = (
        "import sys; from pathlib import Path; from dutils.apply import apply_layer;"
        f"apply_layer(Path(sys.argv[1]), '{MEDIA['none']}', sys.argv[2], Path(sys.argv[3]));"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(raw), f"sha256:{sha256.hexdigest()}", str(tmp_path / "rootfs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert int(done.stdout) < 120_000  # KiB: the interpreter and its imports, not the layer
    assert (tmp_path / "rootfs" / "big").stat().st_size == size


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


# -- interrupted applies


def members(tar: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return [(m, archive.extractfile(m).read() if m.isfile() else None) for m in archive.getmembers()]


def first_members(tar: bytes, count: int) -> bytes:
    """The layer as a kill after `count` entries leaves it: only those entries get applied."""
    prefix = Tar()
    for info, data in members(tar)[:count]:
        prefix = prefix.raw(info, data or b"")
    return prefix.to_bytes()


def cut_inside_a_file(tar: bytes) -> bytes:
    """The layer cut in the middle of a file's content, as a kill while writing it leaves things."""
    info = next(info for info, data in members(tar) if info.isfile() and info.size > 4)
    return tar[: info.offset_data + info.size // 2]


def killed_runs() -> list:
    """(layer index, what a killed run of it got to apply) at several cut points in three layers."""
    cases = []
    for index in (0, 1, 4):
        total = len(members(catalogue()[index].to_bytes()))
        for count in sorted({0, 1, total // 2, total - 1}):
            cases.append(pytest.param(index, count, id=f"layer{index}-killed-after-{count}-entries"))
        cases.append(pytest.param(index, None, id=f"layer{index}-killed-inside-a-file"))
    return cases


def kill_and_rerun(directory: Path, index: int, count: int | None, rootfs: Path) -> list[tuple[Layer, Path]]:
    """The steps of a pull killed while applying layer `index`, then run again: the killed run's error
    stops it before it finishes, as a kill would."""
    tars = [tar.to_bytes() for tar in catalogue()]
    layers = [write_layer(directory, tar) for tar in tars]
    killed = cut_inside_a_file(tars[index]) if count is None else first_members(tars[index], count)
    broken = replace(write_layer(directory, killed), diff_id=layers[index].diff_id)
    return [(layer, rootfs) for layer in [*layers[:index], broken, layers[index]]]


def apply_steps(steps: list[tuple[Layer, Path]]) -> list[str]:
    errors = []
    for layer, rootfs in steps:
        try:
            apply_layer(layer.blob, layer.media_type, layer.diff_id, rootfs)
        except Error as err:
            errors.append(str(err))
    return errors


@pytest.mark.parametrize(("index", "count"), killed_runs())
def test_rerun_after_a_kill_gives_the_clean_tree(index: int, count: int | None, tmp_path: Path) -> None:
    apply_all(
        [write_layer(tmp_path, tar.to_bytes()) for tar in catalogue()[: index + 1]], tmp_path / "clean" / "rootfs"
    )
    errors = apply_steps(kill_and_rerun(tmp_path, index, count, tmp_path / "rerun" / "rootfs"))
    assert len(errors) == 1  # the killed run only
    assert snapshot(tmp_path / "rerun" / "rootfs") == snapshot(tmp_path / "clean" / "rootfs")
    assert sorted(os.listdir(tmp_path / "rerun")) == ["rootfs"]  # no journal or scratch file left


# -- as a real ordinary user, and against umoci


def user_folder(workspace: Path, name: str) -> Path:
    folder = workspace / "pull" / name
    folder.mkdir()
    shutil.chown(folder, USER, USER)
    return folder


@as_root
@pytest.mark.parametrize(("index", "count"), killed_runs())
def test_rerun_after_a_kill_gives_the_clean_tree_as_an_ordinary_user(
    index: int, count: int | None, workspace: Path, unprivileged, request
) -> None:
    folder = user_folder(workspace, request.node.callspec.id)
    clean = [(write_layer(workspace, tar.to_bytes()), folder / "clean") for tar in catalogue()[: index + 1]]
    rerun = kill_and_rerun(workspace, index, count, folder / "rerun")
    results = apply_as_user(unprivileged, workspace, clean + rerun)
    assert [result for result in results if isinstance(result, str)] == [results[len(clean) + index]]
    assert snapshot(folder / "rerun") == snapshot(folder / "clean")
    assert sorted(os.listdir(folder)) == ["clean", "rerun"]


@as_root
def test_extended_attributes_as_an_ordinary_user(workspace: Path, unprivileged) -> None:
    folder = user_folder(workspace, "xattrs")
    [skipped] = apply_as_user(unprivileged, workspace, [(write_layer(workspace, xattr_layer()), folder / "rootfs")])
    assert skipped == {"devices": 0, "xattrs": 1, "owners": 0}  # trusted.* needs privilege
    assert os.getxattr(folder / "rootfs" / "labelled", "user.comment") == b"hello"
    assert "trusted.secret" not in os.listxattr(folder / "rootfs" / "labelled")


def blob_of(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def layout_layers(layout: Path) -> list[Layer]:
    """The layers of the layout's only image, as umoci reads them."""
    [descriptor] = json.loads((layout / "index.json").read_text())["manifests"]
    manifest = json.loads(blob_of(layout, descriptor["digest"]).read_text())
    diff_ids = json.loads(blob_of(layout, manifest["config"]["digest"]).read_text())["rootfs"]["diff_ids"]
    return [
        Layer(blob_of(layout, layer["digest"]), layer["mediaType"], diff_id)
        for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    ]


@as_root
def test_tree_as_root_matches_umoci(umoci: dict[str, Path], tmp_path: Path) -> None:
    apply_all(layout_layers(umoci["layout"]), tmp_path / "rootfs")
    assert snapshot(tmp_path / "rootfs") == snapshot(umoci["root"])  # owners and mtimes included


@as_root
def test_tree_as_an_ordinary_user_matches_umoci_rootless(umoci: dict[str, Path], workspace: Path, unprivileged) -> None:
    rootfs = user_folder(workspace, "catalogue") / "rootfs"
    results = apply_as_user(unprivileged, workspace, [(layer, rootfs) for layer in layout_layers(umoci["layout"])])
    total = sum((Skipped(**result) for result in results), Skipped())
    assert total == Skipped(devices=len(DEVICES), owners=2)  # etc/shadow and usr/bin/wall had other groups
    assert_same_as_umoci_rootless(rootfs, umoci["rootless"], DEVICES)
    assert all(stat.S_IMODE(os.lstat(rootfs / path).st_mode) == 0 for path in ["locked", "zero-mode"])


@as_root
def test_rerun_after_sigkill_gives_the_clean_tree_as_an_ordinary_user(workspace: Path, unprivileged) -> None:
    """Real kills at moments spread over a long apply (entries, whiteouts, restoring modes at the end)."""
    lower, upper = Tar().dir("."), Tar()
    for n in range(200):
        lower.dir(f"d{n}", 0o555).file(f"d{n}/old", b"old").dir(f"d{n}/gone", 0o500).file(f"d{n}/gone/f")
        upper.dir(f"d{n}/new", 0o500).file(f"d{n}/new/f", b"new" * 500, mode=0o400).whiteout(f"d{n}/gone")
        upper.file(f"d{n}/old", b"replaced", mode=0).dir(f"d{n}", 0o555)
    lower_layer, upper_layer = (write_layer(workspace, tar.to_bytes()) for tar in (lower, upper))
    folder = user_folder(workspace, "sigkill")
    delays = [0.01, 0.05, 0.1, 0.2, 0.4]
    targets = [folder / "clean", *(folder / f"killed-{delay}" for delay in delays)]
    apply_as_user(unprivileged, workspace, [(lower_layer, rootfs) for rootfs in targets] + [(upper_layer, targets[0])])

    interrupted = 0
    for delay, rootfs in zip(delays, targets[1:], strict=True):
        command = user_command(unprivileged, [(upper_layer, rootfs)])
        with subprocess.Popen(
            command,
            user=USER,
            group=USER,
            extra_groups=[],
            env=unprivileged.env,
            cwd=workspace,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdout.readline() == "ready\n"
            time.sleep(delay)
            child.kill()
            child.wait(timeout=30)
        interrupted += (folder / f".{rootfs.name}.d-utils-journal").exists()
    assert interrupted >= 2  # most kills land mid-apply; the rest found it done and are harmless

    apply_as_user(unprivileged, workspace, [(upper_layer, rootfs) for rootfs in targets[1:]])
    for rootfs in targets[1:]:
        assert snapshot(rootfs) == snapshot(targets[0]), rootfs.name
    assert sorted(os.listdir(folder)) == sorted(rootfs.name for rootfs in targets)


# -- GNU tar's sparse files in each format: byte for byte, sparse on disk, as umoci unpacks those it reads


@as_root
@pytest.mark.integration
@pytest.mark.parametrize(("tar_format", "version"), SPARSE_FORMATS, ids=SPARSE_IDS)
def test_gnu_tar_sparse_files_are_applied_sparse_as_umoci_unpacks_them(
    tar_format: str, version: str | None, tmp_path: Path
) -> None:
    source = sparse_source(tmp_path)
    layout = tmp_path / "layout"
    write_oci_layout(layout, Image(layers=[gnu_sparse_tar(source, tar_format, version)]), "sparse")
    rootfs = tmp_path / "rootfs"
    apply_all(layout_layers(layout), rootfs)
    for name in ("holes", "all-hole", "dense"):
        assert (rootfs / name).read_bytes() == (source / name).read_bytes(), name
    assert os.stat(rootfs / "holes").st_blocks * 512 < 1 << 20  # 16 MiB holding 16 KB of data: the holes are holes
    assert os.stat(rootfs / "all-hole").st_blocks == 0
    if tar_format != "gnu":  # umoci 0.4.7 refuses the old GNU format's 'S' entries ("unknown typeflag")
        assert snapshot(rootfs) == snapshot(umoci_unpack(f"{layout}:sparse", tmp_path)["root"])  # owners, mtimes too
