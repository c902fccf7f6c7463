"""The `config` stage: DIR/config.json from the image config, keeping whatever the user changed in it."""

import json
from pathlib import Path

import xxhash

from .errors import Error

RUN_DEFAULTS = {"net": False, "rw": False}  # d-run's own keys, written out so that users see them
MISSING = object()


def read_image_config(path: Path) -> dict:
    """The image configuration blob (OCI image config / Docker container config)."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise Error(f"cannot read image config {path.name}: {err}") from None
    if not isinstance(config, dict):
        raise Error(f"image config {path.name} is not a JSON object")
    return config


def diff_ids(image_config: dict, layer_count: int) -> list[str]:
    """The digests of the uncompressed layers, one per layer, in order."""
    ids = (image_config.get("rootfs") or {}).get("diff_ids") or []
    if len(ids) != layer_count or not all(isinstance(i, str) for i in ids):
        raise Error(f"the image config lists {len(ids)} layer diff_ids for {layer_count} layers", "the image is broken")
    return ids


def run_config(image_config: dict) -> dict:
    """What config.json holds for a fresh pull: the image's `config` object plus d-run's own keys."""
    return {**(image_config.get("config") or {}), **RUN_DEFAULTS}


def fingerprint(data: bytes) -> str:
    return xxhash.xxh64_hexdigest(data)


def render(config: dict) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


def merge_edits(new: dict, base: dict | None, current: dict) -> dict:
    """`new`, except where the user changed `base` into `current`: those keys keep the user's value.

    Without the base (its blob was pruned from the cache) edits cannot be told apart, so the user's file wins.
    """
    if base is None:
        return current
    merged = dict(new)
    for key in base.keys() | current.keys():
        mine = current.get(key, MISSING)
        if mine == base.get(key, MISSING):
            continue
        if mine is MISSING:
            merged.pop(key, None)
        else:
            merged[key] = mine
    return merged


def read_user_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_bytes())
    except ValueError as err:
        raise Error(f"{path} is not valid JSON ({err})", "fix it, or delete it to get the image's own") from None
    if not isinstance(config, dict):
        raise Error(f"{path} is not a JSON object", "fix it, or delete it to get the image's own")
    return config


def updated_config(path: Path, image_config: Path, base_config: Path | None, written_xxh64: str) -> bytes:
    """config.json for `image_config`, keeping the user's edits to the one we wrote from `base_config`."""
    new = run_config(read_image_config(image_config))
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        return render(new)
    if fingerprint(current) == written_xxh64:
        return render(new)  # not edited since we wrote it
    base = run_config(read_image_config(base_config)) if base_config and base_config.exists() else None
    return render(merge_edits(new, base, read_user_config(path)))
