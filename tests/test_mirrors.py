"""Which mirrors d-pull asks, read from the flags, $D_UTILS_MIRRORS or mirrors.json (a link to it followed, a
special or huge file refused), and the order it asks them in: each mirror, then the origin (as containerd does)."""

import json
import os
from pathlib import Path

import pytest

from dutils.errors import Error
from dutils.mirrors import find_mirrors, from_first_answering, mirror_host
from dutils.reference import parse_reference
from dutils.registry import Registry


@pytest.fixture
def config_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("D_UTILS_MIRRORS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    (tmp_path / "config" / "d-utils").mkdir(parents=True)
    return tmp_path / "config"


def test_flags_win_over_the_environment_and_the_file(config_home, monkeypatch):
    monkeypatch.setenv("D_UTILS_MIRRORS", "docker.io=env:1")
    (config_home / "d-utils" / "mirrors.json").write_text(json.dumps({"docker.io": ["file:1"]}))
    assert find_mirrors("docker.io", ["https://flag:5000/", "flag2"]) == ["flag:5000", "flag2"]
    assert find_mirrors("docker.io", []) == ["env:1"]
    monkeypatch.delenv("D_UTILS_MIRRORS")
    assert find_mirrors("docker.io", []) == ["file:1"]
    assert find_mirrors("ghcr.io", []) == []


def test_the_environment_names_mirrors_per_registry(config_home, monkeypatch):
    monkeypatch.setenv("D_UTILS_MIRRORS", "docker.io=a:1, ghcr.io=b:2,docker.io=c:3,quay.io=")
    assert find_mirrors("docker.io", []) == ["a:1", "c:3"]
    assert find_mirrors("quay.io", []) == []


def test_a_mirrors_file_that_is_a_symbolic_link_is_followed(config_home, tmp_path):
    (tmp_path / "dotfiles").mkdir()
    (tmp_path / "dotfiles" / "mirrors.json").write_text(json.dumps({"docker.io": ["linked:5000", 7]}))
    (config_home / "d-utils" / "mirrors.json").symlink_to(tmp_path / "dotfiles" / "mirrors.json")
    assert find_mirrors("docker.io", []) == ["linked:5000"]


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_special_or_huge_mirrors_file_is_one_line(kind, config_home):
    path = config_home / "d-utils" / "mirrors.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(b" " * (4 << 20) + b"{}")
    says = "larger than" if kind == "huge" else "not a regular file"
    with pytest.raises(Error, match=f"mirrors.json: {says}"):
        find_mirrors("docker.io", [])


@pytest.mark.parametrize("mirror", ["user:pw@host", "host/path", "-host", "ho st", "host:port", "ho\x1bst", ""])
def test_a_mirror_that_is_not_a_host_is_one_line(mirror):
    with pytest.raises(Error, match="is not a HOST") as caught:
        mirror_host(mirror)
    assert "\x1b" not in str(caught.value)


def registries(*hosts: str) -> list[Registry]:
    return [Registry(parse_reference(f"{host}/app")) for host in hosts]


def test_each_mirror_is_asked_in_order_then_the_origin():
    asked, notes = [], []

    def operation(registry: Registry) -> str:
        asked.append(registry.ref.registry)
        if registry.ref.registry != "origin.example":
            raise Error(f"unknown image at {registry.ref.registry}")
        return "from the origin"

    chain = registries("m1.example", "m2.example", "origin.example")
    assert from_first_answering(chain, operation, notes.append) == "from the origin"
    assert asked == ["m1.example", "m2.example", "origin.example"]
    assert notes == [
        "mirror m1.example: unknown image at m1.example; asking origin.example",
        "mirror m2.example: unknown image at m2.example; asking origin.example",
    ]


def test_the_first_mirror_that_answers_ends_the_walk():
    asked = []
    chain = registries("m1.example", "m2.example", "origin.example")
    assert from_first_answering(chain, lambda r: asked.append(r) or r.ref.registry, print) == "m1.example"
    assert len(asked) == 1


def test_an_origin_failure_is_the_pulls_failure():
    with pytest.raises(Error, match="at origin"):
        from_first_answering(registries("origin.example"), lambda r: (_ for _ in ()).throw(Error("at origin")), print)
