"""The `config` stage: DIR/config.json from the image config, keeping whatever the user changed in it."""

import json
from pathlib import Path

import xxhash

from .errors import Error
from .oci import read_image_config
from .store import PullDir, blob_path, load_json, read_small, write_atomic

MISSING = object()
# d-run's own keys, written out so that users see them, and over the image's: an image config saying
# "ports": ["0.0.0.0:22:22"] must not publish itself.
RUN_DEFAULTS = {"net": False, "rw": False, "ports": []}


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
