"""Whole images through a real registry and d-pull, as root and as the ordinary user: the layer catalogue, pushed
by our helpers and by skopeo in every media type and compression, compared with umoci's unpacking; Docker foreign
and OCI non-distributable layers; the malicious layers of tests/malicious.py; pax mtimes; and a Debian minbase
image built by debootstrap (cached in cache/test-images), which d-run can use."""

import gzip
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from catalogue import DEVICES, assert_same_as_umoci_rootless, catalogue_image, umoci_unpack
from cli import assert_one_line_error, d_pull, d_run
from images import (
    MEDIA_TYPES,
    Image,
    Tar,
    canonical_json,
    descriptor,
    push,
    push_blob,
    push_manifest,
    skopeo_push,
)
from malicious import ROWS, USER, Row, as_root, check_outcome, outside_state, plant_markers
from registry_server import Registry, session
from trees import snapshot

from dutils.locks import locked

pytestmark = pytest.mark.integration  # registries of its own

# -- the catalogue, end to end

# How the catalogue image reaches the registry: our push in each media type and compression, or skopeo's copy of
# the OCI layout umoci unpacks ("oci" keeps the manifest, "v2s2" converts it to Docker's). Every one is compared
# with umoci's unpacking of the gzip layout: umoci 0.4.7 cannot read zstd, and the layers' content is the same.
MEDIAS, COMPRESSIONS = ("oci", "docker"), ("gzip", "none", "zstd")
PUSHES = [
    *(f"push-{media}-{compression}" for media in MEDIAS for compression in COMPRESSIONS),
    "skopeo-oci",
    "skopeo-v2s2",
]


@pytest.fixture(scope="module")
def catalogue_refs(registry: Registry, umoci: dict[str, Path]) -> dict[str, str]:
    """Each way of PUSHES -> the reference it pushed the catalogue image to."""
    refs = {name: f"{registry.host}/catalogue:{name}" for name in PUSHES}
    for media in MEDIAS:
        for compression in COMPRESSIONS:
            image = replace(catalogue_image(), media=media, compression=compression)
            push(registry.host, "catalogue", f"push-{media}-{compression}", image)
    for manifest_format in ("oci", "v2s2"):
        skopeo_push(umoci["layout"], "catalogue", refs[f"skopeo-{manifest_format}"], manifest_format)
    return refs


def layer_types(registry: Registry, ref: str) -> set[str]:
    """The layer media types of the manifest the registry serves for `ref`."""
    with session() as http:
        tag = ref.rsplit(":", 1)[1]
        accept = {"Accept": ", ".join(MEDIA_TYPES[media]["manifest"] for media in MEDIA_TYPES)}
        answer = http.get(f"{registry.url}/v2/catalogue/manifests/{tag}", headers=accept, timeout=30)
        answer.raise_for_status()
    return {layer["mediaType"] for layer in answer.json()["layers"]}


@as_root
@pytest.mark.parametrize("how", PUSHES)
def test_catalogue_pulled_as_root_is_umocis_tree(how: str, catalogue_refs, umoci, tmp_path: Path) -> None:
    done = d_pull(catalogue_refs[how], str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # root reproduces devices and owners
    assert snapshot(tmp_path / "pulled" / "rootfs") == snapshot(umoci["root"])  # owners and mtimes included


@as_root
@pytest.mark.parametrize("how", PUSHES)
def test_catalogue_pulled_as_the_ordinary_user_is_umocis_rootless_tree(
    how: str, catalogue_refs, umoci, workspace: Path, unprivileged
) -> None:
    folder = workspace / "pull" / how
    done = unprivileged.tool("d-pull", "--cache", workspace / "pull" / "cache", catalogue_refs[how], folder)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"d-pull: warning: as an ordinary user: {len(DEVICES)} device nodes skipped, 2 entries"
        " owned by other users in the image now belong to you"
    ]
    assert_same_as_umoci_rootless(folder / "rootfs", umoci["rootless"], DEVICES)
    user = pwd.getpwnam(USER)
    assert {entry.owner for entry in snapshot(folder / "rootfs")[0].values()} == {(user.pw_uid, user.pw_gid)}


