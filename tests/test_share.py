"""Folders sharing disk (d-pull --share, Sandbox(share=True)): one applied tree in the cache's store, folders linked
from it, and nothing written through one folder reaching the store or another folder. Against the real registry,
as root and as the ordinary user."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from cli import BIN, assert_one_line_error
from images import Image, Tar, busybox_layer, push, random_files
from malicious import END, make_workspace, ustar_header
from test_resume import kill_when
from trees import snapshot, tree_without_folder_times

from dutils.cache import MAX_AGE, PRUNE_EVERY, list_entries, remove_older
from dutils.pipeline import Options, Sandbox
from dutils.share import chain_ids, following_no_link
from dutils.store import ANCHOR, check_cache, open_cache, trees_folder

Tool = Callable[..., subprocess.CompletedProcess]


def data_layer() -> Tar:
    """Entries of every kind, for a --rw run to write, truncate, chmod, delete and rename."""
    return (
        Tar()
        .dir("data")
        .file("data/file", b"content\n")
        .hardlink("data/hard", "data/file")
        .file("data/trunc", b"to be truncated\n")
        .file("data/mode", b"m")
        .file("data/setuid", b"s", mode=0o4755)
        .file("data/ro", b"read-only\n", mode=0o444)
        .file("data/gone", b"g")
        .file("data/old", b"o")
        .symlink("data/link", "file")
        .fifo("data/fifo")
        .device("data/null")  # skipped as an ordinary user
        .dir("data/dir")
        .file("data/dir/inner", b"i")
        .dir("data/locked", 0o000)
        .file("data/locked/secret", b"x", mode=0o000)
    )


def upper_layer() -> Tar:
    """An image extending the base: a file replaced, one whited out, a folder's mode changed, one added."""
    return Tar().file("data/file", b"upper\n", mode=0o600).whiteout("data/gone").dir("data/dir", 0o700).file("data/new")


BASE = Image(layers=[busybox_layer(), data_layer()])
EXTENDED = Image(layers=[busybox_layer(), data_layer(), upper_layer()])

# In place (through every link the folder's files have): append, truncate, chmod, touch; and deletes, renames.
RW_SCRIPT = """set -e; cd /data
echo more >> file; : > trunc; echo w >> ro; chmod 600 mode; chmod u-s setuid; touch hard
rm gone fifo; rm -f null; mv old renamed; mv dir moved; ln -sf elsewhere link
chmod 755 locked; echo n > locked/new; : > locked/secret; mkdir made; mkfifo made/fifo
"""


