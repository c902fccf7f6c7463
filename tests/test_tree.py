"""tree: one layer's changes and their journal, put back exactly after a kill at any moment."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from images import Tar
from malicious import USER, Layer, as_root, make_workspace, write_layer
from trees import snapshot

from dutils.store import remove_tree
from dutils.tree import Hashes, Journal


def test_path_hashes_hold_what_was_added_across_merges() -> None:
    hashes, added = Hashes(), set()
    hashes.RECENT = 7  # merges every 7 additions
    rng = random.Random(5)
    for _ in range(500):
        value = rng.randrange(-(2**63), 2**63)
        hashes.add(value)
        added.add(value)
    assert len(hashes.merged) == 497 and len(hashes.recent) == 3
    assert all(value in hashes for value in added)
    assert not any(value in hashes for value in (rng.randrange(-(2**63), 2**63) for _ in range(500)))


# -- the journal of directories: on disk, resumed by the same layer on the same rootfs only


def records(journal: Journal) -> dict[str, tuple]:
    """Every record as path -> (mode, atime, mtime), read down the tree from the root's (parent 0) in batches of
    children; a child's id is larger than its parent's, and each tells whether it has children."""
    found, todo = {}, [(0, None)]
    while todo:
        parent, path = todo.pop()
        batch, more, after = [], True, 0
        while more:
            batch, more = journal.children(parent, after)
            for ident, name, *saved, inside in reversed(batch):
                assert parent < ident and (after == 0 or after < name)
                after, name = name, os.fsdecode(name)
                found[name if path is None else f"{path}/{name}".lstrip("/")] = tuple(saved)
                todo.append((ident, name if path is None else f"{path}/{name}".lstrip("/")))
                assert inside == bool(journal.children(ident)[0])
    return found


def test_journal_keeps_first_records_and_later_settings_as_a_tree(tmp_path: Path) -> None:
    path, header = tmp_path / "journal", ("sha256:layer", 1, 2)
    journal = Journal(path, header)
    journal.KNOWN, journal.BATCH = 2, 3  # most records reach the database, in several batches
    odd = os.fsdecode(b"caf\xe9")  # not UTF-8
    root = journal.save_first(0, "", 0o555, 1, 0)
    a = journal.save_first(root, "a", 0o555, 1, 1)
    b = journal.save_first(a, "b", 0o555, 1, 3)
    journal.save_first(root, odd, 0o555, 1, 4)
    assert journal.save_first(root, "a", 0o111, 7, 7) == a  # entered again: the first record stays
    assert journal.save_first(a, "b", 0o111, 7, 7) == b
    journal.save(a, "b", 0o700, 5, 5)  # a directory entry of the layer: its values win
    assert journal.save_first(a, "b", 0o777, 9, 9) == b
    journal.save(root, "new", 0o750, 6, 6)
    expected = {"": (0o555, 1, 0), "a": (0o555, 1, 1), "a/b": (0o700, 5, 5), odd: (0o555, 1, 4), "new": (0o750, 6, 6)}
    assert records(journal) == expected
    assert [name for _, name, *_ in journal.children(root)[0]] == [b"new", b"caf\xe9", b"a"]  # BATCH 3: full
    assert [name for _, name, *_ in journal.children(root, b"a")[0]] == [b"new", b"caf\xe9"]
    assert journal.children(root, b"new") == ([], False) and journal.children(b) == ([], False)
    journal.close()

    resumed = Journal(path, header)  # a rerun of the same layer finds every record made before
    assert resumed.save_first(root, "a", 0o111, 7, 7) == a
    assert records(resumed) == expected
    resumed.close()
    for other in [("sha256:other", 1, 2), ("sha256:layer", 1, 3)]:  # another layer, or a new rootfs
        fresh = Journal(path, other)
        assert records(fresh) == {}
        fresh.close()
    fresh.remove()
    assert list(tmp_path.iterdir()) == []


def test_journal_of_another_kind_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_text('{"layer": "sha256:layer", "root": [1, 2]}\n["a", 493, 1, 1]\n')  # the JSON lines of old
    journal = Journal(path, ("sha256:layer", 1, 2))
    assert records(journal) == {}
    journal.close()
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")  # never followed: replaced by a journal of its own
    journal = Journal(path, ("sha256:layer", 1, 2))
    journal.save_first(0, "a", 0o755, 1, 1)
    journal.close()
    assert not path.is_symlink() and not (tmp_path / "elsewhere").exists()


# -- kill -9 at any moment of a folder-heavy layer, then the same layer again: exactly the clean tree

FOLDERS = 400
KILLED_APPLY = """
import sys
from pathlib import Path
from dutils import tree
from dutils.apply import apply_layer
tree.Journal.KNOWN, tree.Journal.BATCH = 100, 7  # small: most directories are looked up in the journal file
print("ready", flush=True)
apply_layer(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
"""


def folder_layers() -> tuple[Tar, Tar]:
    """A lower layer of read-only and mode-0000 folders with files, and an upper one that adds folders and files
    into them (their times and modes must be put back as they were), whites some out and sets others' modes."""
    lower, upper = Tar().dir("."), Tar()
    for n in range(FOLDERS):
        lower.dir(f"d{n}", 0o555).file(f"d{n}/old", b"old").dir(f"d{n}/locked", 0).dir(f"d{n}/gone", 0o500)
        upper.dir(f"d{n}/new", 0o500).file(f"d{n}/new/f", b"new", mode=0o400).file(f"d{n}/deep/er/f")
        upper.file(f"d{n}/locked/added", b"added").whiteout(f"d{n}/gone")
        upper.dir(f"d{n}/deep/er", 0o555).dir(f"d{n}/deep", 0o700)  # listed after the folders were made
        if n % 3 == 0:
            upper.dir(f"d{n}", 0o750)
    return lower, upper


def start_apply(user, layer: Layer, rootfs: Path) -> subprocess.Popen:
    """apply_layer in a child of its own (as the ordinary user when `user` is given), once it says "ready"."""
    python = str(user.bin / "python") if user else sys.executable
    argv = [python, "-c", KILLED_APPLY, str(layer.blob), layer.media_type, layer.diff_id, str(rootfs)]
    as_user = {"user": USER, "group": USER, "extra_groups": [], "env": user.env} if user else {}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=rootfs.parent.parent, **as_user)
    assert child.stdout.readline() == "ready\n"
    return child


