"""The test rig itself: builders, the registry and its counters, the standard images, the ordinary user, the demo."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
import zstandard
from images import (
    ALL_MANIFEST_TYPES,
    APPLETS,
    BUSYBOX,
    DOCKER_MANIFEST,
    MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    OS_RELEASE,
    Image,
    Tar,
    busybox_image,
    busybox_layer,
    compress,
    push,
    push_index,
    sha256,
    write_oci_layout,
)
from registry_server import Registry, session

REPO = Path(__file__).parents[1]


def get_manifest(reference: str) -> requests.Response:
    """GET host/repo:tag or host/repo@digest, checking the digest the registry states."""
    host, _, rest = reference.partition("/")
    repo, _, tag = rest.rpartition("@" if "@" in rest else ":")
    response = session().get(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": ALL_MANIFEST_TYPES}, timeout=30
    )
    response.raise_for_status()
    assert response.headers["Docker-Content-Digest"] == sha256(response.content)
    return response


def members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {member.name: member for member in archive.getmembers()}


# -- builders


def test_tar_builder_makes_every_kind_of_member() -> None:
    long_name = "d/" + "x" * 150 + "/é.txt"
    tar = (
        Tar()
        .dir("d", 0o750, uid=7)
        .file(long_name, b"data", mode=0o4755, gid=5)
        .symlink("d/abs", "/etc/passwd")
        .hardlink("d/hard", long_name)
        .fifo("d/fifo", 0o600)
        .device("d/null")
        .device("d/loop", "block", 7, 0)
        .whiteout("d/gone")
        .whiteout("top")
        .opaque("d/")
        .raw(tarfile.TarInfo("../escape"), b"bad")
        .to_bytes()
    )
    found = members(tar)
    assert list(found) == ["d", long_name, "d/abs", "d/hard", "d/fifo", "d/null", "d/loop"] + [
        "d/.wh.gone",
        ".wh.top",
        "d/.wh..wh..opq",
        "../escape",
    ]
    assert found["d"].isdir() and (found["d"].mode, found["d"].uid) == (0o750, 7)
    assert found[long_name].isfile() and (found[long_name].mode, found[long_name].gid, found[long_name].size) == (
        0o4755,
        5,
        4,
    )
    assert found["d/abs"].issym() and found["d/abs"].linkname == "/etc/passwd"
    assert found["d/hard"].islnk() and found["d/hard"].linkname == long_name
    assert found["d/fifo"].isfifo() and found["d/fifo"].mode == 0o600
    assert found["d/null"].ischr() and (found["d/null"].devmajor, found["d/null"].devminor) == (1, 3)
    assert found["d/loop"].isblk() and (found["d/loop"].devmajor, found["d/loop"].devminor) == (7, 0)
    assert found["../escape"].size == 3


def test_builders_are_deterministic() -> None:
    assert Tar().file("a", b"1").to_bytes() == Tar().file("a", b"1").to_bytes()
    assert busybox_image().manifest_digest == busybox_image().manifest_digest
    assert Image([b"x"], {}, media="docker").manifest_digest != Image([b"x"], {}).manifest_digest


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_compress_round_trips(compression: str) -> None:
    tar = Tar().file("a", os.urandom(1000)).to_bytes()
    blob = compress(tar, compression)
    expand = {"none": bytes, "gzip": gzip.decompress, "zstd": zstandard.ZstdDecompressor().decompress}
    assert expand[compression](blob) == tar
    assert (blob == tar) == (compression == "none")


@pytest.mark.parametrize("media", ["oci", "docker"])
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_image_manifest_and_config_agree(media: str, compression: str) -> None:
    image = Image(
        [busybox_layer(), Tar().file("x").to_bytes()], {"Cmd": ["sh"]}, compression, media, arch="arm64", variant="v8"
    )
    manifest = json.loads(image.manifest)
    config = json.loads(image.config_blob)
    assert manifest["mediaType"] == MEDIA_TYPES[media]["manifest"]
    assert manifest["config"] == {
        "mediaType": MEDIA_TYPES[media]["config"],
        "digest": sha256(image.config_blob),
        "size": len(image.config_blob),
    }
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MEDIA_TYPES[media][compression]] * 2
    assert [layer["digest"] for layer in manifest["layers"]] == [sha256(blob) for blob in image.layer_blobs]
    assert config["rootfs"]["diff_ids"] == [sha256(layer) for layer in image.layers]
    assert (config["architecture"], config["os"], config["variant"], config["config"]) == (
        "arm64",
        "linux",
        "v8",
        {"Cmd": ["sh"]},
    )
    assert set(image.blobs()) == {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}


def test_busybox_layer_is_a_usable_root() -> None:
    found = members(busybox_layer())
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert set(APPLETS.split()) <= set(applets)
    assert all(found[f"bin/{applet}"].linkname == "/bin/busybox" for applet in APPLETS.split())
    assert (found["home/app"].uid, found["tmp"].mode, found["root"].mode) == (1000, 0o1777, 0o700)
    with tarfile.open(fileobj=io.BytesIO(busybox_layer())) as archive:
        assert archive.extractfile("bin/busybox").read() == BUSYBOX.read_bytes()
        assert b"app:x:1000:1000::/home/app:/bin/sh\n" in archive.extractfile("etc/passwd").read()
        assert b"app:x:1000:\n" in archive.extractfile("etc/group").read()


def test_oci_layout_is_read_by_umoci(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, busybox_image(), "latest")
    write_oci_layout(layout, Image([Tar().file("only", b"me").to_bytes()], {}), "small")
    write_oci_layout(layout, busybox_image(), "latest")  # re-adding a tag replaces it
    listed = subprocess.run(["umoci", "ls", "--layout", layout], capture_output=True, text=True, check=True, timeout=60)
    assert sorted(listed.stdout.split()) == ["latest", "small"]
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "raw", "unpack", "--image", f"{layout}:latest", bundle], capture_output=True, check=True, timeout=60
    )
    assert (bundle / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert (bundle / "etc" / "added-by-layer-2").exists() and not (bundle / "etc" / "removed-by-layer-2").exists()
    assert (bundle / "etc" / "os-release").read_bytes() == OS_RELEASE


# -- the registry and the standard images


@pytest.mark.parametrize(
    ("name", "media_type", "layer_type"),
    [
        ("busybox", OCI_MANIFEST, MEDIA_TYPES["oci"]["gzip"]),
        ("busybox-plain", OCI_MANIFEST, MEDIA_TYPES["oci"]["none"]),
        ("busybox-docker", DOCKER_MANIFEST, MEDIA_TYPES["docker"]["gzip"]),
        ("busybox-oci", OCI_MANIFEST, MEDIA_TYPES["oci"]["gzip"]),
    ],
)
def test_standard_images_are_stored_with_their_media_types(
    name: str, media_type: str, layer_type: str, images: dict[str, str]
) -> None:
    response = get_manifest(images[name])
    manifest = response.json()
    assert response.headers["Content-Type"] == manifest["mediaType"] == media_type
    assert [layer["mediaType"] for layer in manifest["layers"]] == [layer_type] * 2


def test_multi_is_an_index_of_two_platforms_and_an_attestation(images: dict[str, str]) -> None:
    response = get_manifest(images["multi"])
    index = response.json()
    assert response.headers["Content-Type"] == index["mediaType"] == OCI_INDEX
    platforms = [
        (entry["platform"]["os"], entry["platform"]["architecture"], entry["platform"].get("variant"))
        for entry in index["manifests"]
    ]
    assert platforms == [("linux", "amd64", None), ("linux", "arm64", "v8"), ("unknown", "unknown", None)]
    amd64, _, attestation = index["manifests"]
    assert attestation["annotations"]["vnd.docker.reference.digest"] == amd64["digest"]
    for entry in index["manifests"]:  # each one pushed by digest
        assert get_manifest(images["multi"].rsplit(":", 1)[0] + "@" + entry["digest"]).content != b""


def test_blob_and_manifest_counters_see_real_gets(registry: Registry, images: dict[str, str]) -> None:
    manifest = get_manifest(images["busybox"]).json()
    digest = manifest["layers"][1]["digest"]
    blob_url = f"{registry.url}/v2/busybox/blobs/{digest}"
    total, this = registry.blob_gets(), registry.blob_gets(digest)
    assert session().head(blob_url, timeout=30).status_code == 200  # a HEAD is no download
    assert session().get(blob_url, timeout=30).content
    assert session().get(blob_url, headers={"Range": "bytes=3-"}, timeout=30).status_code == 206
    assert session().get(f"{registry.url}/v2/busybox/blobs/sha256:{'0' * 64}", timeout=30).status_code == 404
    assert (registry.blob_gets(), registry.blob_gets(digest)) == (total + 2, this + 2)
    manifests = registry.manifest_gets("latest")
    get_manifest(images["busybox"])
    assert registry.manifest_gets("latest") == manifests + 1


@pytest.mark.integration
def test_registry_takes_extra_config_and_stops_cleanly() -> None:
    registry = Registry({"http": {"headers": {"X-Rig": ["yes"]}}})
    try:
        assert session().get(f"{registry.url}/v2/", timeout=30).headers["X-Rig"] == "yes"
    finally:
        registry.stop()
    assert registry.process.returncode is not None and not registry.root.exists()
    with pytest.raises(requests.ConnectionError):
        session().get(f"{registry.url}/v2/", timeout=5)


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_push_stores_every_media_type_and_compression(media: str, registry: Registry) -> None:
    pushed = []
    for compression in ["none", "gzip", "zstd"]:
        image = Image([Tar().file("which", compression.encode()).to_bytes()], {}, compression, media)
        assert push(registry.host, f"matrix-{media}", compression, image) == image.manifest_digest
        pushed.append(image)
        stored = get_manifest(f"{registry.host}/matrix-{media}:{compression}")
        assert stored.content == image.manifest and stored.headers["Content-Type"] == MEDIA_TYPES[media]["manifest"]
    listed = get_manifest(
        f"{registry.host}/matrix-{media}@{push_index(registry.host, f'matrix-{media}', 'all', pushed, media)}"
    )
    assert listed.headers["Content-Type"] == MEDIA_TYPES[media]["index"]
    assert [entry["digest"] for entry in listed.json()["manifests"]] == [image.manifest_digest for image in pushed]


@pytest.mark.integration
def test_registry_serves_tls_with_its_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    make_certificate = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-keyout",
        key,
        "-out",
        cert,
    ]
    subprocess.run([*make_certificate, *subject], check=True, capture_output=True, timeout=60)
    with Registry({"http": {"tls": {"certificate": str(cert), "key": str(key)}}}) as secure:
        assert secure.url.startswith("https://")
        assert session().get(f"{secure.url}/v2/", verify=str(cert), timeout=30).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            session().get(f"{secure.url}/v2/", timeout=30)  # the system CAs do not know it


def test_registry_as_a_pull_through_mirror(registry: Registry, images: dict[str, str]) -> None:
    with Registry({"proxy": {"remoteurl": registry.url}}) as mirror:
        mirrored = get_manifest(f"{mirror.host}/busybox:latest")
        assert mirrored.content == get_manifest(images["busybox"]).content
        digest = mirrored.json()["config"]["digest"]
        assert sha256(session().get(f"{mirror.url}/v2/busybox/blobs/{digest}", timeout=30).content) == digest
        assert mirror.blob_gets(digest) == 1


# -- the ordinary user


def test_unprivileged_runs_the_installed_package_as_an_ordinary_user(unprivileged) -> None:
    who = unprivileged.run(["id", "-u"], capture_output=True, text=True, timeout=30)
    assert who.returncode == 0 and (int(who.stdout) != 0 or os.geteuid() != 0)
    where = unprivileged.run(
        ["python", "-c", "import dutils; print(dutils.__file__)"], capture_output=True, text=True, timeout=30
    )
    assert where.stdout.startswith(str(unprivileged.bin.parent)), where.stderr  # installed, not the working tree
    assert unprivileged.run(["d-pull", "--help"], capture_output=True, timeout=30).returncode == 0
    env = unprivileged.run(["env"], env={"EXTRA": "1"}, capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert {"EXTRA=1", f"HOME={unprivileged.home}"} <= set(env)


# -- the README's demo


@pytest.mark.integration
def test_demo_offline_pulls_and_runs_busybox() -> None:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run([REPO / "scripts" / "demo-offline"], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert OS_RELEASE.decode() in done.stdout
