"""The `config` stage: DIR/config.json from the image config, keeping whatever the user changed in it. The base each
edit is measured against, the config.json the image alone makes, is kept in DIR/.d-pull/base.json: never only in the
cache, so that no prune changes what an update does."""

import json
from pathlib import Path

import xxhash

from .errors import Error
from .oci import read_image_config
from .store import PullDir, blob_path, read_small, read_small_json, write_atomic, write_json

MISSING = object()
# d-run's own keys, written out so that users see them, and over the image's: an image config saying
# "ports": ["0.0.0.0:22:22"] must not publish itself.
RUN_DEFAULTS = {"net": False, "rw": False, "ports": []}
# Keys merged entry by entry (Env per variable name), so that a user's added variable keeps the image's new ones.
PER_ENTRY = ("Env", "Volumes", "ExposedPorts", "Labels")
# Never the image's: docker and podman ignore it (buildah writes its build container's id there); config.json's is the
# user's setting.
NOT_COPIED = ("Hostname",)
FIX = "fix it, or delete it to get the image's own"


def run_config(image_config: dict) -> dict:
    """What config.json holds for a fresh pull: the image's `config` object plus d-run's own keys."""
    image = {key: value for key, value in (image_config.get("config") or {}).items() if key not in NOT_COPIED}
    return {**image, **RUN_DEFAULTS}


def merge_edits(new: dict, base: dict | None, current: dict) -> tuple[dict, list[str]]:
    """`new`, except where the user changed `base` into `current`: there the user's value (or absence) wins, per
    variable and key in PER_ENTRY, per key elsewhere; and the edits kept, named ("Cmd", "Env FOO"). Without a base
    (a folder pulled before base.json, its blob pruned) edits cannot be told apart, so the user's file wins."""
    if base is None:
        return current, ["all of config.json (what it was made from is no longer known)"]
    merged, kept = edit(new, base, current, "")
    for key in PER_ENTRY:
        sides = [entries(key, config.get(key)) for config in (new, base, current)]
        if key in kept and None not in sides:
            inner, inner_kept = edit(*sides, f"{key} ")
            kept = [name for name in kept if name != key] + inner_kept
            if inner or key in current:  # else the user removed it, and so is it from `merged`
                merged[key] = list(inner.values()) if key == "Env" else inner
    return merged, sorted(kept)


def edit(new: dict, base: dict, current: dict, prefix: str) -> tuple[dict, list[str]]:
    """`new` with every key that differs between `base` and `current` as `current` has it (or absent)."""
    merged, kept = dict(new), []
    for key in sorted(base.keys() | current.keys()):
        if current.get(key, MISSING) != base.get(key, MISSING):
            merged[key] = current.get(key, MISSING)
            kept.append(prefix + key)
    return {key: value for key, value in merged.items() if value is not MISSING}, kept


def entries(key: str, value: object) -> dict | None:
    """The entries of a PER_ENTRY key by name (Env's "NAME=VALUE" by NAME); None for a value of another type."""
    if key == "Env" and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return {item.split("=", 1)[0]: item for item in value}
    return value if isinstance(value, dict) else {} if value is None else None


def write_config(folder: PullDir, cache: Path, digest: str) -> list[str]:
    """DIR/config.json from the image config `digest`, keeping the user's edits (measured against base.json, what the image
    alone made); then the record is marked complete, which says the pull is
    finished. Returns the user's edits kept."""
    path, record, base_path = folder.config, folder.read_record(), folder.state / "base.json"
    config = image_own = run_config(read_image_config(blob_path(cache, digest)))
    kept = []
    if (current := read_config(path)) is not None:
        base = read_base(folder, cache, current)
        base = base and {
            key: value for key, value in base.items() if key not in NOT_COPIED
        }  # config.json's: the user's
        config, kept = merge_edits(config, base, current)
    data = (json.dumps(config, indent=2) + "\n").encode()
    write_atomic(path, data)
    write_json(base_path, image_own)  # after config.json: a kill between the two measures edits against the old base
    fingerprint = xxhash.xxh64_hexdigest(data)
    folder.write_record(record._replace(complete=True, config_digest=digest, config_xxh64=fingerprint))
    return kept


def read_config(path: Path) -> dict | None:
    """config.json as the user left it, None when there is none."""
    config = read_small_json(path, FIX)
    if config is not None and not isinstance(config, dict):
        raise Error(f"{path} is not a JSON object", FIX)
    return config


def read_base(folder: PullDir, cache: Path, current: dict) -> dict | None:
    """The config.json the image alone made, which the user's edits are measured against: base.json; for a folder
    pulled before there was one, config.json itself when unedited, else the image config while the cache has it."""
    base = read_small_json(folder.state / "base.json", f"delete it to keep the whole {folder.config}")
    if isinstance(base, dict):
        return base
    record = folder.read_record()
    if xxhash.xxh64_hexdigest(read_small(folder.config)) == record.config_xxh64:
        return current
    blob = record.config_digest and blob_path(cache, record.config_digest)
    return run_config(read_image_config(blob)) if blob and blob.exists() else None