@as_root
def test_each_push_stores_the_layer_types_it_names(registry: Registry, catalogue_refs) -> None:
    expected = {
        f"push-{media}-{compression}": MEDIA_TYPES[media][compression]
        for media in MEDIAS
        for compression in COMPRESSIONS
    }
    expected |= {"skopeo-oci": MEDIA_TYPES["oci"]["gzip"], "skopeo-v2s2": MEDIA_TYPES["docker"]["gzip"]}
    assert {how: layer_types(registry, ref) for how, ref in catalogue_refs.items()} == {
        how: {expected[how]} for how in PUSHES
    }


# -- Docker foreign and OCI non-distributable layers: `urls` name where else the blob may be found

FOREIGN = {
    ("docker", "none"): "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ("oci", "none"): "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}
NOWHERE = "http://127.0.0.1:9/blobs/"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def url_registry() -> Registry:
    """A registry that accepts layers with `urls` (docker-registry refuses them unless told which to allow)."""
    with Registry({"validation": {"manifests": {"urls": {"allow": ["^https?://"]}}}}) as started:
        yield started


def push_foreign(registry: str, repo: str, image: Image, layer_type: str, missing: int | None = None) -> str:
    """Pushes `image` with every layer typed `layer_type` and given `urls`, without the blob of layer `missing`;
    returns the reference."""
    manifest = json.loads(image.manifest)
    for layer in manifest["layers"]:
        layer |= {"mediaType": layer_type, "urls": [NOWHERE + layer["digest"]]}
    push_blob(registry, repo, image.config_blob)
    for number, blob in enumerate(image.layer_blobs):
        if number != missing:
            push_blob(registry, repo, blob)
    push_manifest(registry, repo, "latest", canonical_json(manifest))
    return f"{registry}/{repo}:latest"


@as_root
@pytest.mark.parametrize(("media", "compression"), list(FOREIGN))
def test_foreign_layers_the_registry_holds_are_pulled_from_it(
    media: str, compression: str, url_registry: Registry, umoci, tmp_path: Path
) -> None:
    image = replace(catalogue_image(), media=media, compression=compression)
    ref = push_foreign(url_registry.host, f"foreign-{media}-{compression}", image, FOREIGN[media, compression])
    done = d_pull(ref, str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert snapshot(tmp_path / "pulled" / "rootfs") == snapshot(umoci["root"])


def test_a_foreign_layer_missing_from_the_registry_is_a_one_line_error(url_registry: Registry, tmp_path: Path) -> None:
    image = Image([Tar().file("a", b"a"), Tar().file("b", b"b")], media="docker")
    ref = push_foreign(url_registry.host, "foreign-missing", image, FOREIGN["docker", "gzip"], missing=1)
    done = d_pull(ref, str(tmp_path / "pulled"), cache=tmp_path / "cache")
    missing = json.loads(image.manifest)["layers"][1]["digest"]
    assert_one_line_error(done, missing, "non-distributable", "--allow-foreign-urls")
    assert json.loads((tmp_path / "pulled" / "image.json").read_text())["complete"] is False


# -- malicious images through d-pull: nothing outside DIR changes, and the user reads one clear line


def outside_dirs(roots: list[Path], folders: list[Path]) -> dict[str, tuple]:
    """outside_state of `roots`, but for the pull folders, which d-pull makes and fills."""
    return {
        path: state
        for path, state in outside_state(roots).items()
        if not any(Path(path).is_relative_to(folder) for folder in folders)
    }


def check_pull_outcome(row: Row, done: subprocess.CompletedProcess, rootfs: Path, out: Path) -> None:
    """A refused row ends in one line naming the member; any other pull succeeds, its write kept inside."""
    if row.refused:
        assert_one_line_error(done, row.refused)
        error = done.stderr.strip().splitlines()[-1].removeprefix("d-pull: error: ")
        check_outcome(row, error, rootfs, out)
    else:
        assert done.returncode == 0, done.stderr
        check_outcome(row, "", rootfs, out)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_malicious_image_pulled_changes_nothing_outside_dir(row: Row, registry: Registry, tmp_path: Path) -> None:
    base, out, folder = tmp_path / "base", tmp_path / "outside", tmp_path / "base" / "pull"
    plant_markers(base / "victim.txt", out / "victim.txt")
    digest = push(registry.host, "malicious", row.name, Image(row.layers(str(out))))
    passwd, before = os.stat("/etc/passwd"), outside_dirs([base, out], [folder])

    done = d_pull(f"{registry.host}/malicious@{digest}", str(folder), cache=tmp_path / "cache")

    assert outside_dirs([base, out], [folder]) == before
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    check_pull_outcome(row, done, folder / "rootfs", out)


@as_root
def test_malicious_images_pulled_by_the_ordinary_user_change_nothing_outside_dir(
    registry: Registry, workspace: Path, unprivileged
) -> None:
    """The same table, pulled by a real unprivileged user who owns, so could write, every marker."""
    base = workspace / "pull" / "malicious"
    refs, folders = {}, [base / row.name / "pull" for row in ROWS]
    for row in ROWS:
        plant_markers(base / row.name / "victim.txt", base / "outside" / row.name / "victim.txt")
        digest = push(registry.host, "malicious", row.name, Image(row.layers(str(base / "outside" / row.name))))
        refs[row.name] = f"{registry.host}/malicious@{digest}"
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(base)], check=True)
    roots = [folder.parent for folder in folders] + [base / "outside"]  # their own mtimes move as DIRs are made
    before = outside_dirs(roots, folders)

    pulls = [
        unprivileged.tool("d-pull", "--cache", base / "cache", refs[row.name], folder, timeout=60)
        for row, folder in zip(ROWS, folders, strict=True)
    ]

    assert outside_dirs(roots, folders) == before
    for row, folder, done in zip(ROWS, folders, pulls, strict=True):
        check_pull_outcome(row, done, folder / "rootfs", base / "outside" / row.name)


