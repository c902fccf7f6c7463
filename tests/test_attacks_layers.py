"""Attacks by image layers, by class. The tables of tests/malicious.py (names, symlinks, hard links, whiteouts,
devices, the root) applied by apply_layer as root and as the ordinary user (test_images.py pulls the same rows
through d-pull); then resources: huge header records, hundreds of thousands of entries, trees deeper than Python's stack, each
as root and as the ordinary user, the headline ones end to end through d-pull. Markers outside the rootfs stand
for the host's files and stay byte-for-byte unchanged; peak memory is the applying process's VmHWM."""

import gzip
import hashlib
import io
import itertools
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from images import MEDIA_TYPES, OCI_MANIFEST, Tar, canonical_json, descriptor, push_blob, push_manifest
from malicious import (
    CLASSES,
    END,
    MEDIA,
    USER,
    Layer,
    Row,
    apply_all,
    apply_as_user,
    as_root,
    check_outcome,
    file_entry,
    gnu_long_name,
    make_workspace,
    outside_state,
    pax_record,
    plant_markers,
    ustar_header,
    write_layer,
    write_streamed_layer,
)
from registry_server import Registry

from dutils.errors import Error
from dutils.store import remove_tree

MAX_PEAK_KIB = 150_000
ROWS = [pytest.param(row, id=f"{kind}/{row.name}") for kind, rows in CLASSES.items() for row in rows]

# -- the tables, applied directly


def apply_row(layers: list[Layer], rootfs: Path) -> str:
    try:
        apply_all(layers, rootfs)
    except Error as err:
        return str(err)
    return ""


@pytest.mark.parametrize("row", ROWS)
def test_layer_attack_changes_nothing_outside_the_rootfs(row: Row, tmp_path: Path, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("outside")
    rootfs = tmp_path / "pull" / "rootfs"
    plant_markers(tmp_path / "victim.txt", tmp_path / "pull" / "victim.txt", out / "victim.txt")
    layers = [write_layer(tmp_path, tar.to_bytes()) for tar in row.layers(str(out))]
    rootfs.mkdir()
    passwd = os.stat("/etc/passwd")
    before = outside_state([tmp_path, out])

    error = apply_row(layers, rootfs)

    assert outside_state([tmp_path, out]) == before
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert "\x1b" not in error and "\n" not in error  # control characters reach the terminal escaped
    check_outcome(row, error, rootfs, out)


@as_root
@pytest.mark.parametrize("kind", CLASSES)
def test_layer_attack_class_changes_nothing_outside_as_an_ordinary_user(kind: str, unprivileged) -> None:
    """Each table, applied by a real unprivileged user who owns, so could write, every marker."""
    workspace = make_workspace()
    try:
        out = workspace / "pull" / "outside"
        steps, checks = [], []
        for row in CLASSES[kind]:
            folder = workspace / "pull" / row.name
            plant_markers(folder / "victim.txt", out / row.name / "victim.txt")
            (folder / "rootfs").mkdir()
            layers = [write_layer(workspace, tar.to_bytes()) for tar in row.layers(str(out / row.name))]
            steps += [(layer, folder / "rootfs") for layer in layers]
            checks.append((row, len(steps) - 1))
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(workspace / "pull")], check=True)
        before = outside_state([workspace])

        results = apply_as_user(unprivileged, workspace, steps)

        assert outside_state([workspace]) == before
        for row, last in checks:
            error = results[last] if isinstance(results[last], str) else ""
            check_outcome(row, error, workspace / "pull" / row.name / "rootfs", out / row.name)
    finally:
        shutil.rmtree(workspace)


# -- resources: every run in a child process whose peak memory (VmHWM) is read at its end

PEAK = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
APPLY = f"""
import sys
from pathlib import Path
from dutils.apply import apply_layer
from dutils.errors import Error
try:
    apply_layer(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    print("applied")
except Error as err:
    print(err)
{PEAK}
"""
PULL = f"""
import sys
from dutils.pull import main
code = main(sys.argv[1:])
{PEAK}
sys.exit(code)
"""