def subprocess_tool(name: str, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = os.environ | (env or {})
    return subprocess.run([BIN / name, *map(str, args)], capture_output=True, text=True, timeout=120, env=environment)


@pytest.fixture(params=["root", "user"])
def tool(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Tool]:
    """Where to pull, and d-pull/d-run/d-cache run as root, or as the ordinary user in a folder of theirs."""
    if request.param == "root":
        return tmp_path, subprocess_tool
    user, place = request.getfixturevalue("unprivileged"), make_workspace()
    request.addfinalizer(lambda: shutil.rmtree(place))

    def run_as_user(name: str, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        own = own_environment(place / "pull") | (env or {})
        return user.run([user.bin / name, *args], env=own, capture_output=True, text=True, timeout=120)

    return place / "pull", run_as_user


def own_environment(place: Path) -> dict[str, str]:
    """The user's home and /run/containers are shared with other tests running meanwhile: credentials from here only."""
    return {name: str(place) for name in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG")}


@pytest.fixture
def start(request: pytest.FixtureRequest, tool: tuple[Path, Tool]) -> Callable[..., subprocess.Popen]:
    """d-pull started in the background as `tool` runs it, leading a process group: kill_when kills runuser's child."""
    if request.node.callspec.params["tool"] == "root":
        return lambda *args, **kwargs: subprocess.Popen([BIN / "d-pull", *args], start_new_session=True, **kwargs)
    user, env = request.getfixturevalue("unprivileged"), own_environment(tool[0])

    def start_as_user(*args: object, **kwargs: object) -> subprocess.Popen:
        argv = [*user.become, user.bin / "d-pull", *args]
        return subprocess.Popen(argv, env=user.env | env, cwd=user.home, start_new_session=True, **kwargs)

    return start_as_user


def pull(tool: Tool, cache: Path, *args: object) -> subprocess.CompletedProcess:
    done = tool("d-pull", "--cache", cache, *args)
    assert done.returncode == 0, done.stderr
    return done


def trees(cache: Path) -> list[Path]:
    return sorted(path for path in (cache / "trees").iterdir() if path.is_dir())


def test_chain_ids_are_the_oci_ones():
    one, two = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert chain_ids([one, two]) == [one, "sha256:" + hashlib.sha256(f"{one} {two}".encode()).hexdigest()]
    assert chain_ids([]) == []


def test_a_sandbox_shares_when_it_or_the_options_say_so():
    assert Sandbox("a", "alpine", share=True).options(Options()).share
    assert Sandbox("a", "alpine").options(Options(share=True)).share
    assert not Sandbox("a", "alpine").options(Options()).share


def test_trees_expire_as_blobs_do_and_their_files_links_do_not_make_the_cache_untrusted(tmp_path):
    cache = open_cache(tmp_path / "cache")
    for name, days in (("old", 31), ("new", 1)):
        tree = trees_folder(cache) / name
        (tree / "rootfs").mkdir(parents=True)
        (tree / "rootfs" / "file").write_bytes(b"x" * 5000)
        os.link(tree / "rootfs" / "file", tree / "rootfs" / "link")  # the image's own hard link
        (tree / ANCHOR).write_text(name)
        os.link(tree / ANCHOR, tmp_path / f"folder-of-{name}")  # a folder made from it
        then = time.time() - days * 86400
        os.utime(tree / ANCHOR, (then, then))
    check_cache(cache)
    listed = {entry.path.name: entry for entry in list_entries(cache)}
    assert (listed["new"].folders, listed["new"].size) == (1, 3 * 4096)  # the file once (two blocks), the anchor
    assert [entry.path.name for entry in remove_older(cache, MAX_AGE)] == ["old"]
    assert trees(cache) == [trees_folder(cache) / "new"]


def test_shared_folders_are_one_tree_and_a_rw_run_writes_into_neither(tool, registry):
    place, run = tool
    push(registry.host, "shared-base", "latest", BASE)
    ref, cache = f"{registry.host}/shared-base:latest", place / "cache"
    for name in ("a", "b"):
        pull(run, cache, "--share", ref, place / name)
    pull(run, cache, ref, place / "private")

    (tree,) = trees(cache)
    assert (cache / "trees").stat().st_mode & 0o777 == 0o700  # no other user reaches the store's /tmp (1777)
    assert snapshot(place / "a" / "rootfs") == snapshot(tree / "rootfs")  # folder times too
    same = tree_without_folder_times(place / "a" / "rootfs")  # those of folders no layer lists are the pull's
    assert same == tree_without_folder_times(place / "private" / "rootfs")
    stored = (tree / "rootfs" / "data" / "file").stat()
    for name in ("a", "b"):
        assert (place / name / "rootfs" / "data" / "file").stat().st_ino == stored.st_ino
    assert stored.st_nlink == 2 * 3  # data/file and data/hard, in the store and in a and b
    assert (tree / "anchor").stat().st_nlink == 3

    store_before, sibling_before = snapshot(tree / "rootfs"), snapshot(place / "b" / "rootfs")
    ran = run("d-run", "--rw", place / "a", "sh", "-c", RW_SCRIPT)
    assert ran.returncode == 0 and "private" not in ran.stderr, ran.stderr
    assert snapshot(tree / "rootfs") == store_before
    assert snapshot(place / "b" / "rootfs") == sibling_before
    assert (tree / "anchor").stat().st_nlink == 3  # a is still shared: its changes are in its overlay (test_overlay)
    attack = "echo x >> /data/file; : > /data/trunc; chmod 777 /data/mode; touch /data/hard; rm /data/old"
    tried = run("d-run", place / "b", "sh", "-c", attack)  # a read-only run of a sibling, as an attacker would
    assert tried.returncode != 0 and "Read-only file system" in tried.stderr
    assert snapshot(tree / "rootfs") == store_before
    again = run("d-run", "--rw", place / "a", "cat", "/data/file")
    assert again.returncode == 0 and again.stdout == "content\nmore\n" and "private" not in again.stderr


def usage(*roots: Path) -> tuple[int, int]:
    """The distinct inodes below `roots` (and the roots), and their blocks in bytes."""
    blocks = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for path in [folder, *(os.path.join(folder, name) for name in files)]:
                info = os.lstat(path)
                blocks[info.st_dev, info.st_ino] = info.st_blocks * 512
    return len(blocks), sum(blocks.values())


def test_ten_shared_folders_take_little_more_disk_than_one_unshared(tool, registry):
    place, run = tool
    files = Tar()
    for n in range(2000):  # a hundred files a folder, as in the bench's small-files image
        files = (files.dir(f"d{n // 100}") if n % 100 == 0 else files).file(f"d{n // 100}/f{n}", b"%d" % n * 300)
    push(registry.host, "many-files", "latest", Image(layers=[files]))
    ref, cache = f"{registry.host}/many-files:latest", place / "cache"
    pull(run, cache, ref, place / "private")
    for n in range(10):
        pull(run, cache, "--share", ref, place / f"shared-{n}")
    one = usage(place / "private" / "rootfs")
    ten = usage(*trees(cache), *(place / f"shared-{n}" / "rootfs" for n in range(10)))
    assert one[0] > 2000 and ten[0] <= 1.2 * one[0] and ten[1] <= 1.2 * one[1], (one, ten)


def test_an_extending_image_starts_from_its_base_tree_and_update_prune_leave_siblings_alone(tool, registry):
    place, run = tool
    push(registry.host, "base", "latest", BASE)
    push(registry.host, "extended", "latest", EXTENDED)
    base, extended, cache = f"{registry.host}/base:latest", f"{registry.host}/extended:latest", place / "cache"
    for name in ("a", "b"):
        pull(run, cache, "--share", base, place / name)
    (base_tree,) = trees(cache)
    base_before = snapshot(base_tree / "rootfs")

    pull(run, cache, "--share", extended, place / "e")
    pull(run, cache, extended, place / "private")
    assert snapshot(base_tree / "rootfs") == base_before  # applying onto its links wrote into none of its files
    assert tree_without_folder_times(place / "e" / "rootfs") == tree_without_folder_times(place / "private" / "rootfs")
    kept, replaced = Path("rootfs/data/setuid"), Path("rootfs/data/file")
    assert (place / "e" / kept).stat().st_ino == (base_tree / kept).stat().st_ino  # linked from the base tree
    assert (place / "e" / replaced).read_text() == "upper\n" and (base_tree / replaced).read_text() == "content\n"

    push(registry.host, "base", "latest", EXTENDED)  # the tag moves: --update moves a to the extended tree
    sibling = snapshot(place / "b" / "rootfs")
    pull(run, cache, "--update", base, place / "a")
    assert snapshot(place / "a" / "rootfs") == snapshot(place / "e" / "rootfs")
    assert (place / "a" / replaced).stat().st_ino == (place / "e" / replaced).stat().st_ino
    assert snapshot(place / "b" / "rootfs") == sibling and snapshot(base_tree / "rootfs") == base_before

    listed = run("d-cache", "--cache", cache, "list")
    assert listed.returncode == 0, listed.stderr
    assert f"tree, folders: 1  {base_tree.name}" in listed.stdout  # b; a moved on
    for name in ("a", "b", "e"):  # a first run makes its mount points (/etc/hosts) in the folder
        assert run("d-run", place / name, "true").returncode == 0
    before = {name: snapshot(place / name / "rootfs") for name in ("a", "b", "e")}
    pruned = run("d-cache", "--cache", cache, "prune", "--all")
    assert pruned.returncode == 0, pruned.stderr
    assert trees(cache) == []
    for name in ("a", "b", "e"):  # the folders' links keep the files
        ran = run("d-run", place / name, "cat", "/data/setuid")
        assert (ran.returncode, ran.stdout) == (0, "s"), ran.stderr
        assert snapshot(place / name / "rootfs") == before[name]


LISTED_TREE = re.compile(r"^ *([0-9.]+) (B|KiB|MiB|GiB)  \S+ \S+  tree, folders: (\d+)  (\w+)$", re.MULTILINE)
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def listed_trees(run: Tool, cache: Path) -> dict[str, tuple[float, float, int]]:
    """d-cache list's trees: name -> (the size shown, in bytes; how far that may be off, shown to a tenth of its unit;
    the folders using it)."""
    listed = run("d-cache", "--cache", cache, "list")
    assert listed.returncode == 0, listed.stderr
    found = LISTED_TREE.findall(listed.stdout)
    return {name: (float(size) * UNITS[unit], 0.05 * UNITS[unit], int(n)) for size, unit, n, name in found}


def files_disk_use(tree: Path) -> int:
    """What du counts below `tree` (each inode once), less its folders' blocks: d-cache counts its files."""
    du = subprocess.run(["du", "-s", "-B1", tree], capture_output=True, text=True, check=True).stdout.split()[0]
    find = ["find", tree, "-type", "d", "-printf", "%b\\n"]  # in blocks of 512 bytes
    folders = subprocess.run(find, capture_output=True, text=True, check=True).stdout.split()
    return int(du) - 512 * sum(map(int, folders))


def test_cache_list_gives_a_tree_s_disk_use_as_du_counts_its_files_and_the_folders_using_it(tool, registry):
    place, run = tool
    big = Tar().dir("big").file("big/one", os.urandom(3 << 20)).hardlink("big/two", "big/one")  # counted once
    push(registry.host, "listed", "latest", Image(layers=[busybox_layer(), big]))
    ref, cache = f"{registry.host}/listed:latest", place / "cache"
    for name in ("a", "b"):
        pull(run, cache, "--share", ref, place / name)
    pull(run, cache, ref, place / "private")  # no folder of the tree's
    (tree,) = trees(cache)
    ((name, (size, precision, folders)),) = listed_trees(run, cache).items()
    assert (name, folders) == (tree.name, 2)
    assert abs(size - files_disk_use(tree)) <= precision, (size, files_disk_use(tree))


def test_cache_list_counts_the_files_of_a_tree_s_folders_its_user_cannot_read(tool, registry):
    place, run = tool
    hidden = Tar().dir("hidden", 0o000).file("hidden/big", os.urandom(2 << 20))
    push(registry.host, "hidden", "latest", Image(layers=[busybox_layer(), hidden]))
    cache = place / "cache"
    pull(run, cache, "--share", f"{registry.host}/hidden:latest", place / "a")
    (tree,) = trees(cache)
    ((size, precision, _),) = listed_trees(run, cache).values()
    assert abs(size - files_disk_use(tree)) <= precision, (size, files_disk_use(tree))


def test_a_tree_unused_for_thirty_days_is_expired_by_a_pull_once_a_day_and_its_folders_keep_working(tool, registry):
    place, run = tool
    push(registry.host, "expiring", "latest", BASE)
    push(registry.host, "fresh", "latest", Image(layers=[busybox_layer(), Tar().file("fresh")]))
    expiring, fresh, cache = f"{registry.host}/expiring:latest", f"{registry.host}/fresh:latest", place / "cache"
    pull(run, cache, "--share", expiring, place / "a")
    assert run("d-run", place / "a", "true").returncode == 0  # a first run makes its mount points (/etc/hosts)
    (old,) = trees(cache)
    before = snapshot(place / "a" / "rootfs")
    month_ago = time.time() - MAX_AGE - 3600
    os.utime(old / ANCHOR, (month_ago, month_ago))
    pull(run, cache, "--share", fresh, place / "f")
    assert old in trees(cache)  # the first pull pruned today already
    yesterday = time.time() - PRUNE_EVERY - 60
    os.utime(cache / "pruned", (yesterday, yesterday))
    pull(run, cache, "--share", fresh, place / "g")  # by the folder's steps, without doit
    (kept,) = trees(cache)
    assert kept != old  # fresh's, used today
    ran = run("d-run", place / "a", "cat", "/data/file")
    assert (ran.returncode, ran.stdout) == (0, "content\n"), ran.stderr
    assert snapshot(place / "a" / "rootfs") == before


def test_two_pulls_at_once_apply_the_tree_once(tool, start, registry):
    place, _ = tool
    push(registry.host, "at-once", "latest", BASE)
    ref, cache = f"{registry.host}/at-once:latest", place / "cache"
    started = [
        start("--cache", cache, "--share", ref, place / name, stderr=subprocess.PIPE, text=True) for name in "ab"
    ]
    said = [process.communicate(timeout=120)[1] for process in started]
    assert [process.returncode for process in started] == [0, 0], said
    assert "".join(said).count("applied layer 2/2") == 1  # by one of them; the other waited for its lock
    (tree,) = trees(cache)
    stored = (tree / "rootfs" / "data" / "setuid").stat()
    assert {(place / name / "rootfs/data/setuid").stat().st_ino for name in ("a", "b")} == {stored.st_ino}
    assert not (tree / ".rootfs.d-utils-journal").exists() and (tree / ANCHOR).stat().st_nlink == 3


def test_a_folder_made_from_a_complete_tree_is_the_pipeline_s_and_starts_no_doit(tool, registry):
    """The first --share folder of an image is made by doit's pipeline, which builds the tree; the next straight from
    the tree by the pipeline's own steps: the same folder, entry by entry, without loading doit. A run cut short
    before the record said complete is made again the same way."""
    place, run = tool
    exposed = Tar().dir("x").file("x/open", b"o", mode=0o666).hardlink("x/open-link", "x/open")
    push(registry.host, "straight", "latest", Image(layers=[busybox_layer(), data_layer(), exposed]))
    ref, cache, imports = f"{registry.host}/straight:latest", place / "cache", {"PYTHONPROFILEIMPORTTIME": "1"}
    loaded_doit = re.compile(r"\| +doit$", re.MULTILINE)
    said = [run("d-pull", "--cache", cache, "--share", ref, place / name, env=imports) for name in ("pipeline", "b")]
    assert [done.returncode for done in said] == [0, 0], said
    assert loaded_doit.search(said[0].stderr) and not loaded_doit.search(said[1].stderr)

    def folder(root: Path) -> tuple[dict, set]:  # what the pull writes beside rootfs has times of its own
        entries, links = snapshot(root)
        return {path: entry if path.startswith("rootfs") else replace(entry, mtime_ns=None)
                for path, entry in entries.items()}, links  # fmt: skip

    made = folder(place / "pipeline")
    assert folder(place / "b") == made and {"rootfs/x/open", "rootfs/x/open-link"} in made[1]
    (tree,) = trees(cache)
    assert (place / "b/rootfs/bin/sh").stat().st_ino == (tree / "rootfs/bin/sh").stat().st_ino
    assert (place / "b/rootfs/x/open").stat().st_ino != (tree / "rootfs/x/open").stat().st_ino
    record = json.loads((place / "b/image.json").read_text())
    (place / "b/image.json").write_text(json.dumps(record | {"complete": False}))  # as a kill before the end leaves
    (place / "b/.d-pull/applied").unlink()  # a kill while the links were made: the log was started over
    shutil.rmtree(place / "b/rootfs/data")
    again = run("d-pull", "--cache", cache, "--share", ref, place / "b", env=imports)
    assert again.returncode == 0 and not loaded_doit.search(again.stderr), again.stderr
    assert folder(place / "b") == made


def test_a_folder_holding_its_layers_keeps_its_rootfs_and_rw_changes_when_pulled_again_with_share(tool, registry):
    """config.json removed (to get the image's settings back) makes a folder incomplete, not unapplied: the same
    d-pull --share writes config.json again and leaves DIR/rootfs and a --rw run's changes as they were, for a shared
    folder (its overlay) and for a private one (its own files), as the pipeline's apply task does."""
    place, run = tool
    push(registry.host, "keep-work", "latest", BASE)
    ref, cache = f"{registry.host}/keep-work:latest", place / "cache"
    pull(run, cache, "--share", ref, place / "first")
    pull(run, cache, "--share", ref, place / "shared")
    pull(run, cache, ref, place / "private")
    for name in ("shared", "private"):
        folder = place / name
        assert run("d-run", "--rw", folder, "sh", "-c", "echo mine > /data/mywork").returncode == 0
        rootfs_before = snapshot(folder / "rootfs")
        (folder / "config.json").unlink()
        pull(run, cache, "--share", ref, folder)
        assert (folder / "config.json").exists() and snapshot(folder / "rootfs") == rootfs_before
        kept = run("d-run", folder, "cat", "/data/mywork")
        assert (kept.returncode, kept.stdout) == (0, "mine\n"), kept.stderr


def test_a_folder_made_without_doit_says_in_one_line_what_it_cannot_write(registry, tmp_path):
    push(registry.host, "unwritable", "latest", BASE)
    ref, cache, folder = f"{registry.host}/unwritable:latest", tmp_path / "cache", tmp_path / "b"
    for name in ("a", "b"):
        pull(subprocess_tool, cache, "--share", ref, tmp_path / name)
    record = json.loads((folder / "image.json").read_text())
    (folder / "image.json").write_text(json.dumps(record | {"complete": False}))
    (folder / ".d-pull/applied").unlink()  # as a kill while the links were made leaves it
    (folder / ".d-pull/shared").unlink()
    (folder / ".d-pull/shared").mkdir()  # what d-pull replaces with a link to the tree's anchor
    failed = subprocess_tool("d-pull", "--cache", cache, "--share", ref, folder)
    assert_one_line_error(failed, f"{folder}/.d-pull/shared: Is a directory")
    assert "Traceback" not in failed.stderr


def test_a_tree_killed_while_applied_is_resumed_to_the_clean_tree(tool, start, registry):
    place, run = tool
    push(registry.host, "killed", "latest", Image(layers=[busybox_layer(), random_files("a", 3000, 1 << 10)]))
    ref, cache = f"{registry.host}/killed:latest", place / "cache"
    pull(run, cache, ref, place / "clean")

    def applying(at_least: int) -> Callable[[], bool]:
        return lambda: any(len(os.listdir(a)) > at_least for a in cache.glob("trees/*/rootfs/a"))

    for moment in (applying(300), applying(1500)):
        assert kill_when(start("-q", "--cache", cache, "--share", ref, place / "app"), moment, timeout=60)
    pull(run, cache, "--share", ref, place / "app")
    (tree,) = trees(cache)
    clean = tree_without_folder_times(place / "clean" / "rootfs")
    assert tree_without_folder_times(tree / "rootfs") == clean == tree_without_folder_times(place / "app" / "rootfs")


def test_unshare_gives_a_folder_files_of_its_own(tool, registry):
    place, run = tool
    push(registry.host, "to-unshare", "latest", BASE)
    ref, cache = f"{registry.host}/to-unshare:latest", place / "cache"
    pull(run, cache, "--share", ref, place / "a")
    (tree,) = trees(cache)
    before = snapshot(place / "a" / "rootfs")
    done = run("d-pull", "--unshare", place / "a")
    assert done.returncode == 0, done.stderr
    assert snapshot(place / "a" / "rootfs") == before
    stored = (tree / "rootfs" / "data" / "file").stat()
    assert (place / "a" / "rootfs" / "data" / "file").stat().st_ino != stored.st_ino and stored.st_nlink == 2
    again = run("d-pull", "--unshare", place / "a")
    assert again.returncode == 1 and again.stderr.startswith("d-pull: error: ") and "shares no files" in again.stderr


def test_an_unshare_racing_another_or_a_run_has_one_winner_and_the_loser_says_why_in_one_line(tool, registry):
    """Two d-pull --unshare of one folder at once, and one against a d-run (read-only, or --rw, which writes into the
    folder's overlay): whichever order they run in, the store and a sibling stay as they were."""
    place, run = tool
    push(registry.host, "race", "latest", BASE)
    ref, cache = f"{registry.host}/race:latest", place / "cache"
    for name in ("twice", "ro", "rw", "sibling"):
        pull(run, cache, "--share", ref, place / name)
    (tree,) = trees(cache)
    store, sibling = snapshot(tree / "rootfs"), snapshot(place / "sibling" / "rootfs")
    unshare = ("d-pull", "--unshare")
    races = {
        "twice": [(*unshare, place / "twice")] * 2,
        "ro": [(*unshare, place / "ro"), ("d-run", place / "ro", "cat", "/data/file")],
        "rw": [(*unshare, place / "rw"), ("d-run", "--rw", place / "rw", "sh", "-c", "echo rw >> /data/file")],
    }
    with ThreadPoolExecutor(2) as pool:  # each run bounded by the tool's timeout
        done = {name: list(pool.map(lambda argv: run(*argv), argvs)) for name, argvs in races.items()}
    for name, argvs in races.items():
        for argv, ran in zip(argvs, done[name], strict=True):  # a loser: one line, why
            lost = ran.returncode == 1 and ran.stderr.count("\n") == 1 and f"{argv[0]}: error: " in ran.stderr
            lost = lost and any(why in ran.stderr for why in ("is in use", "another d-pull is writing", "shares no"))
            assert ran.returncode == 0 or lost, (argv, ran.stderr)
    assert sorted(ran.returncode for ran in done["twice"]) == [0, 1]
    unshared_ro, unshared_rw = done["ro"][0].returncode == 0, done["rw"][0].returncode == 0
    for name, copies in (("twice", 1), ("ro", unshared_ro), ("rw", unshared_rw)):  # a --rw run writes to an overlay
        assert "".join(ran.stderr for ran in done[name]).count("to make it private") == copies, name
    assert done["ro"][1].returncode != 0 or done["ro"][1].stdout == "content\n"
    for name, private in (("twice", True), ("ro", unshared_ro), ("rw", unshared_rw)):
        assert (place / name / ".d-pull" / "shared").exists() != private, name
        inodes = {(root / "rootfs/data/file").stat().st_ino for root in (place / name, tree)}
        assert (len(inodes) == 2) == private, name
    assert snapshot(tree / "rootfs") == store and snapshot(place / "sibling" / "rootfs") == sibling


def test_a_cache_on_another_filesystem_gives_a_copy_and_says_so(tool, registry):
    place, run = tool
    push(registry.host, "elsewhere", "latest", BASE)
    cache = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs, not the disk the folder is on
    try:
        shutil.chown(cache, place.owner(), place.group())
        done = pull(run, cache, "--share", f"{registry.host}/elsewhere:latest", place / "a")
        assert done.stderr.count("copying, not sharing") == 1
        assert not (place / "a" / ".d-pull" / "shared").exists()
        (tree,) = trees(cache)
        assert snapshot(place / "a" / "rootfs") == snapshot(tree / "rootfs")
    finally:
        shutil.rmtree(cache)


DODO = """\
from pathlib import Path
from dutils.pipeline import Options, Sandbox, sandbox_tasks

SANDBOXES = [Sandbox(f"sandboxes/{n}", "%(image)s", share=True) for n in range(3)]
DOIT_CONFIG = {"default_tasks": ["dutils"], "dep_file": "doit.json", "backend": "json", "par_type": "thread"}
globals().update(sandbox_tasks(SANDBOXES, Options(cache=Path("cache").absolute())))
"""


def test_sandboxes_sharing_an_image_are_made_from_one_application_of_its_layers(tool, registry):
    place, run = tool
    push(registry.host, "sandboxed", "latest", BASE)
    (place / "dodo.py").write_text(DODO % {"image": f"{registry.host}/sandboxed:latest"})
    done = run("doit", "-f", place / "dodo.py", "-n", "3", env={"HOME": str(place)})  # in dodo.py's folder
    assert done.returncode == 0, done.stderr
    (tree,) = trees(place / "cache")
    assert done.stdout.count("dutils-tree:") == 1, done.stdout
    assert sum("applied layer 1/" in line for line in done.stderr.splitlines()) == 1, done.stderr
    assert (tree / "anchor").stat().st_nlink == 4
    inodes = {(place / "sandboxes" / str(n) / "rootfs/data/file").stat().st_ino for n in range(3)}
    assert inodes == {(tree / "rootfs/data/file").stat().st_ino}


def test_a_hostile_image_claiming_another_s_layers_leaves_nothing_in_its_tree(tool, registry):
    """An image whose config claims the diff_ids of another's layers fails its last layer's check, after writing its
    files into the tree named by them: a later pull of the real image must not resume on top of them."""
    place, run = tool
    legit = Image(layers=[busybox_layer(), Tar().file("app/run", b"legit\n")])
    evil = Image(layers=[busybox_layer(), Tar().file("etc/ld.so.preload", b"/evil.so\n").file("app/backdoor")])
    evil.__dict__["config_blob"] = legit.config_blob  # the cached property: the legit image's diff_ids
    push(registry.host, "poison", "evil", evil)
    push(registry.host, "poison", "legit", legit)
    cache = place / "cache"
    failed = run("d-pull", "--cache", cache, "--share", f"{registry.host}/poison:evil", place / "evil")
    assert failed.returncode == 1 and "uncompressed content is" in failed.stderr, failed.stderr
    pull(run, cache, "--share", f"{registry.host}/poison:legit", place / "legit")
    pull(run, cache, f"{registry.host}/poison:legit", place / "private")
    for rootfs in [place / "legit" / "rootfs", *(tree / "rootfs" for tree in trees(cache))]:
        assert not (rootfs / "app" / "backdoor").exists() and not (rootfs / "etc" / "ld.so.preload").exists()
    same = tree_without_folder_times(place / "private" / "rootfs")
    assert tree_without_folder_times(place / "legit" / "rootfs") == same


def test_a_tree_cut_short_by_another_blob_is_applied_again_from_below(registry, tmp_path):
    """A kill -9 while a hostile layer is applied leaves its files and no failed check: only its blob may resume it."""
    legit = Image(layers=[busybox_layer(), Tar().file("app/run", b"legit\n")])
    evil = Image(layers=[busybox_layer(), random_files("evil", 3000, 1 << 10)])
    evil.__dict__["config_blob"] = legit.config_blob
    push(registry.host, "cut", "evil", evil)
    push(registry.host, "cut", "legit", legit)
    cache, started = tmp_path / "cache", time.monotonic()
    argv = [BIN / "d-pull", "-q", "--cache", cache, "--share", f"{registry.host}/cut:evil", tmp_path / "evil"]
    process = subprocess.Popen(argv)
    while process.poll() is None and time.monotonic() - started < 60:
        if any(len(os.listdir(folder)) > 300 for folder in cache.glob("trees/*/rootfs/evil")):
            break
        time.sleep(0.01)
    process.kill()
    assert process.wait(timeout=10) == -9
    pull(subprocess_tool, cache, "--share", f"{registry.host}/cut:legit", tmp_path / "legit")
    assert not (tmp_path / "legit" / "rootfs" / "evil").exists()


def test_the_store_is_private_whatever_the_umask(tool, registry):
    place, run = tool
    push(registry.host, "umask", "latest", BASE)
    ref, cache = f"{registry.host}/umask:latest", place / "cache"
    pull(run, cache, ref, place / "private")  # the cache, made under the default umask
    old = os.umask(0o002)  # inherited by the pull (as the ordinary user too: sudo keeps it)
    try:
        pull(run, cache, "--share", ref, place / "a")
    finally:
        os.umask(old)
    (tree,) = trees(cache)
    assert tree.stat().st_mode & 0o777 == 0o700 and (cache / "trees").stat().st_mode & 0o777 == 0o700
    pull(run, cache, "--share", ref, place / "b")  # the cache is still trusted


def test_files_others_could_write_in_place_are_not_shared(tool, registry):
    """Through a folder opened to others (0711), a file writable by group or others, or (a root pull's) owned by the
    image's uid 1000, a host user, would let them write into the store and every sibling: each folder has its own."""
    place, run = tool
    exposed = (
        Tar()
        .dir("x")
        .file("x/open", b"o", mode=0o666)
        .hardlink("x/open-link", "x/open")
        .file("x/group", b"g", mode=0o4775)
        .file("x/theirs", b"t", uid=1000, gid=1000)
        .file("x/mine", b"m")
        .fifo("x/fifo", mode=0o622)
        .fifo("x/pipe")  # root's, and written by no one else: one pipe between every folder's containers all the same
        .symlink("x/link", "open")
        .symlink("x/their-link", "open", uid=1000)  # they could change its times and group
        .dir("x/ro", 0o555)  # folders an ordinary user cannot write, or cannot list
        .file("x/ro/open", b"r", mode=0o666)
        .dir("x/wx", 0o333)
        .file("x/wx/open", b"w", mode=0o666)
    )
    push(registry.host, "exposed", "latest", Image(layers=[busybox_layer(), exposed]))
    ref, cache = f"{registry.host}/exposed:latest", place / "cache"
    for name in ("a", "b"):
        pull(run, cache, "--share", ref, place / name)
    (tree,) = trees(cache)
    assert snapshot(place / "a" / "rootfs") == snapshot(tree / "rootfs")  # modes, owners, times, folder times too

    def inode(root: Path, name: str) -> int:
        return (root / "rootfs" / "x" / name).lstat().st_ino

    as_root = place.stat().st_uid == 0
    listed = (tree / ".d-pull" / "unshared").read_bytes().split(b"\0")  # found once, for every folder of the tree
    assert {b"x/open", b"x/open-link", b"x/group", b"x/fifo", b"x/pipe", b"x/ro/open", b"x/wx/open"} <= set(listed)
    assert (b"x/theirs" in listed) == (b"x/their-link" in listed) == as_root
    assert b"x/mine" not in listed and b"x/link" not in listed
    private = [(name, False) for name in ("open", "group", "fifo", "pipe", "ro/open", "wx/open")]
    for name, shared in [
        *private,
        ("theirs", not as_root),
        ("their-link", not as_root),
        ("mine", True),
        ("link", True),
    ]:
        assert (inode(place / "a", name) == inode(tree, name)) == shared, name
        assert (inode(place / "a", name) == inode(place / "b", name)) == shared, name
    assert inode(place / "a", "open-link") == inode(place / "a", "open")
    assert (place / "a" / "rootfs" / "bin" / "sh").stat().st_ino == (tree / "rootfs" / "bin" / "sh").stat().st_ino


@pytest.fixture(scope="module")
def link_limit_images(registry) -> tuple[str, str]:
    """A base image with one file, and a hostile one over it with links to that file: pushed once for root and user.
    Its 64,997 link headers are written as raw ustar blocks (the Tar builder took seconds for them)."""
    base = Tar().dir("bin").file("bin/tool", b"#!/bin/sh\necho base\n", mode=0o755)
    links = [ustar_header(b"l/%d" % n, b"1", linkname=b"bin/tool") for n in range(64997)]
    # with the base's tree, its folder a and the hostile tree's own link: 65,000
    hostile = b"".join([ustar_header(b"l/", b"5", mode=0o755), *links, END])
    push(registry.host, "link-base", "latest", Image(layers=[base]))
    push(registry.host, "link-hostile", "latest", Image(layers=[base, hostile]))
    return f"{registry.host}/link-base:latest", f"{registry.host}/link-hostile:latest"


def test_a_file_at_the_filesystem_s_link_limit_is_copied_not_shared(tool, link_limit_images):
    """ext4 gives a file 65,000 links at most: a hostile image of links to a file of its base takes all those left,
    and folders of the base are then made by a copy, saying so, instead of failing."""
    place, run = tool
    base, hostile_image = link_limit_images
    cache = place / "cache"
    pull(run, cache, "--share", base, place / "a")
    hostile = pull(run, cache, "--share", hostile_image, place / "h")
    assert "too many hard links: copying, not sharing" in hostile.stderr
    done = pull(run, cache, "--share", base, place / "b")
    assert done.stderr.count("too many hard links: copying, not sharing") == 1
    assert (place / "b" / "rootfs" / "bin" / "tool").read_text() == "#!/bin/sh\necho base\n"
    assert not (place / "b" / ".d-pull" / "shared").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")
def test_unshare_says_in_one_line_what_it_cannot_remove(registry, tmp_path):
    """A copy cut short that cannot be removed (here made immutable) is one error line, not a traceback."""
    push(registry.host, "unremovable", "latest", BASE)
    pull(subprocess_tool, tmp_path / "cache", "--share", f"{registry.host}/unremovable:latest", tmp_path / "a")
    stuck = tmp_path / "a" / ".d-pull" / "making" / "stuck"
    stuck.parent.mkdir()
    stuck.write_bytes(b"")
    subprocess.run(["chattr", "+i", stuck], check=True)
    try:
        done = subprocess_tool("d-pull", "--unshare", tmp_path / "a")
    finally:
        subprocess.run(["chattr", "-i", stuck], check=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 2, done.stderr  # the note, then the error
    assert "d-pull: error: cannot make" in done.stderr and "Operation not permitted" in done.stderr
    assert (tmp_path / "a" / ".d-pull" / "shared").exists()


# Run as the image's uid, a host user: once DIR/rootfs holds the new image's marker, swap a folder of theirs in it for
# a link to root's folder argv[3], then say so; bounded in time.
SWAPPER = """import os, sys, time
marker, folder, target = sys.argv[1:4]
deadline = time.monotonic() + 90
while not os.path.exists(marker):
    if time.monotonic() > deadline:
        sys.exit("no marker")
    time.sleep(0.0005)
os.rename(folder, folder + ".old")
os.symlink(target, folder)
print("swapped", flush=True)
"""


def test_another_user_owning_a_folder_of_the_image_cannot_lead_the_making_of_a_shared_folder_elsewhere(
    registry, other_user
):
    """A root pull of an image with a folder of the image's uid, a host user's, in a DIR opened to others (0755): while
    d-pull --share makes DIR/rootfs anew (--update) and copies that user's files out of the store, the user swaps
    their folder for a link to a folder of root's. Nothing of root's may change: DIR/rootfs is made where no one
    else can enter. (Root only: an ordinary user's pull holds no other user's files.)"""
    import pwd

    uid = pwd.getpwnam(other_user).pw_uid
    names = [f"f{n:04}" for n in range(2000)]  # copied one by one: a window as long as an attacker could wish
    layer = Tar().dir("home").dir("home/them", uid=uid, gid=uid).dir("home/them/sub", uid=uid, gid=uid)
    for name in names:
        layer.file(f"home/them/sub/{name}", b"theirs\n", uid=uid, gid=uid)
    push(registry.host, "theirs", "v1", Image(layers=[busybox_layer(), layer]))
    push(registry.host, "theirs", "v2", Image(layers=[busybox_layer(), layer, Tar().file("home/them/v2", uid=uid)]))
    place = make_workspace()
    try:
        victim = place / "root-only"
        victim.mkdir(0o700)
        for name in names:
            (victim / name).write_bytes(b"root's\n")
        before = snapshot(victim)
        folder, ref = place / "app", f"{registry.host}/theirs"
        pull(subprocess_tool, place / "cache", "--share", f"{ref}:v1", folder)
        folder.chmod(0o755)  # opened to others, to run it
        them = folder / "rootfs" / "home" / "them"
        swap = [str(them / "v2"), str(them / "sub"), str(victim)]
        with subprocess.Popen(
            ["runuser", "-u", other_user, "--", "/usr/bin/python3", "-c", SWAPPER, *swap],
            stdout=subprocess.PIPE,
            text=True,
        ) as attacker:
            done = subprocess_tool("d-pull", "--cache", place / "cache", "--share", "--update", f"{ref}:v2", folder)
            said = attacker.communicate(timeout=120)[0]
        assert done.returncode == 0, done.stderr
        assert said == "swapped\n"  # the attack was made: on a complete DIR/rootfs, the user's folder to change
        assert snapshot(victim) == before
    finally:
        shutil.rmtree(place)


# Run as another user: in DIR/rootfs/tmp (the image's, mode 1777), make argv[2] folders and swap each, over and over,
# between itself and a link to root's folder argv[1], until argv[3] exists; bounded in time.
FLIPPER = """import os, sys, time
target, count, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names = [f"d{n}" for n in range(count)]
for name in names:
    os.mkdir(name)
    open(os.path.join(name, "mine"), "w").close()
    os.symlink(target, name + ".link")
print("ready", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    for name in names:
        os.rename(name, name + ".dir")
        os.rename(name + ".link", name)
        os.rename(name, name + ".link")
        os.rename(name + ".dir", name)
"""


def test_another_user_swapping_folders_in_the_image_s_tmp_cannot_lead_unshare_out_of_dir(registry, other_user):
    """A root pull's folder opened to others (0755): in the image's /tmp (1777), another user swaps folders of theirs
    for links to a folder of root's while d-pull --unshare copies DIR/rootfs. The copy never follows them: no file of
    root's reaches DIR. (Root only: an ordinary user's copy reads only what that user may read.)"""
    push(registry.host, "flipped", "latest", BASE)
    place = make_workspace()
    try:
        secret = place / "root-only"
        secret.mkdir(0o700)
        (secret / "secret").write_bytes(b"root's secret\n")
        (secret / "secret").chmod(0o644)  # kept from others by its folder alone
        folder, stop = place / "app", place / "stop"
        pull(subprocess_tool, place / "cache", "--share", f"{registry.host}/flipped:latest", folder)
        folder.chmod(0o755)
        tmp = folder / "rootfs" / "tmp"
        with subprocess.Popen(
            ["runuser", "-u", other_user, "--", "/usr/bin/python3", "-c", FLIPPER, str(secret), "200", str(stop)],
            cwd=tmp,
            stdout=subprocess.PIPE,
            text=True,
        ) as attacker:
            assert attacker.stdout.readline() == "ready\n"
            done = subprocess_tool("d-pull", "--unshare", folder)
            stop.touch()
            attacker.wait(timeout=60)
        found = subprocess.run(["grep", "-rl", "root's secret", folder], capture_output=True, text=True, timeout=60)
        assert found.stdout == "", found.stdout  # nothing of root's was copied into DIR
        # made private, or refused in one line (after the note) where cp met a link: never a traceback
        assert done.returncode == 0 or (done.stderr.count("\n") == 2 and "d-pull: error: " in done.stderr), done.stderr
    finally:
        shutil.rmtree(place)


@pytest.mark.skipif(os.geteuid() != 0, reason="the mount is root's")
def test_a_folder_others_can_change_is_walked_on_a_mount_that_follows_no_link(tmp_path):
    """What keeps root's cp in DIR whatever the race above does: through the folder's own mount, no link leads out."""
    (tmp_path / "root-only").mkdir(0o700)
    (tmp_path / "root-only" / "secret").write_text("s")
    folder = tmp_path / "rootfs"
    folder.mkdir()
    (folder / "tmp").symlink_to(tmp_path / "root-only")
    read = ["cat", str(folder / "tmp" / "secret")]
    assert subprocess.run(read, capture_output=True, timeout=30).returncode == 0
    done = subprocess.run(following_no_link(folder, read), capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "Too many levels of symbolic links" in done.stderr, done.stderr
    assert subprocess.run(following_no_link(folder, ["readlink", str(folder / "tmp")]), timeout=30).returncode == 0