# -- modification times as pax records give them: nine decimals kept, impossible ones refused


def pax_mtime_layer(mtime: str) -> Tar:
    """A directory, a file in it and a symbolic link, each with the pax record mtime=`mtime`."""
    members = [tarfile.TarInfo("d"), tarfile.TarInfo("d/f"), tarfile.TarInfo("l")]
    members[0].type, members[0].mode = tarfile.DIRTYPE, 0o755
    members[2].type, members[2].linkname = tarfile.SYMTYPE, "d/f"
    tar = Tar()
    for info in members:
        info.pax_headers = {"mtime": mtime}
        tar.raw(info, b"f" if info.isfile() else None)
    return tar


@pytest.mark.parametrize(
    ("mtime", "nanoseconds"),
    [
        ("1700000000.123456789", 1_700_000_000_123_456_789),
        ("1700000000.9999999999", 1_700_000_000_999_999_999),
        ("-1.5", -1_500_000_000),
    ],
)
def test_pax_mtimes_are_kept_to_the_nanosecond(
    mtime: str, nanoseconds: int, registry: Registry, tmp_path: Path
) -> None:
    digest = push(registry.host, "mtimes", "exact", Image([pax_mtime_layer(mtime)]))
    done = d_pull(f"{registry.host}/mtimes@{digest}", str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    rootfs = tmp_path / "pulled" / "rootfs"
    assert [os.lstat(rootfs / name).st_mtime_ns for name in ("d", "d/f", "l")] == [nanoseconds] * 3


@pytest.mark.parametrize("mtime", ["nan", "1e999999999", "99999999999999999999", "yesterday"])
def test_an_impossible_mtime_is_a_one_line_error_naming_the_member(
    mtime: str, registry: Registry, tmp_path: Path
) -> None:
    digest = push(registry.host, "mtimes", "impossible", Image([pax_mtime_layer(mtime)]))
    done = d_pull(f"{registry.host}/mtimes@{digest}", str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert_one_line_error(done, "member d: modification time", repr(mtime))


# -- a real distribution: Debian bookworm minbase, built by debootstrap once and cached between runs

CACHE = Path(__file__).resolve().parents[1] / "cache" / "test-images"  # git-ignored
DEBIAN_LAYER = CACHE / "debian-minbase.tar.gz"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_CONFIG = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["bash"]}
# Left out as Debian's own images leave them out: downloaded packages and package lists.
DEBIAN_EXCLUDES = ["./var/cache/apt/archives/*.deb", "./var/cache/apt/*.bin", "./var/lib/apt/lists/*"]
DEBOOTSTRAP_TIMEOUT = 900  # about 35 s on a 2-core machine near the mirror


def run_bounded(argv: list, timeout: float) -> str:
    """Runs `argv` in a process group of its own, killed whole after `timeout` seconds; returns its output."""
    with subprocess.Popen(
        [str(word) for word in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as child:
        try:
            output, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise
    assert child.returncode == 0, f"{argv[0]} exited {child.returncode}: {output[-3000:]}"
    return output


def unreachable(url: str, timeout: float = 10) -> str:
    """Why `url` does not answer within `timeout` seconds ("" when it does); a child process bounds DNS too."""
    probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout={timeout / 2}).close()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout} s"
    return done.stderr.strip().splitlines()[-1] if done.returncode else ""


def skip_unless_debootstrap_can_run() -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{DEBIAN_LAYER} is missing and debootstrap needs root to make it")
    if not shutil.which("debootstrap"):
        pytest.skip(f"{DEBIAN_LAYER} is missing and debootstrap is not installed")
    if why := unreachable(f"{DEBIAN_MIRROR}/dists/bookworm/Release"):
        pytest.skip(f"{DEBIAN_LAYER} is missing and {DEBIAN_MIRROR} is unreachable: {why}")


def unmount_below(root: Path) -> None:
    """Unmounts what a killed debootstrap left mounted in its target (proc, sys), so that deleting it stays inside."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=True, timeout=30)


def build_debian_layer(layer: Path, packages: tuple[str, ...], chrooted: tuple[tuple[str, ...], ...]) -> None:
    """debootstrap minbase (and `packages`) into a scratch folder, run the `chrooted` commands in it, then its tree
    as one gzip tar `layer` under a partial name, renamed when whole. The caller holds the lock."""
    partial = layer.with_name(layer.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="d-utils-debootstrap-") as scratch:
        root = Path(scratch) / "rootfs"
        include = [f"--include={','.join(packages)}"] if packages else []
        try:
            run_bounded(
                ["debootstrap", "--variant=minbase", *include, "bookworm", root, DEBIAN_MIRROR], DEBOOTSTRAP_TIMEOUT
            )
        finally:
            unmount_below(root)
        for command in chrooted:
            run_bounded(["chroot", root, *command], 60)
        excludes = [f"--exclude={pattern}" for pattern in DEBIAN_EXCLUDES]
        tar = ["tar", "--create", "--gzip", "--numeric-owner", "--sort=name", "--format=posix", *excludes]
        run_bounded([*tar, "--directory", root, "--file", partial, "."], timeout=300)
    os.replace(partial, layer)


def debian_layer(
    layer: Path = DEBIAN_LAYER, packages: tuple[str, ...] = (), chrooted: tuple[tuple[str, ...], ...] = ()
) -> Path:
    """The cached layer, made on first use; concurrent test runs wait for the one that makes it."""
    if not layer.exists():
        skip_unless_debootstrap_can_run()
        with locked(layer.with_name(layer.name + ".lock")):
            if not layer.exists():  # else another run made it while we waited
                build_debian_layer(layer, packages, chrooted)
    return layer


def uncompressed_digest(blob: Path) -> str:
    sha256 = hashlib.sha256()
    with gzip.open(blob) as tar:
        while chunk := tar.read(1 << 20):
            sha256.update(chunk)
    return f"sha256:{sha256.hexdigest()}"


def push_gzip_layer_image(registry: str, repo: str, tag: str, layer: Path, config: dict) -> str:
    """Pushes a one-layer OCI image of the gzip tar `layer` as it is (Image would compress it again); returns the
    reference."""
    types = MEDIA_TYPES["oci"]
    architecture = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True)
    rootfs = {"type": "layers", "diff_ids": [uncompressed_digest(layer)]}
    image_config = {"os": "linux", "architecture": architecture.stdout.strip(), "config": config, "rootfs": rootfs}
    config_blob, layer_blob = canonical_json(image_config), layer.read_bytes()
    manifest = {
        "schemaVersion": 2,
        "mediaType": types["manifest"],
        "config": descriptor(types["config"], config_blob),
        "layers": [descriptor(types["gzip"], layer_blob)],
    }
    for blob in (config_blob, layer_blob):
        push_blob(registry, repo, blob)
    push_manifest(registry, repo, tag, canonical_json(manifest))
    return f"{registry}/{repo}:{tag}"


@pytest.fixture(scope="module")
def debian(registry: Registry) -> str:
    """The reference of the Debian minbase image in the test registry."""
    return push_gzip_layer_image(registry.host, "debian", "bookworm-minbase", debian_layer(), DEBIAN_CONFIG)


@pytest.fixture(scope="module")
def debian_umoci(debian: str, workspace: Path) -> dict[str, Path]:
    """umoci's unpacking of the Debian image as skopeo copies it from the registry into an OCI layout."""
    folder = workspace / "debian"
    folder.mkdir()
    command = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"]
    run_bounded([*command, f"docker://{debian}", f"oci:{folder}/layout:debian"], timeout=120)
    return umoci_unpack(f"{folder}/layout:debian", folder)


def installed_packages(rootfs: Path) -> set[str]:
    """The packages dpkg's database in `rootfs` says are installed."""
    stanzas = (rootfs / "var/lib/dpkg/status").read_text().split("\n\n")
    fields = [dict(re.findall(r"^(Package|Status): (.*)$", stanza, re.MULTILINE)) for stanza in stanzas]
    return {field["Package"] for field in fields if field.get("Status") == "install ok installed"}


def assert_debian_runs(folder: Path, d_run_as) -> None:
    """d-run's dpkg -l lists exactly the installed packages, and the image says it is Debian 12."""
    listed = d_run_as(folder, "dpkg", "-l")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[1].split(":")[0] for line in listed.stdout.splitlines() if line.startswith("ii  ")]
    assert sorted(rows) == sorted(installed_packages(folder / "rootfs"))
    assert {"dpkg", "base-files", "apt", "bash", "coreutils"} <= set(rows)
    version = d_run_as(folder, "cat", "/etc/debian_version")
    assert version.returncode == 0 and re.fullmatch(r"12\.\d+\n", version.stdout), version


