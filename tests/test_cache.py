"""The blob cache's lifecycle: d-cache list/prune, pruning by age after a pull, never under a running pull."""

import fcntl
import os
import select
import subprocess
import time
from pathlib import Path

import pytest
from cli import BIN, d_pull

pytestmark = pytest.mark.integration  # a registry, and d-run's bwrap
DAY = 86400


def d_cache(cache: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "d-cache", "--cache", str(cache), *args], capture_output=True, text=True, timeout=timeout
    )


def blobs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blobs" / "sha256").iterdir() if len(p.name) == 64)


def age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def test_list_shows_every_blob_with_its_size(images, tmp_path: Path):
    cache = tmp_path / "cache"
    assert d_pull(images["busybox"], str(tmp_path / "a"), cache=cache).returncode == 0
    listed = d_cache(cache, "list")
    assert listed.returncode == 0
    for blob in blobs(cache):
        assert blob.name in listed.stdout
    assert f"{len(list((cache / 'blobs' / 'sha256').iterdir()))} entries" in listed.stdout


def test_prune_by_age_keeps_what_was_used_recently(images, tmp_path: Path):
    cache = tmp_path / "cache"
    assert d_pull(images["busybox"], str(tmp_path / "a"), cache=cache).returncode == 0
    old, *recent = blobs(cache)
    age(old, 10)
    done = d_cache(cache, "prune", "--days", "5")
    assert done.returncode == 0 and "removed 1 entries" in done.stdout
    assert blobs(cache) == recent
    assert d_cache(cache, "prune", "--all").returncode == 0
    assert blobs(cache) == []
    assert (tmp_path / "a" / "rootfs" / "bin" / "busybox").exists()  # pulled folders never depend on the cache


def test_a_pull_prunes_entries_unused_for_30_days(images, tmp_path: Path):
    cache = tmp_path / "cache"
    assert d_pull(images["busybox"], str(tmp_path / "a"), cache=cache).returncode == 0
    stale = cache / "blobs" / "sha256" / ("0" * 64)
    stale.write_bytes(b"left by a pull long ago")
    age(stale, 31)
    (cache / "pruned").unlink()  # pruning happens at most daily: make it due
    assert d_pull(images["busybox-plain"], str(tmp_path / "b"), cache=cache).returncode == 0
    assert not stale.exists()
    assert len(blobs(cache)) >= 3  # what the pulls use stays


def test_prune_waits_for_running_pulls(images, tmp_path: Path):
    cache = tmp_path / "cache"
    assert d_pull(images["busybox"], str(tmp_path / "a"), cache=cache).returncode == 0
    with open(cache / "lock", "a+b") as pull_share:
        fcntl.flock(pull_share, fcntl.LOCK_SH)  # what every running d-pull holds
        command = [BIN / "d-cache", "--cache", str(cache), "prune", "--all"]
        pruning = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert select.select([pruning.stderr], [], [], 30)[0], "d-cache waits without a word"
        said = pruning.stderr.readline()  # said before it waits: no timing to guess
        assert said == f"d-cache: waiting for the pulls using {cache} to finish\n"
        assert pruning.poll() is None and blobs(cache)  # waiting, nothing removed under the pull
    assert pruning.wait(timeout=30) == 0
    assert blobs(cache) == []


def test_listing_a_cache_that_does_not_exist_creates_nothing(tmp_path: Path):
    listed = d_cache(tmp_path / "none" / "cache", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("0 entries"), listed
    assert list(tmp_path.iterdir()) == []
