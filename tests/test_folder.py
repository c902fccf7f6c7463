"""A pull folder's own state: the lock file pinning folders to digests, and the log of the layers applied."""

import json
import os
from functools import partial
from pathlib import Path

import pytest

from dutils.errors import Error
from dutils.folder import AppliedLog, LockFile, settled
from dutils.manifest import parse_platform
from dutils.store import PullDir, Record


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


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
    with pytest.raises(Error, match="sandboxes.lock is (damaged|not valid JSON)"):
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


def test_a_layer_applied_again_voids_the_ones_after_it_and_a_cut_line(tmp_path: Path):
    folder = PullDir(tmp_path / "app")
    folder.rootfs.mkdir(parents=True)
    log = AppliedLog(folder)
    log.path.parent.mkdir()
    log.path.write_text(f"{digest(0)}\n{digest(1)}\n{digest(2)[:20]}")  # killed mid-line
    assert [log.is_applied(n, digest(n)) for n in range(3)] == [True, True, False]
    log.note(1, digest(1))
    assert log.path.read_text() == f"{digest(0)}\n{digest(1)}\n"
    log.note(2, digest(2))
    assert AppliedLog(folder).applied() == [digest(n) for n in range(3)]


def test_the_log_says_nothing_is_applied_without_a_rootfs_and_starts_over_with_it(tmp_path: Path):
    folder = PullDir(tmp_path / "app")
    (folder.rootfs / "etc").mkdir(parents=True)
    folder.state.mkdir()
    (folder.state / "applied").write_text(f"{digest(0)}\n")
    log = AppliedLog(folder)
    assert log.applied() == [digest(0)]
    log.start_over()
    assert not folder.rootfs.exists() and not log.path.exists() and AppliedLog(folder).applied() == []


def settled_folder(tmp_path: Path) -> tuple[PullDir, LockFile]:
    """A complete folder of localhost:5000/app:1 for linux/amd64, pinned to what it holds."""
    folder, lock = PullDir(tmp_path / "app"), LockFile(tmp_path / "sandboxes.lock")
    folder.rootfs.mkdir(parents=True)
    folder.root.chmod(0o700)
    folder.config.write_text("{}")
    folder.write_record(Record("localhost:5000/app:1", digest(2), "linux/amd64", complete=True))
    lock.pin(folder.root, {"reference": "localhost:5000/app:1", "digest": digest(1), "manifest": digest(2)})
    return folder, lock


SPOILS = {  # what makes a folder unsettled: the full path then redoes it, or says in one line what is wrong
    "untrusted": lambda folder, lock: folder.root.chmod(0o770),  # others could have changed it
    "no-config": lambda folder, lock: folder.config.unlink(),
    "incomplete": lambda folder, lock: folder.write_record(folder.read_record()._replace(complete=False)),
    "other-image": lambda folder, lock: folder.write_record(folder.read_record()._replace(digest=digest(3))),
    "arm64-image": lambda folder, lock: folder.write_record(folder.read_record()._replace(platform="linux/arm64")),
    "damaged-record": lambda folder, lock: folder.record_path.write_text("{"),
    "platform-not-text": lambda folder, lock: folder.record_path.write_text(
        json.dumps(folder.read_record()._asdict() | {"platform": 5})
    ),
    "other-reference": lambda folder, lock: folder.write_record(  # the same image, pulled by another name
        folder.read_record()._replace(reference="localhost:5000/app:0")
    ),
    "damaged-lock": lambda folder, lock: Path(lock.path).write_text(
        '{"sandboxes": {"app": {"digest": "sha256:../x"}}}'
    ),
}


def is_settled(folder: PullDir, lock: LockFile, reference: str = "localhost:5000/app:1") -> bool:
    return settled(folder, reference, parse_platform("linux/amd64"), partial(lock.manifest, folder.root, reference))


def test_a_complete_trusted_folder_of_the_locked_manifest_is_settled(tmp_path: Path):
    folder, lock = settled_folder(tmp_path)
    assert is_settled(folder, lock)
    assert not settled(folder, "localhost:5000/app:1", parse_platform("linux/amd64"), lambda: None)  # nothing pinned
    assert not is_settled(folder, lock, "localhost:5000/app:2")  # the dodo.py moved


@pytest.mark.parametrize("spoil", SPOILS.values(), ids=SPOILS.keys())
def test_anything_amiss_is_not_settled(tmp_path: Path, spoil):
    folder, lock = settled_folder(tmp_path)
    spoil(folder, lock)
    assert not is_settled(folder, lock)


@pytest.mark.parametrize("spoil", [name for name in SPOILS if name not in ("other-image", "damaged-lock")])
def test_what_is_amiss_on_disk_is_found_before_any_registry_is_asked(tmp_path: Path, spoil):
    folder, lock = settled_folder(tmp_path)
    SPOILS[spoil](folder, lock)
    asked = []
    assert not settled(folder, "localhost:5000/app:1", parse_platform("linux/amd64"), lambda: asked.append(1))
    assert asked == []  # a tag's no-op asks the registry only about a folder that is otherwise complete