@as_root
@pytest.mark.timeout(DEBOOTSTRAP_TIMEOUT + 300)
def test_debian_pulled_as_root_is_umocis_tree_and_runs_dpkg(debian: str, debian_umoci, tmp_path: Path) -> None:
    done = d_pull(debian, str(tmp_path / "debian"), cache=tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr
    assert snapshot(tmp_path / "debian" / "rootfs") == snapshot(debian_umoci["root"])  # nanosecond mtimes too
    assert_debian_runs(tmp_path / "debian", d_run)


@as_root
@pytest.mark.timeout(DEBOOTSTRAP_TIMEOUT + 300)
def test_debian_pulled_as_the_ordinary_user_is_umocis_rootless_tree_and_runs_dpkg(
    debian: str, debian_umoci, workspace: Path, unprivileged
) -> None:
    folder, cache = workspace / "pull" / "debian", workspace / "pull" / "cache"
    done = unprivileged.tool("d-pull", "--cache", cache, debian, folder, timeout=300)
    assert done.returncode == 0, done.stderr
    root_entries = snapshot(debian_umoci["root"])[0]
    devices = [path for path, entry in root_entries.items() if entry.kind in "cb"]
    assert len(devices) >= 5  # debootstrap makes /dev/null, zero, full, random, urandom, tty...
    assert f"{len(devices)} device nodes skipped" in done.stderr
    assert_same_as_umoci_rootless(folder / "rootfs", debian_umoci["rootless"], devices)

    def d_run_as_user(folder: Path, *args: str) -> subprocess.CompletedProcess:
        return unprivileged.tool("d-run", folder, *args, timeout=60)

    assert_debian_runs(folder, d_run_as_user)