def python_of(user) -> list[str]:
    """How to start d-utils' python: as the ordinary user (conftest's Unprivileged), or this one when None."""
    return [str(user.bin / "python")] if user else [sys.executable]


def run_as(user, argv: list, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    if user is None:
        return subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return user.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def apply_in_child(layer: Layer, rootfs: Path, user=None, timeout: float = 120) -> tuple[str, int, float]:
    """apply_layer in a fresh process (as `user` when given): its one line of outcome, its peak KiB, seconds."""
    started = time.monotonic()
    argv = [*python_of(user), "-c", APPLY, layer.blob, layer.media_type, layer.diff_id, rootfs]
    done = run_as(user, argv, timeout, rootfs.parent)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    outcome, peak = done.stdout.splitlines()
    return outcome, int(peak), time.monotonic() - started


def pull_in_child(
    ref: str, folder: Path, cache: Path, user=None, *options: str
) -> tuple[subprocess.CompletedProcess, int]:
    """d-pull (as `user` when given): the finished process, and its peak KiB printed last on stdout."""
    argv = [*python_of(user), "-c", PULL, "-q", "--cache", cache, *options, ref, folder]
    done = run_as(user, argv, 300, folder.parent)
    return done, int(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def shared(unprivileged) -> Iterator[Path]:
    """A folder that the ordinary user can read, with a `pull` folder it owns."""
    workspace = make_workspace()
    yield workspace
    remove_tree(workspace)  # shutil.rmtree recurses: the deep trees are too deep for it


def user_owned(workspace: Path, name: str) -> Path:
    folder = workspace / "pull" / name
    folder.mkdir()
    shutil.chown(folder, USER, USER)
    return folder


def push_layers(registry: Registry, repo: str, layers: list[Layer]) -> str:
    """An OCI image of `layers` (blobs already made) pushed to `registry`; its reference by digest."""
    diff_ids = [layer.diff_id for layer in layers]
    config = canonical_json(
        {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    )
    blobs = [layer.blob.read_bytes() for layer in layers]
    for blob in [config, *blobs]:
        push_blob(registry.host, repo, blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(MEDIA_TYPES["oci"]["config"], config),
        "layers": [descriptor(layer.media_type, blob) for layer, blob in zip(layers, blobs, strict=True)],
    }
    digest = push_manifest(registry.host, repo, "latest", canonical_json(manifest))
    return f"{registry.host}/{repo}@{digest}"


# -- huge header records: refused before they are read, in one line naming the layer

HUGE = 512 << 20  # what the record's header claims, and what follows it in the layer
RECORDS = {"pax": b"x", "pax-global": b"g", "gnu-long-name": b"L", "gnu-long-link": b"K"}


def huge_record(kind: bytes) -> Iterator[bytes]:
    """A record header claiming HUGE bytes, HUGE bytes of it, then an ordinary file: a 2.3 MB gzip layer."""
    yield ustar_header(b"././@Record", kind, HUGE)
    for _ in range(HUGE >> 20):
        yield b"a" * (1 << 20)
    yield file_entry(b"after the record", b"after") + END


@pytest.fixture(scope="module")
def huge_layers(shared: Path) -> dict[str, Layer]:
    folder = shared / "huge"
    folder.mkdir()
    return {name: write_streamed_layer(folder, huge_record(kind)) for name, kind in RECORDS.items()}


def check_refused(outcome: str, layer: Layer, peak: int) -> None:
    assert outcome.startswith(f"layer sha256:{layer.blob.name}: refused: a ")
    assert f"of {HUGE} bytes, larger than the 1048576-byte limit" in outcome
    assert peak < MAX_PEAK_KIB


@pytest.mark.parametrize("name", RECORDS)
def test_huge_header_record_is_refused_before_it_is_read(name: str, huge_layers: dict[str, Layer], tmp_path: Path):
    layer = huge_layers[name]
    assert layer.blob.stat().st_size < 4 << 20  # a small blob that claims 512 MiB
    outcome, peak, seconds = apply_in_child(layer, tmp_path / "rootfs")
    check_refused(outcome, layer, peak)
    assert seconds < 20  # nothing of the 512 MiB record was decompressed
    assert list((tmp_path / "rootfs").iterdir()) == []


@as_root
def test_huge_header_record_is_refused_as_an_ordinary_user(huge_layers: dict[str, Layer], shared: Path, unprivileged):
    folder = user_owned(shared, "huge-as-user")
    for layer in huge_layers.values():
        outcome, peak, _ = apply_in_child(layer, folder / "rootfs", unprivileged)
        check_refused(outcome, layer, peak)


@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
def test_huge_header_record_pulled_is_one_line_and_flat_memory(
    as_user: bool, huge_layers: dict[str, Layer], registry: Registry, shared: Path, request
) -> None:
    user = request.getfixturevalue("unprivileged") if as_user else None
    ref = push_layers(registry, "huge-records", [huge_layers["pax"]])
    folder = user_owned(shared, f"huge-pull-{as_user}")
    done, peak = pull_in_child(ref, folder / "image", folder / "cache", user)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()  # one line, not the 1 GiB that tarfile printed
    assert line.startswith(f"d-pull: error: layer sha256:{huge_layers['pax'].blob.name}: refused: a pax header record")
    assert peak < MAX_PEAK_KIB


# -- hundreds of thousands of entries: memory stays flat


def streamed(entries: Iterable[bytes]) -> Iterator[bytes]:
    """The tar data of `entries`, in chunks, then the end marker."""
    batch = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == 4096:
            yield b"".join(batch)
            batch = []
    yield b"".join(batch) + END


def many_entries(count: int) -> Iterator[bytes]:
    """`count` empty files in 20 folders, one after the other."""
    return streamed(ustar_header(b"d%d/f%d" % (n * 20 // count, n)) for n in range(count))


@pytest.fixture
def fast_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when there is one: hundreds of thousands of inodes on this machine's disk take minutes to
    make and remove, and what is measured here is the applying process's memory, not the disk."""
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(dir=shm, prefix="d-utils-many-"))
    folder.chmod(0o755)
    yield folder
    remove_tree(folder)  # read-only folders with files in them too, as an ordinary user


# Both counts past what apply keeps in memory before it bounds it (Hashes.RECENT, Journal.KNOWN: 65,536 each), and
# short of Hashes' second merge (at 131,072: its transient arrays are a step of 1 to 3 MB), so that the difference of
# the two peaks is what grows with the count against the bounds (tarfile's list of members took 611 bytes an entry:
# 611 MB for a million).
FEWER, MORE = 70_000, 130_000
SLOPE = 40  # bytes an entry more, at most (11 measured for files)
DIRECTORY_SLOPE = 80  # the journal's pages too: 27 measured as root, 40 as the ordinary user


@pytest.mark.integration  # slow: hundreds of thousands of entries
@pytest.mark.timeout(300)
def test_many_entries_keep_memory_flat(fast_folder: Path) -> None:
    """Two layers of empty files, one nearly twice the other: nearly the same peak."""
    peaks = {}
    for count in (FEWER, MORE):
        folder = fast_folder / f"files-{count}"
        folder.mkdir()
        layer = write_streamed_layer(folder, many_entries(count))
        outcome, peaks[count], seconds = apply_in_child(layer, folder / "rootfs")
        assert outcome == "applied"
        assert sum(len(os.listdir(folder / "rootfs" / f"d{n}")) for n in range(20)) == count
        print(f"{count} entries: {seconds:.1f} s, peak {peaks[count]} KiB")
        remove_tree(folder)  # the next layer has the memory of tmpfs to itself
    assert max(peaks.values()) < 80_000  # KiB
    assert peaks[MORE] - peaks[FEWER] < (MORE - FEWER) * SLOPE // 1024


# -- hundreds of thousands of directories, pulled: memory stays flat, every mode and time as the layer says

DIR_MODES = (0o555, 0o000, 0o750)  # read-only and mode-0000 ones among them, for the ordinary user
LAYER_MTIME_NS = 1_700_000_000 * 10**9  # ustar_header's


def directory(n: int) -> bytes:
    return ustar_header(b"d%d/" % n, b"5", mode=DIR_MODES[n % len(DIR_MODES)])


def directories(count: int) -> Iterator[bytes]:
    return streamed(map(directory, range(count)))


def directories_then_files(count: int) -> Iterator[bytes]:
    """`count` directories each holding one file: the even ones listed first (read-only), then every file, which
    makes the odd directories. A file comes far after its directory: no cache of recent paths holds them all."""
    listed = (ustar_header(b"d%d/" % n, b"5", mode=0o555) for n in range(0, count, 2))
    return streamed(itertools.chain(listed, (ustar_header(b"d%d/f" % n) for n in range(count))))


def owned_folder(parent: Path, name: str, user) -> Path:
    """A folder for one pull, owned by the ordinary user when the pull runs as them."""
    folder = parent / name
    folder.mkdir()
    if user:
        shutil.chown(folder, USER, USER)
    return folder


@pytest.fixture(scope="module")
def pushed_once(registry: Registry, tmp_path_factory) -> Callable[..., str]:
    """pushed(name, make, *args): a one-layer image of the tar data `make(*args)`, made and pushed the first time it is
    asked for, then pulled by root and by the ordinary user alike; its reference by digest."""
    folder, refs = tmp_path_factory.mktemp("streamed-layers"), {}

    def pushed(name: str, make: Callable[..., Iterator[bytes]], *args: object) -> str:
        if name not in refs:
            refs[name] = push_layers(registry, name, [write_streamed_layer(folder, make(*args))])
        return refs[name]

    return pushed


def pull_streamed(ref: str, parent: Path, name: str, user) -> tuple[Path, int]:
    """The image `ref` pulled by d-pull (as `user` when given) into `parent`/`name`: its rootfs, peak KiB."""
    folder = owned_folder(parent, name, user)
    started = time.monotonic()
    done, peak = pull_in_child(ref, folder / "image", folder / "cache", user)
    assert done.returncode == 0, done.stderr
    print(f"{name}: pulled in {time.monotonic() - started:.1f} s, peak {peak} KiB")
    return folder / "image" / "rootfs", peak


def modes_and_times(rootfs: Path) -> dict[int, tuple[int, int, list[str]]]:
    """n -> (mode, mtime_ns, names inside) of each directory dN of the rootfs; nothing else may be there."""
    found = {}
    with os.scandir(rootfs) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            assert stat.S_ISDIR(st.st_mode) and entry.name.startswith("d"), entry.name
            inside = os.listdir(entry.path) if st.st_mode & 0o500 == 0o500 else []  # others are empty here
            found[int(entry.name[1:])] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns, inside)
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
def test_many_directories_pulled_keep_memory_flat(as_user: bool, pushed_once, fast_folder: Path, request) -> None:
    """Two layers of directories side by side, one nearly twice the other: nearly the same peak, far below what a
    record in memory per directory took (~330 bytes each: 19 MB more for the larger one)."""
    user = request.getfixturevalue("unprivileged") if as_user else None
    peaks = {}
    for count in (FEWER, MORE):
        ref = pushed_once(f"dirs-{count}", directories, count)
        rootfs, peaks[count] = pull_streamed(ref, fast_folder, f"dirs-{count}", user)
        found = modes_and_times(rootfs)
        assert sorted(found) == list(range(count))
        assert {n: mode for n, (mode, _, _) in found.items()} == {n: DIR_MODES[n % 3] for n in range(count)}
        assert {mtime for _, mtime, _ in found.values()} == {LAYER_MTIME_NS}
        remove_tree(rootfs.parent)  # the next pull has the memory of tmpfs to itself
    assert max(peaks.values()) < MAX_PEAK_KIB
    assert peaks[MORE] - peaks[FEWER] < (MORE - FEWER) * DIRECTORY_SLOPE // 1024


@pytest.mark.timeout(300)
@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
def test_directories_each_holding_a_file_pulled_with_flat_memory(
    as_user: bool, pushed_once, fast_folder: Path, request
) -> None:
    user = request.getfixturevalue("unprivileged") if as_user else None
    count = 100_000
    ref = pushed_once("dirs-files", directories_then_files, count)
    rootfs, peak = pull_streamed(ref, fast_folder, "dirs-files", user)
    assert peak < MAX_PEAK_KIB
    found = modes_and_times(rootfs)
    assert sorted(found) == list(range(count))
    assert all(inside == ["f"] for _, _, inside in found.values())
    listed = {n: found[n][:2] for n in range(0, count, 2)}
    assert listed == dict.fromkeys(range(0, count, 2), (0o555, LAYER_MTIME_NS))
    assert {found[n][0] for n in range(1, count, 2)} == {0o755}  # made for their file: the usual mode


# -- trees deeper than Python's stack

DEPTH = 1_500
CHAIN = "/".join(["d"] * DEPTH)


def deep_lower() -> Tar:
    """A 1,500-deep chain of folders, a read-only one and a mode-0000 one on the way, a file at the bottom."""
    tar = Tar().file(f"{CHAIN}/bottom", b"bottom")
    for depth, mode in [(500, 0o555), (1_000, 0o000), (DEPTH, 0o500)]:
        tar.dir("/".join(["d"] * depth), mode)
    return tar


DEEP_UPPERS = {
    "file-over-the-tree": (Tar().file("d", b"a file now"), lambda rootfs: (rootfs / "d").read_bytes() == b"a file now"),
    "whiteout-of-the-tree": (Tar().whiteout("d").file("kept"), lambda rootfs: os.listdir(rootfs) == ["kept"]),
    "opaque-over-the-tree": (
        Tar().opaque("d").file("d/new", b"new"),
        lambda rootfs: os.listdir(rootfs / "d") == ["new"],
    ),
    "file-at-the-bottom": (
        Tar().file(f"{CHAIN}/added", b"added"),
        lambda rootfs: sorted(os.listdir(rootfs.joinpath(*CHAIN.split("/")))) == ["added", "bottom"],
    ),
}


def deep_steps(directory: Path, folder: Path) -> list[tuple[Layer, Path]]:
    lower = write_layer(directory, deep_lower().to_bytes())
    steps = []
    for name, (upper, _) in DEEP_UPPERS.items():
        steps += [(lower, folder / name), (write_layer(directory, upper.to_bytes()), folder / name)]
    return steps


def check_deep(folder: Path, results: list) -> None:
    assert [result for result in results if isinstance(result, str)] == []
    for name, (_, check) in DEEP_UPPERS.items():
        assert check(folder / name), name
    assert sorted(os.listdir(folder)) == sorted(DEEP_UPPERS)  # no journal left


@pytest.mark.integration  # slow: deep trees
@pytest.mark.timeout(300)
def test_deep_trees_are_applied_replaced_and_whited_out(tmp_path: Path) -> None:
    try:
        results = [apply_row([layer], rootfs) or {} for layer, rootfs in deep_steps(tmp_path, tmp_path / "trees")]
        check_deep(tmp_path / "trees", results)
    finally:
        remove_tree(tmp_path / "trees")  # pytest's own clean-up of old runs recurses: leave it no deep tree
    assert not (tmp_path / "trees").exists()


@as_root
@pytest.mark.timeout(300)
def test_deep_trees_as_an_ordinary_user(shared: Path, unprivileged) -> None:
    folder = user_owned(shared, "deep")
    check_deep(folder, apply_as_user(unprivileged, shared, deep_steps(shared, folder)))
    assert os.lstat(folder / "file-at-the-bottom" / CHAIN).st_mode & 0o777 == 0o500  # modes put back as given
    assert os.lstat(folder.joinpath("file-at-the-bottom", *CHAIN.split("/")[:1_000])).st_mode & 0o777 == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
def test_update_over_a_deep_tree(as_user: bool, registry: Registry, shared: Path, request) -> None:
    """--update drops the old rootfs (store.remove_tree) however deep, its read-only folders included."""
    user = request.getfixturevalue("unprivileged") if as_user else None
    old = push_layers(registry, "deep", [write_layer(shared, deep_lower().to_bytes())])
    new = push_layers(registry, "deep", [write_layer(shared, Tar().file("new", b"new").to_bytes())])
    folder = user_owned(shared, f"update-{as_user}")
    done, _ = pull_in_child(old, folder / "image", folder / "cache", user)
    assert done.returncode == 0, done.stderr
    done, peak = pull_in_child(new, folder / "image", folder / "cache", user, "--update")
    assert done.returncode == 0, done.stderr
    assert os.listdir(folder / "image" / "rootfs") == ["new"]
    assert peak < MAX_PEAK_KIB


# -- cost linear in the input, memory flat, for every layer and every decompressor: one attack in many shapes

DEEP_NAME = "/".join(["dd"] * 12_000) + "/f"  # one entry, 12,000 folders deep: 182 MB and 496 MB of journal once


def read_deep(rootfs: Path, name: str) -> bytes:
    """The file `name` below `rootfs`, however deep: one folder opened at a time (a path past PATH_MAX fails)."""
    fd = os.open(rootfs, os.O_PATH)
    for part in name.split("/")[:-1]:
        fd, parent = os.open(part, os.O_PATH, dir_fd=fd), fd
        os.close(parent)
    with open(name.rpartition("/")[2], "rb", opener=lambda file, flags: os.open(file, flags, dir_fd=fd)) as file:
        data = file.read()
    os.close(fd)
    return data


def blob_layer(directory: Path, tar: bytes, blob: bytes, compression: str) -> Layer:
    """A layer of the compressed bytes `blob` exactly (headers no compressor of ours writes), `tar` inside."""
    path = directory / hashlib.sha256(blob).hexdigest()
    path.write_bytes(blob)
    path.chmod(0o644)
    return Layer(path, MEDIA[compression], "sha256:" + hashlib.sha256(tar).hexdigest())


def zstd_of_wide_window(directory: Path) -> Layer:
    """A 4 KB zstd layer whose frame asks for a 128 MiB window (no content size: the window is what it says)."""
    tar = file_entry(b"small") + END
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as writer:
        writer.write(tar)
    assert zstandard.get_frame_parameters(out.getvalue()).window_size == 128 << 20
    return blob_layer(directory, tar, out.getvalue(), "zstd")


def gzip_named(directory: Path) -> Layer:
    """A gzip member whose header's file name field (FNAME) runs 8 MiB before its NUL."""
    tar = file_entry(b"small") + END
    body = zlib.compressobj(1, zlib.DEFLATED, -15)
    data = body.compress(tar) + body.flush() + struct.pack("<II", zlib.crc32(tar), len(tar))
    return blob_layer(directory, tar, b"\x1f\x8b\x08\x08\0\0\0\0\0\xff" + b"n" * (8 << 20) + b"\0" + data, "gzip")


def gzip_of_many_members(directory: Path) -> Layer:
    """200,000 gzip members of 2 bytes of tar each: headers and trailers cost per member, never all at once."""
    tar = file_entry(b"m" * 399_000) + END
    blob = b"".join(gzip.compress(tar[at : at + 2], compresslevel=1, mtime=0) for at in range(0, len(tar), 2))
    return blob_layer(directory, tar, blob, "gzip")


def old_gnu_sparse_endless() -> bytes:
    """An old GNU sparse header whose map goes on in extension block after extension block (8 MiB of them)."""
    header = bytearray(ustar_header(b"sparse", b"S"))
    header[482], header[148:156] = 1, b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + (bytes(504) + b"\1" + bytes(7)) * (16 << 10) + END


@dataclass(frozen=True)
class Costly:
    layer: Callable[[Path], Layer]
    refused: str = ""  # what the one line says; empty: applied
    check: Callable[[Path], bool] = lambda rootfs: True


COSTLY = {
    "pax-global-header-of-80000-records": Costly(
        lambda d: write_layer(
            d,
            pax_record(*(f"k{n}=v" for n in range(80_000)), kind=b"g")
            + b"".join(file_entry(b"x", b"f%d" % n) for n in range(3_000))
            + END,
        ),
        check=lambda rootfs: len(os.listdir(rootfs)) == 3_000,
    ),
    "pax-name-12000-folders-deep": Costly(
        lambda d: write_layer(d, pax_record(f"path={DEEP_NAME}") + file_entry(b"deep") + END),
        check=lambda rootfs: read_deep(rootfs, DEEP_NAME) == b"deep",
    ),
    "gnu-long-name-12000-folders-deep": Costly(
        lambda d: write_layer(d, gnu_long_name(DEEP_NAME.encode()) + file_entry(b"deep") + END),
        check=lambda rootfs: read_deep(rootfs, DEEP_NAME) == b"deep",
    ),
    "hard-link-to-a-file-12000-folders-deep": Costly(
        lambda d: write_layer(
            d,
            pax_record(f"path={DEEP_NAME}")
            + file_entry(b"deep")
            + pax_record(f"linkpath={DEEP_NAME}")
            + ustar_header(b"link", b"1")
            + END,
        ),
        check=lambda rootfs: (rootfs / "link").read_bytes() == b"deep" and (rootfs / "link").stat().st_nlink == 2,
    ),
    "symlink-to-a-target-of-1-mib": Costly(
        lambda d: write_layer(d, pax_record(f"linkpath={'t/' * 500_000}") + ustar_header(b"link", b"2") + END),
        refused="member link: File name too long: t/t/",
    ),
    "pax-uid-of-100000-digits": Costly(
        lambda d: write_layer(d, pax_record(f"uid={'9' * 100_000}") + file_entry(b"x") + END),
        refused="invalid pax uid record",
    ),
    "zstd-frame-asking-a-128-mib-window": Costly(zstd_of_wide_window, refused="corrupt zstd data"),
    "gzip-file-name-field-of-8-mib": Costly(gzip_named, refused="corrupt gzip data"),
    "sparse-file-claiming-4-tib": Costly(
        lambda d: write_layer(
            d,
            pax_record("GNU.sparse.map=0,1", "GNU.sparse.numblocks=1", f"GNU.sparse.size={4 << 40}")
            + file_entry(b"x")
            + END,
        ),
        refused="a sparse file of 4398046511104 bytes, over the 1099511627776-byte limit",
    ),
    "old-gnu-sparse-map-of-endless-extension-blocks": Costly(
        lambda d: write_layer(d, old_gnu_sparse_endless()), refused="a GNU sparse map larger than 1048576 bytes"
    ),
    "gzip-of-200000-members": Costly(
        gzip_of_many_members, check=lambda rootfs: (rootfs / "placeholder").stat().st_size == 399_000
    ),
}
WRITTEN = "print(next(line.split()[1] for line in open('/proc/self/io') if line.startswith('wchar:')))"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
@pytest.mark.parametrize("name", COSTLY)
def test_costly_layer_is_applied_or_refused_in_flat_memory_and_bounded_time(
    name: str, as_user: bool, shared: Path, request
) -> None:
    """As the image's author would build it: applied as the layer says, or refused in one line, with the child's
    peak memory under 150 MB, its writes (the journal's included) a few KiB per folder, and its time bounded."""
    user = request.getfixturevalue("unprivileged") if as_user else None
    folder = user_owned(shared, f"costly-{name}-{as_user}")
    row = COSTLY[name]
    layer = row.layer(folder)
    started = time.monotonic()
    argv = [*python_of(user), "-c", APPLY + WRITTEN, layer.blob, layer.media_type, layer.diff_id, folder / "rootfs"]
    done = run_as(user, argv, 240, folder)
    seconds = time.monotonic() - started
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    outcome, peak, written = done.stdout.splitlines()
    if row.refused:
        assert outcome.startswith(f"layer sha256:{layer.blob.name}: ") and row.refused in outcome
        assert len(outcome) < 1_000  # the 1 MiB name is shortened
    else:
        assert outcome == "applied"
        assert row.check(folder / "rootfs")
    assert int(peak) < MAX_PEAK_KIB
    assert int(written) < 12_000 * 16 << 10 and seconds < 200  # the quadratic journal wrote 496 MB
    print(f"{name}: {seconds:.1f} s, peak {peak} KiB, {int(written) >> 20} MiB written")
