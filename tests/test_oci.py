"""The OCI vocabulary: the image config read from the cache and checked, field by field, at every read."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from dutils.errors import Error
from dutils.oci import MAX_CONFIG, diff_ids, read_image_config


def test_diff_ids_must_match_the_layers():
    config = {"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}
    assert diff_ids(config, 1) == ["sha256:" + "0" * 64]
    with pytest.raises(Error, match="1 layer diff_ids for 2 layers"):
        diff_ids(config, 2)


# -- reading the image config from the cache: capped, verified at every read, checked


def cached(folder: Path, data: bytes) -> Path:
    """`data` stored as a cache stores a blob: under its own digest."""
    path = folder / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    return path


def config_bytes(**fields) -> bytes:
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]}, "rootfs": {"diff_ids": [ZERO]}}
    return json.dumps(config | fields).encode()


ZERO = "sha256:" + "0" * 64


def test_a_cached_config_is_read_and_checked(tmp_path):
    assert read_image_config(cached(tmp_path, config_bytes()))["config"] == {"Cmd": ["sh"]}


def test_a_config_planted_under_another_digest_is_refused_at_every_read(tmp_path):
    path = cached(tmp_path, config_bytes())
    read_image_config(path)
    path.write_bytes(config_bytes(config={"Cmd": ["evil"]}))  # another user swaps it after the pull verified it
    with pytest.raises(Error, match="does not match its digest.*someone else may have written it"):
        read_image_config(path)


def test_links_fifos_and_oversized_configs_are_refused_without_reading_them(tmp_path):
    target = cached(tmp_path, config_bytes())
    link = tmp_path / "links" / target.name
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(Error, match="cannot read"):
        read_image_config(link)
    fifo = tmp_path / "fifos" / target.name
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(Error, match="not a regular file"):
        read_image_config(fifo)  # returns at once: opened non-blocking
    big = config_bytes(padding="x" * MAX_CONFIG)
    with pytest.raises(Error, match=f"larger than {MAX_CONFIG} bytes"):
        read_image_config(cached(tmp_path, big))


@pytest.mark.parametrize(
    ("fields", "field", "kind"),
    [
        ({"architecture": ["amd64"]}, "architecture", "a string"),
        ({"os": 1}, "os", "a string"),
        ({"variant": None}, "variant", "a string"),
        ({"config": "sh"}, "config", "a JSON object"),
        ({"rootfs": None}, "rootfs", "a JSON object"),
        ({"rootfs": []}, "rootfs", "a JSON object"),
        ({"rootfs": {}}, "rootfs.diff_ids", "a list"),
        ({"rootfs": {"diff_ids": ZERO}}, "rootfs.diff_ids", "a list"),
        ({"rootfs": {"diff_ids": [ZERO, 5]}}, "rootfs.diff_ids[1]", "a sha256 digest"),
        ({"rootfs": {"diff_ids": ["sha256:../../x"]}}, "rootfs.diff_ids[0]", "a sha256 digest"),
    ],
)
def test_wrong_json_types_name_the_field(fields, field, kind, tmp_path):
    path = cached(tmp_path, config_bytes(**fields))
    with pytest.raises(Error) as caught:
        read_image_config(path)
    assert f"image config sha256:{path.name}: {field} is not {kind}" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"[]", "not a JSON object"),
        (b"\x00{}", "not JSON"),
        (b'{"history":[' + b"{}," * 200_000 + b"{}]}", "more than 100000 JSON objects and arrays"),
    ],
)
def test_configs_that_are_not_json_objects_are_refused(data, says, tmp_path):
    with pytest.raises(Error, match=says):
        read_image_config(cached(tmp_path, data))