def apply_whole(user, layer: Layer, rootfs: Path) -> float:
    """The seconds it took, from "ready"."""
    with start_apply(user, layer, rootfs) as child:
        started = time.monotonic()
        assert child.wait(timeout=120) == 0
    return time.monotonic() - started


# Moments to kill at, as fractions of a clean apply: one drawn from each part (early, middle, and the end, where
# finish() puts modes and times back), so that every moment is taken over many runs; each a few seconds as root and
# as the user, where taking all of them each run took a minute.
PARTS = [(0.05, 0.4), (0.4, 0.8), (0.8, 0.99)]


@pytest.mark.integration  # slow: kills
@pytest.mark.timeout(300)
@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
def test_folder_heavy_layer_killed_at_any_moment_then_run_again_gives_the_clean_tree(as_user: bool, request) -> None:
    user = request.getfixturevalue("unprivileged") if as_user else None
    workspace = make_workspace()
    try:
        folder = workspace / "pull"
        lower, upper = (write_layer(workspace, tar.to_bytes()) for tar in folder_layers())
        fractions = [random.uniform(*part) for part in PARTS]
        targets = [folder / "clean", *(folder / f"killed-{n}" for n in range(len(fractions)))]
        apply_whole(user, lower, targets[0])
        for rootfs in targets[1:]:  # the lower tree as applied: owners, modes and nanosecond times kept
            subprocess.run(["cp", "-a", targets[0], rootfs], check=True, timeout=60)
        duration = apply_whole(user, upper, targets[0])

        interrupted = 0
        for fraction, rootfs in zip(fractions, targets[1:], strict=True):
            for delay in (fraction * duration, fraction * duration / 2):  # killed twice: a rerun is killed too
                with start_apply(user, upper, rootfs) as child:
                    time.sleep(delay)
                    child.kill()
                    child.wait(timeout=30)
                interrupted += (folder / f".{rootfs.name}.d-utils-journal").exists()
            apply_whole(user, upper, rootfs)

        clean = snapshot(targets[0])
        assert clean[0]["d0"].mode == 0o750 and clean[0]["d1/locked"].mode == 0 and "d1/gone" not in clean[0]
        for rootfs in targets[1:]:
            assert snapshot(rootfs) == clean, (rootfs.name, fractions)  # modes and nanosecond times of every folder
        assert sorted(os.listdir(folder)) == sorted(rootfs.name for rootfs in targets)  # no journal left
        # Not vacuous: kills landed mid-apply (on a loaded machine, a late one may come after the end: harmless)
        assert interrupted >= len(fractions) // 2
    finally:
        remove_tree(workspace)


# -- system calls per entry: the apply path at GNU tar's count (issue 20)

APPLY = """
import sys
from pathlib import Path
from dutils.apply import apply_layer
apply_layer(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
"""
MAX_CALLS_PER_ENTRY = 4.5  # a file costs 4 (openat, pwrite64, utimensat, close) and a folder of 10 about 7 more


def system_calls(user, layer: Layer, rootfs: Path) -> int:
    """What applying `layer` onto the new `rootfs` costs in system calls (strace -f -c: its last line is the total)."""
    python = str(user.bin / "python") if user else sys.executable
    as_user = {"user": USER, "group": USER, "extra_groups": [], "env": user.env} if user else {}
    summary = rootfs.parent / f"{rootfs.name}.strace"
    argv = [
        "strace",
        "-f",
        "-c",
        "-o",
        summary,
        python,
        "-c",
        APPLY,
        layer.blob,
        layer.media_type,
        layer.diff_id,
        rootfs,
    ]
    subprocess.run(argv, check=True, timeout=120, cwd=rootfs.parent, **as_user)
    return int(summary.read_text().splitlines()[-1].split()[3])  # % time, seconds, usecs/call, calls, ...


@pytest.mark.integration  # strace slows it to seconds
@pytest.mark.parametrize("as_user", [False, pytest.param(True, marks=as_root)], ids=["as-root", "as-ordinary-user"])
def test_an_entry_costs_at_most_a_few_system_calls(as_user: bool, request) -> None:
    """Two layers of small files, ten in a folder, that differ only in size: the difference in calls over the
    difference in entries is what an entry costs, the interpreter's start-up left out. It does not depend on load."""
    user = request.getfixturevalue("unprivileged") if as_user else None
    workspace = make_workspace()
    try:
        calls, entries = [], []
        for folders in (20, 220):
            tar = Tar().dir("usr")
            for n in range(folders):
                tar.dir(f"usr/d{n}")
                for k in range(10):
                    tar.file(f"usr/d{n}/f{k}", b"%d\n" % k)
            calls.append(system_calls(user, write_layer(workspace, tar.to_bytes()), workspace / "pull" / f"r{folders}"))
            entries.append(1 + 11 * folders)
        per_entry = (calls[1] - calls[0]) / (entries[1] - entries[0])
        assert 4 <= per_entry <= MAX_CALLS_PER_ENTRY, f"{per_entry:.2f} system calls per entry"
    finally:
        remove_tree(workspace)
