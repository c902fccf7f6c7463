"""Attacks by another user of the machine on a victim's blob cache and pull folder, set up as that user would have
(files owned by `nobody`, left while a folder was writable to them), against d-pull run as root and as the
ordinary user. Each ends in one line saying what to fix; stand-ins for the host's home and /etc, outside DIR and the
cache, stay byte-for-byte unchanged; nothing of the attacker's reaches DIR."""

import gzip
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli import BIN, assert_one_line_error
from images import Tar
from trees import snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root"),
]
ATTACKER = pwd.getpwnam("nobody").pw_uid
PULL_TIMEOUT = 60
PEAK_RSS = 150_000  # KiB


@dataclass
class Victim:
    """Who pulls: root, or the ordinary user; `base` is a folder of theirs holding cache/, the pull folders and
    host/ (the stand-in for their home and /etc, which the attacker aims at)."""

    base: Path
    uid: int
    bin: str  # where d-pull and d-cache are, for `command`
    command: Callable[..., subprocess.CompletedProcess]

    def d_pull(self, image: str, folder: str, *flags: str) -> subprocess.CompletedProcess:
        return self.measured("d-pull", *flags, "--cache", str(self.base / "cache"), image, str(self.base / folder))

    def d_cache(self, *args: str) -> subprocess.CompletedProcess:
        return self.measured("d-cache", "--cache", str(self.base / "cache"), *args)

    def measured(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """Run it, and check its peak memory (GNU time's %M: the exec'd program's own, unlike a forked child's)."""
        peak = self.base / "peak-rss"
        argv = ["/usr/bin/time", "-o", str(peak), "-f", "%M", self.bin + program, *args]
        done = self.command(argv, capture_output=True, text=True, timeout=PULL_TIMEOUT)
        assert int(peak.read_text().split()[-1]) < PEAK_RSS
        return done

    def make(self, path: Path, data: bytes = b"") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chown(path, self.uid, -1)
        return path


@pytest.fixture(params=["root", "user"])
def victim(request, tmp_path: Path) -> Iterator[Victim]:
    if request.param == "root":
        yield Victim(tmp_path, 0, f"{BIN}/", subprocess.run)
        return
    user = request.getfixturevalue("unprivileged")
    base = Path(tempfile.mkdtemp(prefix="d-utils-victim-"))
    try:
        base.chmod(0o755)
        uid = pwd.getpwnam("dutest").pw_uid
        os.chown(base, uid, -1)
        yield Victim(base, uid, "", user.run)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pulled(victim: Victim, images) -> Victim:
    """The victim's cache after one good pull, and their home and /etc stand-ins."""
    done = victim.d_pull(images["busybox"], "first")
    assert done.returncode == 0, done.stderr
    victim.make(victim.base / "host" / "home" / ".ssh" / "authorized_keys", b"ssh-ed25519 AAAA victim\n")
    victim.make(victim.base / "host" / "etc" / "passwd", b"root:x:0:0::/root:/bin/sh\n")
    return victim


def blobs(victim: Victim) -> Path:
    return victim.base / "cache" / "blobs" / "sha256"


def as_attacker(*paths: Path) -> None:
    for path in paths:
        os.lchown(path, ATTACKER, ATTACKER)


def host(victim: Victim) -> dict:
    return snapshot(victim.base / "host")


def layer_digests(victim: Victim, folder: str = "first") -> list[str]:
    """The blobs a pull of the busybox image uses (its record names the manifest, the cache holds the rest)."""
    return [p.name for p in blobs(victim).iterdir() if len(p.name) == 64]


# -- a cache that is not the user's alone


def test_a_cache_others_can_write_is_refused_naming_the_fix(pulled: Victim, images):
    (pulled.base / "cache").chmod(0o777)  # a cache on a shared disk, or made under a careless umask
    done = pulled.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", "writable by other users", "chmod go-w")
    assert not (pulled.base / "second").exists()


def test_a_cache_folder_another_user_made_is_refused(victim: Victim, images):
    cache = victim.base / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    as_attacker(cache)  # made first by the attacker, writable to the victim so that the victim would use it
    done = victim.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", f"belongs to user {ATTACKER}")
    assert list(cache.iterdir()) == []


def test_a_cache_link_another_user_made_is_refused(pulled: Victim, images):
    """The attacker makes the cache path the victim uses a link to a folder of the victim's (their home)."""
    shutil.rmtree(pulled.base / "cache")
    (pulled.base / "cache").symlink_to(pulled.base / "host" / "home")
    as_attacker(pulled.base / "cache")
    before = host(pulled)
    assert_one_line_error(pulled.d_pull(images["busybox"], "second"), "refusing the cache", "is a symbolic link")
    assert host(pulled) == before


def test_a_blob_planted_under_its_digest_name_is_never_used(pulled: Victim, images):
    evil = gzip.compress(Tar().file("bin/sh", b"#!/bin/sh\necho pwned\n", mode=0o755).to_bytes())
    for name in layer_digests(pulled):  # every blob of the image replaced by the attacker's bytes
        (blobs(pulled) / name).unlink()
        as_attacker(pulled.make(blobs(pulled) / name, evil))
    done = pulled.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", "belongs to user")
    assert not (pulled.base / "second" / "rootfs").exists()


def test_a_blob_hard_linked_to_a_file_of_the_victims_is_refused(pulled: Victim, images):
    """Where hard links to others' files are allowed (fs.protected_hardlinks=0), the attacker links the victim's
    authorized_keys under a digest's name: d-pull must not take it for a blob, nor touch it."""
    keys = pulled.base / "host" / "home" / ".ssh" / "authorized_keys"
    blob = blobs(pulled) / layer_digests(pulled)[0]
    blob.unlink()
    os.link(keys, blob)
    before = host(pulled)
    done = pulled.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", blob.name, "hard links")
    assert host(pulled) == before


def test_a_blob_others_can_write_is_refused(pulled: Victim, images):
    blob = blobs(pulled) / layer_digests(pulled)[0]
    blob.chmod(0o666)  # anyone could have rewritten it since it was verified
    done = pulled.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", blob.name, "chmod go-w")


# -- links and special files planted in the cache


@pytest.mark.parametrize("planted", ["lock", "pruned", "blob.lock", "blob.partial"])
def test_a_link_planted_in_the_cache_is_refused_and_its_target_untouched(pulled: Victim, images, planted: str):
    target = pulled.base / "host" / "etc" / "passwd"
    blob = layer_digests(pulled)[0]
    path = {
        "lock": pulled.base / "cache" / "lock",
        "pruned": pulled.base / "cache" / "pruned",
        "blob.lock": blobs(pulled) / f"{blob}.lock",
        "blob.partial": blobs(pulled) / f"{blob}.partial",
    }[planted]
    path.unlink(missing_ok=True)
    if planted.startswith("blob"):
        (blobs(pulled) / blob).unlink()  # so that the pull needs it again
    path.symlink_to(target)
    as_attacker(path)
    before = host(pulled)
    done = pulled.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", path.name)
    assert host(pulled) == before


def test_a_fifo_planted_as_a_partial_download_is_refused_at_once(pulled: Victim, images):
    blob = layer_digests(pulled)[0]
    (blobs(pulled) / blob).unlink()
    os.mkfifo(blobs(pulled) / f"{blob}.partial")
    os.chown(blobs(pulled) / f"{blob}.partial", pulled.uid, -1)  # even the victim's own: it would block a read
    started = time.monotonic()
    done = pulled.d_pull(images["busybox"], "second")
    assert_one_line_error(done, "refusing the cache", "not a regular file")
    assert time.monotonic() - started < 30


def test_d_cache_refuses_a_planted_lock_link_too(pulled: Victim):
    target = pulled.base / "host" / "etc" / "shadow"  # does not exist: following the link would create it
    (pulled.base / "cache" / "lock").unlink()
    (pulled.base / "cache" / "lock").symlink_to(target)
    done = pulled.d_cache("prune", "--all")
    assert_one_line_error(done, "refusing the cache", "lock", program="d-cache")
    assert not target.exists() and layer_digests(pulled)


# -- the pull folder's own state


@pytest.mark.parametrize("name", [".d-pull", "rootfs"])
def test_a_link_in_place_of_the_pull_state_or_rootfs_is_refused(pulled: Victim, images, name: str):
    """After a first pull into a folder others could write (a shared project folder, say), one of them swaps the
    pull's state or rootfs for a link to the victim's home: the next pull must not write there."""
    folder = pulled.base / "first"
    shutil.rmtree(folder / name)
    (folder / name).symlink_to(pulled.base / "host" / "home")
    as_attacker(folder / name)
    before = host(pulled)
    for flags in ([], ["--update"]):
        assert_one_line_error(pulled.d_pull(images["busybox"], "first", *flags), name, "symbolic link")
    assert host(pulled) == before
