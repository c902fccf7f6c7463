"""The `manifest` stage: resolve a reference to one verified image manifest for one platform, and check before any
layer is fetched that it is an image (not a Helm chart or another OCI artifact), that its layers can be applied (not
encrypted), and that its config (small, fetched now) says a platform the user can run, with a diff_id per layer."""

from __future__ import annotations  # Registry for type checkers only: platforms are d-pull's no-op's, without requests

import re
from collections import namedtuple
from collections.abc import Callable
from functools import partial
from os import uname  # the platform module costs d-pull's no-op milliseconds

from . import oci
from .errors import Error
from .oci import DOCKER_LIST, DOCKER_MANIFEST, MAX_LAYERS, OCI_INDEX, OCI_MANIFEST, Blob, broken, typed
from .reference import Reference
from .store import check_digest

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from pathlib import Path

    from .registry import Registry

INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
MAX_PROBES = 16  # index entries without a `platform` whose config is fetched to learn it
# The spellings of uname and Debian for Go's architectures, with the variant each implies (None: the one given).
ARCH_ALIASES = {"x86_64": ("amd64", None), "x86-64": ("amd64", None), "aarch64": ("arm64", None), "i386": ("386", "")}
ARCH_ALIASES |= {"i686": ("386", ""), "armhf": ("arm", "v7"), "armel": ("arm", "v6"), "armv8l": ("arm", "v8")}
ARCH_ALIASES |= {"armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5")}
# containerd's normal variants: arm is arm/v7 unless it says otherwise, arm64 is arm64/v8, amd64 has none (v1)
VARIANTS = {"amd64": {"v1": ""}, "arm": {"": "v7", "5": "v5", "6": "v6", "7": "v7", "8": "v8"}}
VARIANTS["arm64"] = {"": "v8", "8": "v8", "v8.0": "v8", "9": "v9", "9.0": "v9", "v9.0": "v9"}


class Platform(namedtuple("Platform", "os arch variant", defaults=("",))):
    """An OS, architecture and variant in containerd's normal form (see `normalize`)."""

    __slots__ = ()

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.arch, self.variant)))


def normalize(os: str, arch: str, variant: str = "") -> Platform:
    """containerd's normal form (see VARIANTS), with the spellings of uname (x86_64, aarch64, armhf…) made Go's."""
    arch, implied = ARCH_ALIASES.get(arch.lower(), (arch.lower(), None))
    variant = variant.lower() if implied is None else implied
    os = "darwin" if os.lower() == "macos" else os.lower() or "linux"
    return Platform(os, arch, VARIANTS.get(arch, {}).get(variant, variant))


def compatible(wanted: Platform) -> list[Platform]:
    """The platforms that run on `wanted`, best first (containerd's platformVector): the platform itself, then lower
    variants (amd64/v3 runs v2 and v1 images, arm/v7 runs v6 and v5, arm64/v8.2 runs v8.1 and v8), then the 32-bit
    relative (386 on amd64, arm on arm64)."""
    level = int(wanted.variant[1:]) if re.fullmatch(r"v\d{1,2}", wanted.variant) else 0  # v7: 7; none: 0
    if wanted.arch == "amd64":
        lower = [wanted._replace(variant=f"v{n}") for n in range(level - 1, 1, -1)]
        v1 = [wanted._replace(variant="")] if level > 1 else []
        return [wanted, *lower, *v1, wanted._replace(arch="386", variant="")]
    if wanted.arch == "arm":
        return [wanted, *(wanted._replace(variant=f"v{n}") for n in range(level - 1, 4, -1))]
    found = re.fullmatch(r"v(8|9)(?:\.(\d))?", wanted.variant)
    if wanted.arch == "arm64" and found:
        major, minor = int(found.group(1)), int(found.group(2) or 0)
        arm64 = [wanted._replace(variant=f"v{major}.{n}" if n else f"v{major}") for n in range(minor, -1, -1)]
        if major == 9:  # v9.x includes v8.(x+5)
            arm64 += [wanted._replace(variant=f"v8.{n}" if n else "v8") for n in range(min(minor + 5, 9), -1, -1)]
        return arm64 + compatible(Platform(wanted.os, "arm", "v8"))
    return [wanted]


