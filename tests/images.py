"""Builders for test images: tar layers, OCI/Docker manifests and indexes, pushes to a registry, OCI layouts.

Everything is deterministic (fixed mtimes, sorted JSON), so a digest computed here is stable across runs.
Only the push functions touch the network.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import io
import json
import os
import posixpath
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urljoin

from registry_server import session

MTIME = 1_700_000_000  # fixed, so that the same layer always has the same digest
TIMEOUT = 60

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

MEDIA_TYPES = {
    "oci": {
        "manifest": OCI_MANIFEST,
        "index": OCI_INDEX,
        "config": "application/vnd.oci.image.config.v1+json",
        "none": "application/vnd.oci.image.layer.v1.tar",
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    },
    "docker": {
        "manifest": DOCKER_MANIFEST,
        "index": DOCKER_LIST,
        "config": "application/vnd.docker.container.image.v1+json",
        "none": "application/vnd.docker.image.rootfs.diff.tar",
        "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "zstd": "application/vnd.docker.image.rootfs.diff.tar.zstd",
    },
}
ALL_MANIFEST_TYPES = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

BUSYBOX = Path("/bin/busybox")
APPLETS = (  # linked in /bin
    "sh ash echo cat id ls env pwd hostname touch mkdir rmdir rm cp mv ln chmod kill true false sleep wget ip"
    " ifconfig whoami stat mount umount grep head tail test [ uname readlink printf ps sed wc tr cut sort date"
    " seq tee find xargs basename dirname mktemp nproc df du which"
)
OS_RELEASE = b'NAME="BusyBox"\nID=busybox\nPRETTY_NAME="BusyBox (d-utils test image)"\n'


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class Tar:
    """A fluent builder of one tar layer in PAX format; every method adds one member and returns the builder."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _add(
        self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0, data: bytes | None = None, **fields
    ) -> Tar:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
        for key, value in fields.items():
            setattr(info, key, value)
        return self.raw(info, data)

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Tar:
        return self._add(name, tarfile.REGTYPE, mode, uid, gid, data)

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Tar:
        return self._add(name, tarfile.DIRTYPE, mode, uid, gid)

    def symlink(self, name: str, target: str, uid: int = 0) -> Tar:
        return self._add(name, tarfile.SYMTYPE, 0o777, uid, uid, linkname=target)

    def hardlink(self, name: str, target: str) -> Tar:
        return self._add(name, tarfile.LNKTYPE, 0o644, linkname=target)

    def fifo(self, name: str, mode: int = 0o644) -> Tar:
        return self._add(name, tarfile.FIFOTYPE, mode)

    def device(self, name: str, kind: str = "char", major: int = 1, minor: int = 3) -> Tar:
        types = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE}
        return self._add(name, types[kind], 0o666, devmajor=major, devminor=minor)

    def whiteout(self, path: str) -> Tar:
        """Hides `path` of the lower layers."""
        parent, name = posixpath.split(path.rstrip("/"))
        return self.file(posixpath.join(parent, ".wh." + name))

    def opaque(self, dirname: str) -> Tar:
        """Hides every lower-layer child of `dirname`."""
        return self.file(posixpath.join(dirname.rstrip("/"), ".wh..wh..opq"))

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> Tar:
        """Any member exactly as given (malicious names included); `data`, when given, sets its size."""
        info = copy.copy(info)
        if data is not None:
            info.size = len(data)
        self.members.append((info, data))
        return self

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in self.members:
                archive.addfile(info, None if data is None else io.BytesIO(data))
        return out.getvalue()


@functools.cache
def busybox_layer() -> bytes:
    """A small but complete root: the host's static busybox with its applets, users root and app (1000)."""
    return busybox_tar().to_bytes()


def busybox_tar() -> Tar:
    """The builder of busybox_layer(), for a test that adds members to the same root."""
    tar = Tar()
    for name, mode in [("bin", 0o755), ("etc", 0o755), ("home", 0o755), ("root", 0o700), ("tmp", 0o1777)]:
        tar.dir(name, mode)
    for name in ["proc", "dev", "sys", "var", "usr", "usr/bin", "usr/sbin", "sbin"]:
        tar.dir(name)
    tar.dir("home/app", 0o755, uid=1000, gid=1000)
    tar.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS.split():
        tar.symlink(f"bin/{applet}", "/bin/busybox")  # absolute, as real images have them
    tar.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    tar.file("etc/group", b"root:x:0:\napp:x:1000:\n")
    return tar.file("etc/os-release", OS_RELEASE)


