"""The OCI vocabulary every stage shares and no stage owns: media types, limits, descriptors, the JSON shape checks,
and the image config with its diff_ids. Imports no stage: every stage may import it."""

from __future__ import annotations  # Path and T for type checkers only: d-pull --lock's no-op loads this module

import errno
from collections import namedtuple

from .errors import Error
from .store import NotRegular, is_digest, load_json, read_small

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from pathlib import Path
    from typing import TypeVar

    T = TypeVar("T")

OCI = "application/vnd.oci.image.layer.v1.tar"
OCI_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_FORMS = {"": "tar", "+gzip": "gzip", "+zstd": "zstd"}  # an OCI layer's media type suffixes, and what they say
# Docker's schema 2 names gzip only; containerd and BuildKit also write the plain and zstd forms.
COMPRESSION = {base + suffix: kind for base in (OCI, OCI_NONDISTRIBUTABLE) for suffix, kind in OCI_FORMS.items()}
COMPRESSION |= {DOCKER: "tar", DOCKER + ".gzip": "gzip", DOCKER + ".zstd": "zstd"}
COMPRESSION |= {DOCKER_FOREIGN: "tar", DOCKER_FOREIGN + ".gzip": "gzip"}
IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1"
JSON_TYPES = {str: "a string", list: "a list", dict: "a JSON object"}
PLATFORM_FIELDS = ("os", "architecture", "variant")  # of an image config, and of an index entry's `platform`
# Docker and overlayfs stop at about 128 layers; 500 leaves room for any real image and bounds the work.
MAX_LAYERS = 500
MAX_CONFIG = 4 << 20  # as containers/image (skopeo, podman) caps a config; real ones are a few kB
# Each JSON object or array costs Python ~60 bytes: 4 MiB of `{},` would take 100 MB once parsed. Real manifests
# and configs hold a few hundred; counting brackets (in strings too) over-counts, which errs on the safe side.
MAX_CONTAINERS = 100_000


# A content descriptor: what to fetch, how big it is, how to read it, and `urls`: where a non-distributable layer
# lives (the registry need not have it).
Blob = namedtuple("Blob", "digest size media_type urls", defaults=((),))


def load_json_object(data: bytes, what: str) -> dict:
    """`data` parsed as a JSON object, with the number of objects and arrays in it bounded first."""
    if data.count(b"{") + data.count(b"[") > MAX_CONTAINERS:
        raise Error(f"{what} holds more than {MAX_CONTAINERS} JSON objects and arrays", "this is not a real image")
    try:
        return typed(load_json(data), dict, what)
    except ValueError:  # UnicodeDecodeError and deep nesting too
        raise Error(f"{what} is not JSON", "is this an image registry?") from None


def read_image_config(blob: Path) -> dict:
    """The image config cached at `blob`, checked: verified against its name (its digest) at every read, so that a
    file planted in the cache is never trusted; read up to MAX_CONFIG bytes, from a regular file only, never through
    a link (nor blocking on a FIFO)."""
    import hashlib  # here: loading OpenSSL costs d-pull --lock's no-op milliseconds

    what = f"image config sha256:{blob.name}"
    try:
        data = read_small(blob, MAX_CONFIG)
    except NotRegular:
        raise Error(f"{what} at {blob} is not a regular file", f"delete {blob} and pull again") from None
    except OSError as err:
        if err.errno == errno.EFBIG:
            raise Error(f"{what} is larger than {MAX_CONFIG} bytes", "this is not a real image") from None
        raise Error(f"cannot read {what} at {blob}: {err.strerror}", "pull again") from None
    if hashlib.sha256(data).hexdigest() != blob.name:
        raise Error(
            f"the {what} in the cache does not match its digest",
            f"delete {blob} (someone else may have written it) and pull again",
        )
    config = load_json_object(data, what)  # then every field d-pull uses must have its JSON type
    for key in PLATFORM_FIELDS:
        typed(config.get(key, ""), str, f"{what}: {key}")
    typed(config.get("config") or {}, dict, f"{what}: config")
    rootfs = typed(config.get("rootfs"), dict, f"{what}: rootfs")
    for n, diff_id in enumerate(typed(rootfs.get("diff_ids"), list, f"{what}: rootfs.diff_ids")):
        if not is_digest(diff_id):
            raise broken(f"{what}: rootfs.diff_ids[{n}]", "a sha256 digest")
    return config


def typed(value: object, kind: type[T], field: str) -> T:
    """`value` if it has the JSON type `kind`, else one line naming the field of a manifest or an image config."""
    if not isinstance(value, kind):
        raise broken(field, JSON_TYPES[kind])
    return value


def broken(field: str, kind: str) -> Error:
    return Error(f"{field} is not {kind}", "the image is broken; ask its publisher")


def diff_ids(image_config: dict, layer_count: int) -> list[str]:
    """The digests of the uncompressed layers, one per layer, in order (of a config checked by read_image_config)."""
    ids = image_config["rootfs"]["diff_ids"]
    if len(ids) != layer_count:
        raise Error(f"the image config lists {len(ids)} layer diff_ids for {layer_count} layers", "the image is broken")
    return ids
