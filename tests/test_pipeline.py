"""The pipeline's pure parts, without a registry: the lock file, d-run settings, the applied-layers list, the
record's update policy."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from dutils.errors import Error
from dutils.manifest import Blob, Image, parse_platform
from dutils.pipeline import LockFile, Options, Pull, Sandbox
from dutils.store import Record

LAYERS = 27_000  # far more than any real image: the work per layer must not grow with their number


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_run_settings_are_exactly_d_runs_flags(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sandbox = Sandbox(
        "sandboxes/tools",
        "alpine",
        command=["make", "-j2"],
        volumes=["src:/src", "/cache"],
        env={"A": "1", "B": "x y"},
        net=True,
        rw=True,
        user="app:app",
        workdir="/src",
    )
    assert sandbox.d_run_argv() == [
        sys.executable, "-m", "dutils.run",
        "-v", "src:/src", "-v", "/cache", "-e", "A=1", "-e", "B=x y", "-n", "--rw", "-u", "app:app",
        "--workdir", "/src", str(tmp_path / "sandboxes" / "tools"), "make", "-j2",
    ]  # fmt: skip
    assert Sandbox("s", "alpine").d_run_argv()[3:] == [str(tmp_path / "s")]  # d-run's defaults: nothing added


def test_the_lock_file_is_stable_json_keyed_by_folder_relative_to_it(tmp_path: Path):
    lock = LockFile(tmp_path / "sandboxes.lock")
    entry = {"reference": "r:1", "digest": digest(1), "manifest": digest(2), "platform": "linux/amd64"}
    lock.pin(tmp_path / "b", entry)
    lock.pin(tmp_path / "sub" / "a", entry | {"reference": "r:2"})
    text = (tmp_path / "sandboxes.lock").read_text()
    assert list(json.loads(text)["sandboxes"]) == ["b", "sub/a"] and text.endswith("}\n")
    lock.pin(tmp_path / "b", entry)
    assert (tmp_path / "sandboxes.lock").read_text() == text  # the same facts, the same bytes
    assert lock.entry(tmp_path / "b", "r:1") == entry
    assert lock.entry(tmp_path / "b", "r:other") is None  # the dodo.py now names another image


# a committed lock file is another author's: "[" * 100_000 nests deeper than Python's JSON parser goes
@pytest.mark.parametrize(
    "text", ["{", "[]", '{"sandboxes": {"a": {"digest": "sha256:../../x", "manifest": 1}}}', "[" * 100_000]
)
def test_a_damaged_lock_file_is_one_clear_error(tmp_path: Path, text: str):
    (tmp_path / "sandboxes.lock").write_text(text)
    with pytest.raises(Error, match="sandboxes.lock is damaged"):
        LockFile(tmp_path / "sandboxes.lock").entry(tmp_path / "a", "r:1")


@pytest.mark.parametrize("kind", ["fifo", "huge", "link"])
def test_a_lock_file_that_is_no_small_regular_file_is_refused_at_once(tmp_path: Path, kind: str):
    path = tmp_path / "sandboxes.lock"
    if kind == "fifo":
        os.mkfifo(path)  # read at once, never waited on
    elif kind == "huge":
        with open(path, "wb") as out:
            out.truncate(1 << 30)  # sparse: a gigabyte to read, nothing on the disk
    else:
        path.symlink_to(tmp_path / "elsewhere.lock")
    with pytest.raises(Error, match="cannot read .*sandboxes.lock"):
        LockFile(path).entry(tmp_path / "a", "r:1")


def pull_of_many_layers(tmp_path: Path) -> Pull:
    pull = Pull("localhost:5000/app:1", tmp_path / "app", Options(cache=tmp_path / "cache"))
    layers = tuple(Blob(digest(n), 1, "application/vnd.oci.image.layer.v1.tar") for n in range(LAYERS))
    pull.image = Image(digest(LAYERS), "linux/amd64", Blob(digest(LAYERS + 1), 1, "config"), layers)
    pull.folder.state.mkdir(parents=True)
    pull.folder.rootfs.mkdir()
    return pull


def test_checking_every_layer_of_a_huge_image_costs_the_same_per_layer(tmp_path: Path):
    pull = pull_of_many_layers(tmp_path)
    pull.applied_path().write_text("".join(f"{layer.digest}\n" for layer in pull.image.layers))
    started = time.monotonic()
    assert all(pull.is_applied(n) for n in range(LAYERS))
    assert time.monotonic() - started < 3  # re-reading the list per layer took minutes


def test_a_layer_applied_again_voids_the_ones_after_it_and_a_cut_line(tmp_path: Path):
    pull = pull_of_many_layers(tmp_path)
    pull.applied_path().write_text(f"{digest(0)}\n{digest(1)}\n{digest(2)[:20]}")  # killed mid-line
    assert [pull.is_applied(n) for n in range(3)] == [True, True, False]
    pull.note_applied(1, digest(1))
    assert pull.applied_path().read_text() == f"{digest(0)}\n{digest(1)}\n"
    pull.note_applied(2, digest(2))
    assert Pull("localhost:5000/app:1", pull.folder.root, pull.options).applied() == [digest(n) for n in range(3)]


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


@pytest.mark.parametrize(
    ("image", "asked", "settled"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/386", "linux/amd64", True),  # accepted without being named: still no request needed
        ("linux/arm/v7", "linux/arm64", True),
        ("linux/arm64/v8", "linux/amd64", False),  # another machine's: resolve again
    ],
)
def test_a_locked_complete_folder_is_settled_for_any_platform_the_asked_one_runs(tmp_path: Path, image, asked, settled):
    lock = LockFile(tmp_path / "sandboxes.lock")
    options = Options(cache=tmp_path / "cache", platform=parse_platform(asked))
    pull = Pull("localhost:5000/app:1", tmp_path / "app", options, lock)
    lock.pin(pull.folder.root, {"reference": "localhost:5000/app:1", "digest": digest(1), "manifest": digest(2)})
    pull.folder.rootfs.mkdir(parents=True)
    pull.folder.config.write_text("{}")
    pull.folder.write_record(Record("localhost:5000/app:1", digest(2), image, complete=True))
    assert pull.settled() is settled