def random_files(prefix: str, count: int, size: int) -> Tar:
    """A layer of `count` files of `size` random bytes each under `prefix`/: new digests at every call."""
    tar = Tar()
    for n in range(count):
        tar.file(f"{prefix}/{n}", os.urandom(size))
    return tar


def compress(tar: bytes, compression: str) -> bytes:
    """The layer blob for an uncompressed tar: compression is "none", "gzip" or "zstd"."""
    if compression == "zstd":
        import zstandard  # only some tests need it; Debian's python may lack it

        return zstandard.ZstdCompressor().compress(tar)
    return {"none": lambda: tar, "gzip": lambda: gzip.compress(tar, mtime=0)}[compression]()


@dataclass(frozen=True)
class Image:
    """One image: its uncompressed layers and the config's `config` object (Tar builders given as layers become bytes)."""

    layers: list[bytes]
    config: dict = field(default_factory=dict)
    compression: str = "gzip"
    media: str = "oci"
    os: str = "linux"
    arch: str = "amd64"
    variant: str = ""

    def __post_init__(self) -> None:
        tars = [layer.to_bytes() if isinstance(layer, Tar) else layer for layer in self.layers]
        object.__setattr__(self, "layers", tars)

    @property
    def types(self) -> dict[str, str]:
        return MEDIA_TYPES[self.media]

    @property
    def platform(self) -> dict[str, str]:
        platform = {"os": self.os, "architecture": self.arch}
        return platform | ({"variant": self.variant} if self.variant else {})

    @functools.cached_property
    def config_blob(self) -> bytes:
        diff_ids = [sha256(layer) for layer in self.layers]
        return canonical_json(
            {**self.platform, "config": self.config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        )

    @functools.cached_property
    def layer_blobs(self) -> list[bytes]:
        return [compress(layer, self.compression) for layer in self.layers]

    @functools.cached_property
    def manifest(self) -> bytes:
        layer_type = self.types[self.compression]
        return canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": self.types["manifest"],
                "config": descriptor(self.types["config"], self.config_blob),
                "layers": [descriptor(layer_type, blob) for blob in self.layer_blobs],
            }
        )

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    def blobs(self) -> dict[str, bytes]:
        """Digest -> bytes of the config and the layers."""
        return {sha256(blob): blob for blob in [self.config_blob, *self.layer_blobs]}

    def index_entry(self) -> dict:
        """This image's descriptor in an index or manifest list."""
        return descriptor(self.types["manifest"], self.manifest) | {"platform": self.platform}


def descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


def index(entries: list[dict], media: str = "oci") -> bytes:
    """An image index (OCI) or manifest list (Docker) of the given descriptors."""
    return canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPES[media]["index"], "manifests": entries})


# -- pushing to a registry (plain HTTP)


def push_blob(registry: str, repo: str, data: bytes) -> str:
    """Uploads one blob (POST, then a monolithic PUT) unless the registry has it; returns its digest."""
    digest, base = sha256(data), f"http://{registry}/v2/{repo}/blobs"
    with session() as http:
        if http.head(f"{base}/{digest}", timeout=TIMEOUT).status_code == 200:
            return digest
        started = http.post(f"{base}/uploads/", timeout=TIMEOUT)
        started.raise_for_status()
        location = urljoin(f"http://{registry}/", started.headers["Location"])
        headers = {"Content-Type": "application/octet-stream"}
        done = http.put(location, params={"digest": digest}, data=data, headers=headers, timeout=TIMEOUT)
        done.raise_for_status()
    return digest


def push_manifest(registry: str, repo: str, reference: str, manifest: bytes) -> str:
    """PUTs a manifest (its type read from its mediaType) under a tag or digest; returns its digest."""
    media_type = json.loads(manifest)["mediaType"]
    with session() as http:
        url = f"http://{registry}/v2/{repo}/manifests/{reference}"
        http.put(url, data=manifest, headers={"Content-Type": media_type}, timeout=TIMEOUT).raise_for_status()
    return sha256(manifest)


def push(registry: str, repo: str, tag: str, image: Image) -> str:
    """Pushes the image's blobs and manifest as repo:tag; returns the manifest digest."""
    for blob in image.blobs().values():
        push_blob(registry, repo, blob)
    return push_manifest(registry, repo, tag, image.manifest)


