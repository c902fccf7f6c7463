"""The `manifest` stage: resolve a reference to one verified image manifest for one platform."""

import hashlib
import json
import platform as host
from dataclasses import dataclass
from pathlib import Path

from .errors import Error
from .reference import Reference
from .registry import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Registry
from .store import blob_path, check_digest, write_atomic

INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1"
MACHINE_TO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    os: str
    arch: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.arch, self.variant)))

    def matches(self, offered: dict) -> bool:
        """Whether an index entry's `platform` is this one (arm64's variant v8 is its default)."""
        variant = offered.get("variant", "") or ("v8" if offered.get("architecture") == "arm64" else "")
        wanted = self.variant or variant
        return offered.get("os") == self.os and offered.get("architecture") == self.arch and variant == wanted


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise Error(f"invalid platform {text!r}", "use OS/ARCH[/VARIANT], e.g. linux/arm64/v8")
    return Platform(*parts)


def host_platform() -> Platform:
    machine = host.machine()
    variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine, "")
    return Platform("linux", MACHINE_TO_ARCH.get(machine, machine), variant)


@dataclass(frozen=True)
class Blob:
    """A content descriptor: what to fetch, how big it is, and how to read it."""

    digest: str
    size: int
    media_type: str
    urls: tuple[str, ...] = ()  # where a non-distributable layer lives (the registry need not have it)


@dataclass(frozen=True)
class Image:
    """A resolved image manifest: its digest, the platform it was chosen for, its config and its layers in order."""

    digest: str
    platform: str
    config: Blob
    layers: tuple[Blob, ...]


def resolve_image(registry: Registry, ref: Reference, wanted: Platform, cache: Path) -> Image:
    """Ask the registry for `ref`, narrow an index to `wanted`, verify and cache the manifest bytes."""
    body, media_type = registry.get_manifest(ref.wanted)
    if ref.digest:
        verify_manifest(body, ref.digest, None, ref)
    digest = ref.digest or sha256_digest(body)
    manifest = parse_manifest(body, media_type, ref)
    if manifest_type(manifest, media_type) in INDEXES:
        chosen = choose_platform(manifest, wanted, ref)
        digest = check_digest(chosen.get("digest"))
        body, media_type = registry.get_manifest(digest)
        verify_manifest(body, digest, chosen.get("size"), ref)
        manifest = parse_manifest(body, media_type, ref)
    write_atomic(blob_path(cache, digest), body)
    return image_from_manifest(manifest, digest, wanted, ref)


def load_image(cache: Path, digest: str, wanted: Platform, ref: Reference) -> Image | None:
    """The image whose manifest is cached under `digest`, if it is (lets an unchanged pull work offline)."""
    try:
        body = blob_path(cache, digest).read_bytes()
    except FileNotFoundError:
        return None
    return image_from_manifest(parse_manifest(body, "", ref), digest, wanted, ref)


def verify_manifest(body: bytes, digest: str, size: int | None, ref: Reference) -> None:
    if size is not None and len(body) != size:
        raise Error(f"manifest {digest} of {ref} has {len(body)} bytes, not the {size} its index says")
    if sha256_digest(body) != digest:
        raise Error(f"manifest of {ref} does not match digest {digest}", "the registry sent other content")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_manifest(body: bytes, media_type: str, ref: Reference) -> dict:
    try:
        manifest = json.loads(body)
    except ValueError:
        raise Error(f"the manifest of {ref} is not JSON", "is this an image registry?") from None
    if not isinstance(manifest, dict):
        raise Error(f"the manifest of {ref} is not a JSON object")
    kind = manifest_type(manifest, media_type)
    if manifest.get("schemaVersion") == 1 or kind.startswith(SCHEMA1):
        raise Error(
            f"{ref} has a Docker schema 1 manifest, which is obsolete", "push the image again with a current tool"
        )
    if kind not in INDEXES + MANIFESTS:
        raise Error(f"the manifest of {ref} has an unsupported media type {kind!r}")
    return manifest


def manifest_type(manifest: dict, header_type: str) -> str:
    """The media type: the manifest's own field, the HTTP header, or what its shape says (OCI allows omitting it)."""
    kind = manifest.get("mediaType") or header_type
    if kind in INDEXES + MANIFESTS or kind.startswith(SCHEMA1):
        return kind
    return OCI_INDEX if "manifests" in manifest else OCI_MANIFEST if "layers" in manifest else kind


def choose_platform(index: dict, wanted: Platform, ref: Reference) -> dict:
    entries = [e for e in index.get("manifests", []) if isinstance(e, dict)]
    # unknown/unknown entries are attestations (provenance, SBOMs), never a runnable image
    runnable = [e for e in entries if describe_platform(e.get("platform") or {}) != "unknown/unknown"]
    for entry in runnable:
        if wanted.matches(entry.get("platform") or {}):
            return entry
    offered = sorted({describe_platform(e.get("platform") or {}) for e in runnable})
    raise Error(
        f"{ref} has no image for platform {wanted}",
        f"it offers {', '.join(offered) or 'none'}; choose one with --platform",
    )


def describe_platform(platform: dict) -> str:
    return "/".join(filter(None, (platform.get("os"), platform.get("architecture"), platform.get("variant"))))


def image_from_manifest(manifest: dict, digest: str, wanted: Platform, ref: Reference) -> Image:
    try:
        config = descriptor(manifest["config"])
        layers = tuple(descriptor(layer) for layer in manifest["layers"])
    except (KeyError, TypeError, ValueError):
        raise Error(f"the manifest of {ref} lacks a valid config or layers list") from None
    return Image(digest, str(wanted), config, layers)


def descriptor(entry: dict) -> Blob:
    size = entry["size"]
    if not isinstance(size, int) or size < 0:
        raise ValueError(size)
    urls = tuple(u for u in entry.get("urls") or () if isinstance(u, str) and u.startswith(("https://", "http://")))
    return Blob(check_digest(entry["digest"]), size, str(entry.get("mediaType", "")), urls)