def parse_platform(text: str) -> Platform:
    """`--platform OS/ARCH[/VARIANT]`, normalised."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise Error(f"invalid platform {text!r}", "use OS/ARCH[/VARIANT], e.g. linux/arm64/v8")
    return normalize(*parts)


def host_platform() -> Platform:
    return normalize("linux", uname().machine)


# A resolved image manifest: its digest, the platform its config declares, its config and layers in order (Blobs);
# `resolved`: the digest of what the reference named (the index, or this manifest); `diff_ids`: from its config, one
# per layer, what each layer's content must hash to.
Image = namedtuple("Image", "digest platform config layers resolved diff_ids", defaults=("", ()))


def resolve_image(registry: Registry, ref: Reference, wanted: Platform, fetch: Callable[[Blob], Path]) -> Image:
    """Ask the registry for `ref`, narrow an index to `wanted`, verify the manifest bytes, and check the image through
    its config (`fetch` brings a blob into the cache)."""
    manifest, kind, resolved = fetch_manifest(registry, ref, ref.digest, None)
    digest, chosen_from_index = resolved, kind in INDEXES
    if chosen_from_index:
        check_not_artifact(manifest, ref)
        chosen = choose_platform(manifest, wanted, ref, partial(probe_platform, registry, ref=ref, fetch=fetch))
        digest = chosen["digest"]
        manifest = fetch_image_manifest(registry, digest, chosen["size"], ref)
    image = image_from_manifest(manifest, digest, ref)
    platform, ids = config_platform(image, fetch, ref)
    if not chosen_from_index:  # a single-platform image must run on `wanted`, as containerd says (Docker only warns)
        if not platform.arch:
            raise Error(f"the image config of {ref} names no architecture", "the image is broken; ask its publisher")
        if platform not in compatible(wanted):
            raise Error(
                f"{ref} is an image for {platform}, not for {wanted}",
                f"pull it with --platform {platform} if you mean to run it on another machine or through an emulator",
            )
    return image._replace(platform=str(platform), resolved=resolved, diff_ids=ids)


def fetch_image_manifest(registry: Registry, digest: str, size: int, ref: Reference) -> dict:
    """An index entry's manifest, verified and parsed; it must be an image manifest."""
    manifest, kind, _ = fetch_manifest(registry, ref, digest, size)
    if kind in INDEXES:
        raise Error(f"{ref} is an index of indexes, which d-pull does not follow", "pull one of its entries by digest")
    return manifest


def config_platform(image: Image, fetch: Callable[[Blob], Path], ref: Reference) -> tuple[Platform, tuple[str, ...]]:
    """The platform the image's config says, fetched now (it is small), and its diff_ids, one per layer."""
    if image.config.size > oci.MAX_CONFIG:
        raise Error(f"the image config of {ref} has {image.config.size} bytes, more than {oci.MAX_CONFIG}")
    config = oci.read_image_config(fetch(image.config))
    ids = tuple(oci.diff_ids(config, len(image.layers)))
    return normalize(*(config.get(key, "") for key in oci.PLATFORM_FIELDS)), ids


def fetch_manifest(registry: Registry, ref: Reference, digest: str | None, size: int | None) -> tuple[dict, str, str]:
    """The manifest `digest` names (None: the reference's tag), verified and parsed, its media type and digest."""
    import hashlib  # here: loading OpenSSL costs d-pull --lock's no-op milliseconds

    body, media_type = registry.get_manifest(digest or ref.wanted)
    if size is not None and len(body) != size:
        raise Error(f"manifest {digest} of {ref} has {len(body)} bytes, not the {size} its index says")
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if digest and actual != digest:
        raise Error(f"manifest of {ref} does not match digest {digest}", "the registry sent other content")
    return *parse_manifest(body, media_type, ref), actual


def parse_manifest(body: bytes, header_type: str, ref: Reference) -> tuple[dict, str]:
    """The manifest and its media type: its own field, the HTTP header's, or what its shape says (OCI may omit it)."""
    manifest = oci.load_json_object(body, f"the manifest of {ref}")
    kind = typed(manifest.get("mediaType", ""), str, f"the manifest of {ref}: mediaType") or header_type
    if kind not in INDEXES + MANIFESTS and not kind.startswith(oci.SCHEMA1):
        kind = OCI_INDEX if "manifests" in manifest else OCI_MANIFEST if "layers" in manifest else kind
    if manifest.get("schemaVersion") == 1 or kind.startswith(oci.SCHEMA1):
        raise Error(
            f"{ref} has a Docker schema 1 manifest, which is obsolete", "push the image again with a current tool"
        )
    if kind not in INDEXES + MANIFESTS:
        raise Error(f"the manifest of {ref} has an unsupported media type {kind!r}")
    return manifest, kind


# -- choosing from an index


