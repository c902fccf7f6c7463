"""The `config` stage: DIR/config.json from the image config, keeping whatever the user changed in it."""

import errno
import hashlib
import json
from pathlib import Path
from typing import TypeVar

import xxhash

from .errors import Error
from .store import DIGEST, NotRegular, PullDir, blob_path, load_json, read_small, write_atomic

# d-run's own keys, written out so that users see them, and over the image's: an image config saying
# "ports": ["0.0.0.0:22:22"] must not publish itself.
RUN_DEFAULTS = {"net": False, "rw": False, "ports": []}
MISSING = object()
JSON_TYPES = {str: "a string", list: "a list", dict: "a JSON object"}
PLATFORM_FIELDS = ("os", "architecture", "variant")  # of an image config, and of an index entry's `platform`
T = TypeVar("T")
MAX_CONFIG = 4 << 20  # as containers/image (skopeo, podman) caps a config; real ones are a few kB
# Each JSON object or array costs Python ~60 bytes: 4 MiB of `{},` would take 100 MB once parsed. Real manifests
# and configs hold a few hundred; counting brackets (in strings too) over-counts, which errs on the safe side.
MAX_CONTAINERS = 100_000


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
        if not isinstance(diff_id, str) or not DIGEST.fullmatch(diff_id):
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


def run_config(image_config: dict) -> dict:
    """What config.json holds for a fresh pull: the image's `config` object plus d-run's own keys."""
    return {**(image_config.get("config") or {}), **RUN_DEFAULTS}


def merge_edits(new: dict, base: dict | None, current: dict) -> dict:
    """`new`, except where the user changed `base` into `current`: those keys keep the user's value (or absence).
    Without the base (its blob was pruned from the cache) edits cannot be told apart, so the user's file wins."""
    if base is None:
        return current
    merged = dict(new)
    for key in base.keys() | current.keys():
        if current.get(key, MISSING) != base.get(key, MISSING):
            merged[key] = current.get(key, MISSING)
    return {key: value for key, value in merged.items() if value is not MISSING}


def write_config(folder: PullDir, cache: Path, digest: str) -> None:
    """DIR/config.json from the image config `digest`, keeping the user's edits to the one we wrote (the record names
    its image config and fingerprint); then the record is marked complete, which says the pull is finished."""
    path, record = folder.config, folder.read_record()
    config = run_config(read_image_config(blob_path(cache, digest)))
    try:
        current = read_small(path)
    except FileNotFoundError:
        current = None
    except OSError as err:  # ours to write: a link, a FIFO or a huge file there is not the user's edit
        raise Error(f"cannot read {path}: {err.strerror}", "move it away to get the image's own") from None
    if current is not None and xxhash.xxh64_hexdigest(current) != record.config_xxh64:  # edited since we wrote it
        try:
            mine = load_json(current)
        except ValueError as err:
            raise Error(f"{path} is not valid JSON ({err})", "fix it, or delete it to get the image's own") from None
        if not isinstance(mine, dict):
            raise Error(f"{path} is not a JSON object", "fix it, or delete it to get the image's own")
        base = record.config_digest and blob_path(cache, record.config_digest)
        base_config = run_config(read_image_config(base)) if base and base.exists() else None
        config = merge_edits(config, base_config, mine)
    data = (json.dumps(config, indent=2) + "\n").encode()
    write_atomic(path, data)
    fingerprint = xxhash.xxh64_hexdigest(data)
    folder.write_record(record._replace(complete=True, config_digest=digest, config_xxh64=fingerprint))
