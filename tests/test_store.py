"""The store's leaves on real files: digests, JSON, atomic writes, small reads that refuse what someone else
planted, removing a tree without following its links, and a pull folder's record."""

import errno
import inspect
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from malicious import outside_state, plant_markers
from test_pipeline import digest

from dutils.errors import Error
from dutils.store import (
    NotRegular,
    PullDir,
    Record,
    absolute,
    check_digest,
    load_json,
    read_small,
    remove_tree,
    write_atomic,
)


@pytest.mark.parametrize("text", ["sha256:" + "0" * 64, "sha256:" + "af" * 32])
def test_a_sha256_digest_passes(text):
    assert check_digest(text) == text


@pytest.mark.parametrize(
    "text", ["sha256:" + "0" * 63, "sha256:" + "A" * 64, "sha512:" + "0" * 64, "sha256:../" + "0" * 61, None, 1]
)
def test_anything_else_is_no_digest(text):
    with pytest.raises(Error, match="malformed digest"):
        check_digest(text)


# load_json reads UTF-8 JSON with json's C scanner itself, without json.decoder; all else goes to json.loads. These
# must come out exactly as json.loads has them (value or error), on every Python d-run runs on.
JSON_CASES = [
    b'{"a": [1, -2.5e3, true, false, null, "\\u00e9\\ud800", "\xc3\xa9"], "a": {}}',
    b" \t\r\n[]\n ",
    b'"\xed\xa0\x80"',  # a lone surrogate, in UTF-8 (json reads bytes with surrogatepass)
    b"[NaN, Infinity, -Infinity, 1" + b"0" * 400 + b"]",
    b"[1" + b"0" * 5000 + b"]",  # over int's digit limit: ValueError
    b"\xef\xbb\xbf[1]",  # UTF-8 with a BOM
    "[1]".encode("utf-16"),
    "[1]".encode("utf-16-le"),
    "[1]".encode("utf-32-be"),
    b"[1\x00]",
    b"",
    b" ",
    b"[1] [2]",
    b"[1,]",
    b'["a\tb"]',  # a raw tab: strict JSON refuses it
    b"\xff[1]",
    b"[\xff]",
    b"[1]\x0b",
    "[1, 2]",
    "\ufeff[1]",
    ' {"a": 1} ',
]


def outcome(read, data):
    try:
        return "value", repr(read(data))
    except (ValueError, RecursionError) as err:
        return type(err).__name__, str(err)


@pytest.mark.parametrize("data", JSON_CASES)
def test_load_json_reads_as_json_loads(data):
    assert outcome(load_json, data) == outcome(json.loads, data)


@pytest.mark.parametrize("python", ["/usr/bin/python3"])
def test_load_json_reads_as_json_loads_on_debians_python(python):
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python}")
    code = "\n".join(
        [
            f"import ast, json, sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r})",
            "from dutils.store import load_json",
            inspect.getsource(outcome),
            "for data in ast.literal_eval(sys.stdin.read()):",
            "    assert outcome(load_json, data) == outcome(json.loads, data), data",
        ]
    )
    subprocess.run([python, "-I", "-c", code], input=repr(JSON_CASES), text=True, check=True, timeout=30)


def test_json_nested_too_deeply_is_bad_json():
    assert load_json(b'{"a": [1]}') == {"a": [1]}
    with pytest.raises(ValueError):
        load_json("[" * 100_000 + "]" * 100_000)


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new and longer")
    assert path.read_bytes() == b"new and longer" and os.listdir(path.parent) == ["config.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0  # never writable by others


def test_read_small_reads_a_small_regular_file_and_no_more_than_its_cap(tmp_path):
    (tmp_path / "small").write_bytes(b"12345")
    assert read_small(tmp_path / "small") == b"12345"
    with pytest.raises(OSError, match="larger than 4 bytes"):
        read_small(tmp_path / "small", cap=4)
    with pytest.raises(FileNotFoundError):
        read_small(tmp_path / "missing")


def test_read_small_refuses_a_fifo_at_once_and_never_follows_a_link(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opened for reading, it would wait for a writer for ever
    with pytest.raises(NotRegular):
        read_small(tmp_path / "fifo")
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OSError) as caught:
        read_small(tmp_path / "link")
    assert caught.value.errno == errno.ELOOP
    with pytest.raises(NotRegular):
        read_small(tmp_path)


def test_a_finished_folder_changes_image_only_when_asked(tmp_path: Path):
    done = Record("r:1", digest(1), "linux/amd64", complete=True)
    assert done.retarget("r:1", digest(1), "linux/amd64", tmp_path, replace=False) is done
    with pytest.raises(Error, match="--update"):
        done.retarget("r:1", digest(2), "linux/amd64", tmp_path, replace=False)
    assert done.retarget("r:1", digest(2), "linux/amd64", tmp_path, replace=True) == Record(
        "r:1", digest(2), "linux/amd64"
    )
    unfinished = done._replace(complete=False)  # an interrupted pull of another image: simply replaced
    assert unfinished.retarget("r:2", digest(2), "linux/amd64", tmp_path, replace=False).digest == digest(2)


@pytest.mark.integration  # 20,000 files, a second or two
def test_a_folder_moved_out_of_a_tree_being_removed_takes_the_removal_nowhere_else(tmp_path: Path) -> None:
    # The attacker can write inside the tree (a 1777 folder of an image's, in an overlay's upper) and moves a folder
    # the removal is inside of to a folder of the victim's on the same filesystem: coming back up through "..", the
    # removal must not go on with the tree's other names there.
    tree, victim = tmp_path / "tree/a/b", tmp_path / "victim"
    for folder in (tree, victim):
        for n in range(10):
            (folder / f"d{n}").mkdir(parents=True)
    for n in range(10):
        (victim / f"d{n}/precious").write_text("mine")
    (tree / "c").mkdir()
    for n in range(20_000):
        (tree / f"c/{n}").touch()
    before = os.stat(tree / "c").st_mtime_ns

    def move_when_entered() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and os.stat(tree / "c").st_mtime_ns == before:
            time.sleep(0.001)
        os.rename(tree / "c", victim / "c")

    mover = threading.Thread(target=move_when_entered)
    mover.start()
    try:
        with pytest.raises(OSError, match="moved while it was removed"):
            remove_tree(tmp_path / "tree")
    finally:
        mover.join(timeout=70)
    assert sorted(os.listdir(victim)) == sorted([*(f"d{n}" for n in range(10)), "c"])
    assert all((victim / f"d{n}/precious").read_text() == "mine" for n in range(10))


def test_remove_tree_never_follows_links(tmp_path: Path) -> None:
    out = tmp_path / "outside"
    plant_markers(out / "victim.txt")
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "link").symlink_to(out)
    (tmp_path / "tree" / "top-link").symlink_to(out)
    (tmp_path / "tree" / "a").chmod(0)
    before = outside_state([out])
    remove_tree(tmp_path / "tree")
    remove_tree(tmp_path / "missing")
    assert not (tmp_path / "tree").exists() and outside_state([out]) == before


@pytest.mark.parametrize("path", [".", "", "./a/./b/", "a//b", "//x/y", "///x", "/a/../b/.", "a/..", "/"])
def test_a_pull_folders_paths_are_the_same_as_strings_without_pathlib(path):
    assert absolute(path) == str(Path(path).absolute())
    paths, strings = vars(PullDir(path)), vars(PullDir(path, str))
    assert {name: str(value) for name, value in paths.items()} == strings
