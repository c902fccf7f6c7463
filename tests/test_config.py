"""config.json: the image's run configuration plus d-run's keys, and the user's edits kept over updates."""

from dutils.config import merge_edits, run_config


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