def push_index(
    registry: str, repo: str, tag: str, images: list[Image], media: str = "oci", extra: Sequence[dict] = ()
) -> str:
    """Pushes each image by digest, then an index (or manifest list) of them plus `extra` descriptors."""
    for image in images:
        push(registry, repo, image.manifest_digest, image)
    entries = [image.index_entry() for image in images] + list(extra)
    return push_manifest(registry, repo, tag, index(entries, media))


def push_attestation(registry: str, repo: str, subject: str) -> dict:
    """Pushes a BuildKit-style attestation manifest for the manifest `subject`; returns its index descriptor,
    whose platform is unknown/unknown (a client must never choose it)."""
    statement = canonical_json({"_type": "https://in-toto.io/Statement/v0.1", "subject": [], "predicate": {}})
    config = canonical_json(
        {
            "architecture": "unknown",
            "os": "unknown",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256(statement)]},
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(MEDIA_TYPES["oci"]["config"], config),
            "layers": [descriptor("application/vnd.in-toto+json", statement)],
        }
    )
    for blob in (config, statement):
        push_blob(registry, repo, blob)
    push_manifest(registry, repo, sha256(manifest), manifest)
    annotations = {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": subject}
    platform = {"os": "unknown", "architecture": "unknown"}
    return descriptor(OCI_MANIFEST, manifest) | {"platform": platform, "annotations": annotations}


# -- OCI image layout


def write_oci_layout(path: Path, image: Image, tag: str) -> None:
    """Adds the image to the OCI image layout at `path` (made if missing) under the name `tag`."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in [*image.blobs().values(), image.manifest]:
        (blobs / sha256(data).removeprefix("sha256:")).write_bytes(data)
    (path / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index_path = path / "index.json"
    entries = json.loads(index_path.read_bytes())["manifests"] if index_path.exists() else []
    name = "org.opencontainers.image.ref.name"
    entries = [entry for entry in entries if entry.get("annotations", {}).get(name) != tag]
    entries.append(image.index_entry() | {"annotations": {name: tag}})
    index_path.write_bytes(index(entries))


# -- the standard set every test can use (conftest's `images` fixture)

BUSYBOX_CONFIG = {
    "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"],
    "Cmd": ["sh"],
    "WorkingDir": "/home/app",
    "Hostname": "",
}


def busybox_image() -> Image:
    """busybox over two layers: the second adds etc/added-by-layer-2 and whites out etc/removed-by-layer-2."""
    lower = busybox_tar().file("etc/removed-by-layer-2", b"seen only without layer 2\n")
    upper = Tar().file("etc/added-by-layer-2", b"added by layer 2\n").whiteout("etc/removed-by-layer-2")
    return Image(layers=[lower, upper], config=BUSYBOX_CONFIG)


def platform_images() -> list[Image]:
    """busybox for linux/amd64 and linux/arm64/v8, each with /etc/arch naming its architecture."""
    return [
        Image(
            layers=[busybox_layer(), Tar().file("etc/arch", f"{arch}\n".encode())],
            config=BUSYBOX_CONFIG,
            arch=arch,
            variant=variant,
        )
        for arch, variant in [("amd64", ""), ("arm64", "v8")]
    ]


def skopeo_push(layout: Path, tag: str, destination: str, manifest_format: str) -> None:
    """Copies layout:tag to the plain-HTTP `destination` (HOST/REPO:TAG) with skopeo, as "oci" or "v2s2"."""
    command = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", "--format", manifest_format]
    subprocess.run(
        [*command, f"oci:{layout}:{tag}", f"docker://{destination}"], check=True, capture_output=True, timeout=TIMEOUT
    )


def push_standard_set(registry: str, workdir: Path) -> dict[str, str]:
    """Pushes the standard images; returns name -> reference. `workdir` holds the OCI layout skopeo reads."""
    references = {name: f"{registry}/{name}:latest" for name in STANDARD_NAMES}
    push(registry, "busybox", "latest", busybox_image())
    push(registry, "busybox-plain", "latest", replace(busybox_image(), compression="none"))
    write_oci_layout(workdir / "layout", busybox_image(), "latest")
    skopeo_push(workdir / "layout", "latest", references["busybox-docker"], "v2s2")
    skopeo_push(workdir / "layout", "latest", references["busybox-oci"], "oci")
    amd64, arm64 = platform_images()
    attestation = push_attestation(registry, "multi", amd64.manifest_digest)
    push_index(registry, "multi", "latest", [amd64, arm64], extra=[attestation])
    return references


STANDARD_NAMES = ["busybox", "busybox-plain", "busybox-docker", "busybox-oci", "multi"]
