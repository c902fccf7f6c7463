"""config.json: the image's run configuration plus d-run's keys, and the user's edits kept over updates."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from dutils.config import merge_edits, run_config
from dutils.errors import Error
from dutils.oci import MAX_CONFIG, diff_ids, read_image_config


def test_run_config_adds_dutils_keys():
    assert run_config({"config": {"Cmd": ["sh"]}}) == {"Cmd": ["sh"], "net": False, "rw": False, "ports": []}
    assert run_config({}) == {"net": False, "rw": False, "ports": []}
    hostile = {"net": True, "rw": True, "ports": ["0.0.0.0:22:22"]}
    assert run_config({"config": hostile}) == {"net": False, "rw": False, "ports": []}


def test_user_edits_survive_and_untouched_keys_follow_the_new_image():
    base = {"Cmd": ["sh"], "Env": ["A=1"], "WorkingDir": "/", "net": False}
    current = {"Cmd": ["bash"], "Env": ["A=1"], "WorkingDir": "/", "net": True, "Volumes": {"/data": {}}}
    new = {"Cmd": ["sh", "-l"], "Env": ["A=2"], "WorkingDir": "/srv", "net": False}
    assert merge_edits(new, base, current) == (
        {
            "Cmd": ["bash"],  # the user's
            "Env": ["A=2"],  # the new image's
            "WorkingDir": "/srv",
            "net": True,
            "Volumes": {"/data": {}},  # added by the user
        },
        ["Cmd", "Volumes /data", "net"],
    )


def test_env_merges_per_variable_and_volumes_ports_labels_per_key():
    base = {"Env": ["PATH=/bin", "V=1", "GONE=x"], "Labels": {"a": "1", "b": "1"}, "ExposedPorts": {"80/tcp": {}}}
    current = {"Env": ["PATH=/bin", "V=1", "MINE=yes"], "Labels": {"a": "mine", "b": "1"}, "ExposedPorts": {}}
    new = {"Env": ["PATH=/usr/bin", "V=2", "GONE=y", "NEW=1"], "Labels": {"a": "2", "b": "2"}, "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}}  # fmt: skip
    merged, kept = merge_edits(new, base, current)
    assert merged == {
        "Env": ["PATH=/usr/bin", "V=2", "NEW=1", "MINE=yes"],  # the image's new values; the user's added and removed
        "Labels": {"a": "mine", "b": "2"},
        "ExposedPorts": {"443/tcp": {}},  # the user's removal of 80 stays; the image's new port comes
    }
    assert kept == ["Env GONE", "Env MINE", "ExposedPorts 80/tcp", "Labels a"]


def test_a_per_entry_key_the_user_gave_another_type_is_the_users():
    assert merge_edits({"Env": ["A=2"]}, {"Env": ["A=1"]}, {"Env": "A=1"}) == ({"Env": "A=1"}, ["Env"])


def test_a_key_the_user_removed_stays_removed():
    merged = merge_edits({"Cmd": ["x"], "User": "2"}, {"Cmd": ["y"], "User": "1"}, {"Cmd": ["y"]})
    assert merged == ({"Cmd": ["x"]}, ["User"])


def test_without_a_base_the_users_file_wins():
    assert merge_edits({"Cmd": ["new"]}, None, {"Cmd": ["mine"]})[0] == {"Cmd": ["mine"]}


def test_the_images_hostname_is_not_copied():
    assert run_config({"config": {"Hostname": "4f2a9c1d7e3b", "Cmd": ["sh"]}})["Cmd"] == ["sh"]
    assert "Hostname" not in run_config({"config": {"Hostname": "4f2a9c1d7e3b"}})


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
