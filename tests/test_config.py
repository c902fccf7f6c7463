"""config.json: the image's run configuration plus d-run's keys, and the user's edits kept over updates."""

import pytest

from dutils.config import diff_ids, merge_edits, run_config
from dutils.errors import Error


def test_run_config_adds_dutils_keys():
    assert run_config({"config": {"Cmd": ["sh"]}}) == {"Cmd": ["sh"], "net": False, "rw": False, "ports": []}
    assert run_config({}) == {"net": False, "rw": False, "ports": []}
    hostile = {"net": True, "rw": True, "ports": ["0.0.0.0:22:22"]}
    assert run_config({"config": hostile}) == {"net": False, "rw": False, "ports": []}


def test_user_edits_survive_and_untouched_keys_follow_the_new_image():
    base = {"Cmd": ["sh"], "Env": ["A=1"], "WorkingDir": "/", "net": False}
    current = {"Cmd": ["bash"], "Env": ["A=1"], "WorkingDir": "/", "net": True, "Volumes": {"/data": {}}}
    new = {"Cmd": ["sh", "-l"], "Env": ["A=2"], "WorkingDir": "/srv", "net": False}
    assert merge_edits(new, base, current) == {
        "Cmd": ["bash"],  # the user's
        "Env": ["A=2"],  # the new image's
        "WorkingDir": "/srv",
        "net": True,
        "Volumes": {"/data": {}},  # added by the user
    }


def test_a_key_the_user_removed_stays_removed():
    assert merge_edits({"Cmd": ["x"], "User": "2"}, {"Cmd": ["y"], "User": "1"}, {"Cmd": ["y"]}) == {"Cmd": ["x"]}


def test_without_a_base_the_users_file_wins():
    assert merge_edits({"Cmd": ["new"]}, None, {"Cmd": ["mine"]}) == {"Cmd": ["mine"]}


def test_diff_ids_must_match_the_layers():
    config = {"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}
    assert diff_ids(config, 1) == ["sha256:" + "0" * 64]
    with pytest.raises(Error, match="1 layer diff_ids for 2 layers"):
        diff_ids(config, 2)
