"""Reliability: concurrent pulls, kills at random moments, updates that keep the user's work, bad input.

Each test pushes images of its own (random content, so digests are new) to count exactly what the registry serves.
"""

import fcntl
import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from cli import assert_one_line_error, d_pull, d_run, start_d_pull
from images import Image, Tar, busybox_layer, push
from registry import Registry
from test_apply import snapshot

PULL_TIMEOUT = 120


@pytest.fixture
def fresh() -> Registry:
    with Registry() as registry:
        yield registry


def image_with(*uppers: Tar, config: dict | None = None) -> Image:
    return Image(layers=[busybox_layer(), *uppers], config=config or {"Cmd": ["sh"]})


def random_files(prefix: str, count: int, size: int) -> Tar:
    tar = Tar()
    for n in range(count):
        tar.file(f"{prefix}/{n}", os.urandom(size))
    return tar


def served_once_each(registry: Registry, *images: Image) -> bool:
    return all(registry.blob_gets(digest) == 1 for image in images for digest in image.blobs())


def test_concurrent_pulls_of_overlapping_images_share_one_download(fresh: Registry, tmp_path: Path):
    images = [image_with(random_files(f"data{n}", 4, 256 << 10).file("etc/which", f"{n}\n".encode())) for n in range(3)]
    refs = []
    for n, image in enumerate(images):
        push(fresh.host, f"app{n}", "latest", image)
        refs.append(f"{fresh.host}/app{n}:latest")
    cache = tmp_path / "cache"
    pulls = [start_d_pull(refs[n % 3], str(tmp_path / f"dir{n}"), cache=cache) for n in range(8)]
    for process in pulls:
        _, err = process.communicate(timeout=PULL_TIMEOUT)
        assert process.returncode == 0, err
    for n in range(8):
        assert (tmp_path / f"dir{n}" / "rootfs" / "etc" / "which").read_text() == f"{n % 3}\n"
        assert d_run(tmp_path / f"dir{n}", "cat", "/etc/which").stdout == f"{n % 3}\n"
    assert served_once_each(fresh, *images)


def test_a_second_pull_into_the_same_folder_refuses_clearly(images, tmp_path: Path):
    folder = tmp_path / "bb"
    assert d_pull(images["busybox"], str(folder), cache=tmp_path / "cache").returncode == 0
    before = snapshot(folder)
    with open(folder / ".d-pull" / "lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running d-pull holds it
        done = d_pull(images["busybox"], str(folder), cache=tmp_path / "cache")
    assert_one_line_error(done, "another d-pull is writing", str(folder))
    assert snapshot(folder) == before


def test_pulls_killed_at_random_moments_end_in_the_clean_tree(fresh: Registry, tmp_path: Path):
    image = image_with(random_files("a", 8, 1 << 20), random_files("b", 200, 4 << 10), random_files("c", 4, 2 << 20))
    push(fresh.host, "big", "latest", image)
    ref = f"{fresh.host}/big:latest"
    started = time.monotonic()
    assert d_pull(ref, str(tmp_path / "clean"), cache=tmp_path / "clean-cache").returncode == 0
    duration = time.monotonic() - started
    rng = random.Random(1234)
    for _ in range(20):  # bounded: 20 kills, each within about one clean pull's time
        process = start_d_pull(ref, str(tmp_path / "killed"), cache=tmp_path / "cache")
        time.sleep(rng.uniform(0, duration * 1.1))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=PULL_TIMEOUT)
    final = d_pull(ref, str(tmp_path / "killed"), cache=tmp_path / "cache")
    assert final.returncode == 0, final.stderr
    assert tree(tmp_path / "killed" / "rootfs") == tree(tmp_path / "clean" / "rootfs")
    assert_only_verified_blobs(tmp_path / "cache")


def tree(root: Path) -> tuple[dict, set]:
    """The snapshot, but for the times of folders the layers do not list (made when first needed)."""
    entries, links = snapshot(root)
    return {path: entry.mtime_ns if entry.kind != "d" else None for path, entry in entries.items()}, links


def user_visible(folder: Path) -> dict:
    """Everything in a pull folder but the pull's own state (doit's database, locks)."""
    entries, _ = snapshot(folder)
    return {path: entry for path, entry in entries.items() if path != "." and not path.startswith(".d-pull")}


def assert_only_verified_blobs(cache: Path) -> None:
    for path in (cache / "blobs" / "sha256").iterdir():
        assert not path.name.endswith(".partial"), f"left behind: {path.name}"
        if not path.name.endswith(".lock"):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_update_keeps_user_edits_and_volumes_and_fetches_only_new_layers(fresh: Registry, tmp_path: Path):
    ref = f"{fresh.host}/app:stable"
    old = image_with(Tar().file("etc/version", b"1\n"), config={"Cmd": ["sh"], "Env": ["A=1"]})
    new = image_with(Tar().file("etc/version", b"2\n"), config={"Cmd": ["sh"], "Env": ["A=2"]})
    push(fresh.host, "app", "stable", old)
    folder, cache = tmp_path / "app", tmp_path / "cache"
    assert d_pull(ref, str(folder), cache=cache).returncode == 0
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"Cmd": ["echo", "mine"]}))
    (folder / "volumes" / "data").mkdir(parents=True)
    (folder / "volumes" / "data" / "keep.txt").write_text("user data")

    push(fresh.host, "app", "stable", new)
    before = user_visible(folder)
    refused = d_pull(ref, str(folder), cache=cache)
    assert_one_line_error(refused, "--update", new.manifest_digest[:19])
    assert user_visible(folder) == before  # nothing changes unless asked

    updated = d_pull("--update", ref, str(folder), cache=cache)
    assert updated.returncode == 0, updated.stderr
    assert (folder / "rootfs" / "etc" / "version").read_text() == "2\n"
    config = json.loads((folder / "config.json").read_text())
    assert config["Cmd"] == ["echo", "mine"] and config["Env"] == ["A=2"]
    assert (folder / "volumes" / "data" / "keep.txt").read_text() == "user data"
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o644  # the umask's, not a temporary file's
    base = new.blobs().keys() & old.blobs().keys()
    assert base and all(fresh.blob_gets(digest) == 1 for digest in base)
    assert d_run(folder).stdout == "mine\n"