def choose_platform(
    index: dict, wanted: Platform, ref: Reference, probe: Callable[[dict], Platform | None] = lambda entry: None
) -> dict:
    """The index entry containerd would choose for `wanted`: the first of the best compatible platform. An entry
    without `platform` is looked into by `probe` (which reads its config) only when no entry declares the best
    platform. Attestations (unknown/unknown) are never chosen."""
    entries = typed(index.get("manifests"), list, f"the manifest of {ref}: manifests")
    offers = [index_entry(entry, n, ref) for n, entry in enumerate(entries)]
    preferred = compatible(wanted)
    if preferred[0] not in [platform for _, platform in offers]:
        undeclared = sum(platform is None for _, platform in offers)
        if undeclared > MAX_PROBES:
            raise Error(f"the index of {ref} has {undeclared} entries without a platform, more than {MAX_PROBES}")
        offers = [(entry, probe(entry) if platform is None else platform) for entry, platform in offers]
    runnable = [
        (entry, platform) for entry, platform in offers if platform and "unknown" not in (platform.os, platform.arch)
    ]
    for candidate in preferred:
        for entry, platform in runnable:
            if platform == candidate:
                return entry
    offered = sorted({str(platform) for _, platform in runnable})
    raise Error(
        f"{ref} has no image for platform {wanted}",
        f"it offers {', '.join(offered) or 'none'}; choose one with --platform",
    )


def index_entry(entry: object, n: int, ref: Reference) -> tuple[dict, Platform | None]:
    """The index's n-th entry, checked, and the platform it declares, normalised (None when it declares none)."""
    entry = check_descriptor(entry, f"the manifest of {ref}: manifests[{n}]")
    if entry.get("platform") is None:
        return entry, None
    where = f"the manifest of {ref}: the platform of index entry {entry['digest']}"
    platform = typed(entry["platform"], dict, where)
    os, arch, variant = (typed(platform.get(key, ""), str, f"{where}: {key}") for key in oci.PLATFORM_FIELDS)
    return entry, normalize(os, arch, variant) if arch else None


def probe_platform(registry: Registry, entry: dict, ref: Reference, fetch: Callable[[Blob], Path]) -> Platform | None:
    """The platform of an index entry that declares none, from its image's config; None for what is not an image."""
    if entry.get("mediaType") in INDEXES:
        return None  # an index of indexes is not followed
    manifest = fetch_image_manifest(registry, entry["digest"], entry["size"], ref)
    try:
        image = image_from_manifest(manifest, entry["digest"], ref)
    except Error:
        return None  # a signature, an SBOM, an encrypted image…: not a candidate
    return config_platform(image, fetch, ref)[0]


# -- the image manifest


def image_from_manifest(manifest: dict, digest: str, ref: Reference) -> Image:
    """The image a manifest describes, once it is known to be an image whose layers d-pull can apply."""
    check_not_artifact(manifest, ref)
    what = f"the manifest of {ref}"
    config = descriptor(manifest.get("config"), f"{what}: config")
    if config.media_type not in ("", *oci.IMAGE_CONFIGS):
        raise not_an_image(ref, config.media_type)
    layers = typed(manifest.get("layers"), list, f"{what}: layers")
    if len(layers) > MAX_LAYERS:
        raise Error(f"{ref} has {len(layers)} layers, more than the {MAX_LAYERS} d-pull accepts", "no real image has")
    blobs = tuple(descriptor(layer, f"{what}: layers[{n}]") for n, layer in enumerate(layers))
    for blob in blobs:
        check_layer_type(blob, ref)
    return Image(digest, "", config, blobs)


def check_not_artifact(manifest: dict, ref: Reference) -> None:
    artifact = manifest.get("artifactType")
    if artifact is not None:
        raise not_an_image(ref, typed(artifact, str, f"the manifest of {ref}: artifactType"))


def not_an_image(ref: Reference, kind: object) -> Error:
    return Error(
        f"{ref} is not a container image but an artifact of type {kind!r}",
        "pull it with the tool that made it (helm, oras…)",
    )


def check_layer_type(layer: Blob, ref: Reference) -> None:
    if "+encrypted" in layer.media_type:
        raise Error(
            f"{ref} has encrypted layers ({layer.media_type})",
            "decrypt a copy first, e.g. skopeo copy --decryption-key KEY, and pull that",
        )
    if layer.media_type not in oci.COMPRESSION:
        raise Error(f"{ref} has a layer of unsupported media type {layer.media_type!r}", "d-pull applies tar layers")


def descriptor(entry: object, where: str) -> Blob:
    """The blob a manifest's `where` ("the manifest of REF: layers[0]") describes, checked."""
    entry = check_descriptor(entry, where)
    urls = entry.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise broken(f"{where}.urls", "a list of strings")
    usable = tuple(url for url in urls if url.startswith(("https://", "http://")))
    return Blob(entry["digest"], entry["size"], entry.get("mediaType", ""), usable)


def check_descriptor(entry: object, where: str) -> dict:
    entry = typed(entry, dict, where)
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:  # bool is an int to Python, not to JSON
        raise broken(f"{where}.size", "a non-negative integer")
    typed(entry.get("mediaType", ""), str, f"{where}.mediaType")
    check_digest(typed(entry.get("digest"), str, f"{where}.digest"))
    return entry
