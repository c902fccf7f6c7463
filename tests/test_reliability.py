"""Reliability: concurrent pulls, kills at random moments, updates that keep the user's work, bad input.

Each test pushes images of its own (random content, so digests are new) to count exactly what the registry serves.
"""

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli import assert_one_line_error, d_pull, d_run, start_d_pull
from httpd import Handler, LoopbackServer
from images import Image, Tar, busybox_layer, push, push_blob, push_manifest, random_files, sha256
from registry_server import Registry
from trees import snapshot, tree_without_folder_times

PULL_TIMEOUT = 120


@pytest.fixture
def fresh() -> Registry:
    with Registry() as registry:
        yield registry


def image_with(*uppers: Tar, config: dict | None = None) -> Image:
    return Image(layers=[busybox_layer(), *uppers], config=config or {"Cmd": ["sh"]})


def served_once_each(registry: Registry, *images: Image) -> bool:
    return all(registry.blob_gets(digest) == 1 for image in images for digest in image.blobs())


@pytest.mark.integration  # a registry of its own
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
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running d-pull holds it, before it marks the folder incomplete
        done = d_pull("--update", images["busybox"], str(folder), cache=tmp_path / "cache")
        # a no-op writes nothing: the folder is complete until the holder marks it otherwise (Pull.resolve)
        no_op = d_pull(images["busybox"], str(folder), cache=tmp_path / "cache")
    assert_one_line_error(done, "another d-pull is writing", str(folder))
    assert no_op.returncode == 0 and no_op.stderr.startswith("up to date: "), no_op.stderr
    assert snapshot(folder) == before


@pytest.mark.integration  # a registry of its own
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
    assert tree_without_folder_times(tmp_path / "killed" / "rootfs") == tree_without_folder_times(
        tmp_path / "clean" / "rootfs"
    )
    assert_only_verified_blobs(tmp_path / "cache")


def user_visible(folder: Path) -> dict:
    """Everything in a pull folder but the pull's own state (doit's database, locks)."""
    entries, _ = snapshot(folder)
    return {path: entry for path, entry in entries.items() if path != "." and not path.startswith(".d-pull")}


def assert_only_verified_blobs(cache: Path) -> None:
    # a kill during an atomic write may leave its hidden temporary file: never taken for a blob, pruned with age
    for path in (p for p in (cache / "blobs" / "sha256").iterdir() if not p.name.startswith(".")):
        assert not path.name.endswith((".partial", ".lock")), f"left behind: {path.name}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


@pytest.mark.integration  # a registry of its own
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


# -- bad input and faults: one line, status 1, nothing the user had is changed


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a full disk on demand (needs root, as CI has)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def pushed_large(registry: Registry) -> str:
    push(registry.host, "large", "latest", image_with(random_files("data", 1, 4 << 20)))
    return f"{registry.host}/large:latest"


@pytest.mark.integration  # a registry of its own
def test_disk_full_while_fetching_says_how_much_is_needed(fresh: Registry, small_disk: Path, tmp_path: Path):
    (small_disk / "mine.txt").write_text("kept")
    done = d_pull(pushed_large(fresh), str(tmp_path / "app"), cache=small_disk / "cache")
    assert_one_line_error(done, "disk full", "more bytes are needed")
    assert (small_disk / "mine.txt").read_text() == "kept"


@pytest.mark.integration  # a registry of its own
def test_disk_full_while_applying_says_how_much_is_needed(fresh: Registry, small_disk: Path, tmp_path: Path):
    done = d_pull(pushed_large(fresh), str(small_disk / "app"), cache=tmp_path / "cache")
    assert_one_line_error(done, "disk full", "unpacks to")
    assert not (small_disk / "app" / "config.json").exists()
    assert_one_line_error(d_run(small_disk / "app", "true"), "incomplete", "d-pull", program="d-run")


def test_read_only_cache_is_a_clear_error(images, tmp_path: Path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0755", "tmpfs", str(read_only)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert_one_line_error(d_pull(images["busybox"], str(tmp_path / "a"), cache=read_only), "cache folder")
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=True)
    assert not (tmp_path / "a").exists()


def test_missing_cache_folder_is_made(images, tmp_path: Path):
    assert d_pull(images["busybox"], str(tmp_path / "a"), cache=tmp_path / "new" / "cache").returncode == 0


def test_folder_the_user_cannot_write_is_a_clear_error(images, unprivileged, tmp_path: Path):
    done = unprivileged.tool("d-pull", "--cache", "cache", images["busybox"], "/root/not-mine", timeout=60)
    assert_one_line_error(done, "cannot use /root/not-mine", "Permission denied")


@pytest.mark.integration  # a registry of its own
def test_corrupt_layer_is_a_clear_error_and_the_next_pull_of_good_layers_works(fresh: Registry, tmp_path: Path):
    good = image_with(Tar().file("etc/ok", b"ok\n"))
    broken = json.loads(good.manifest)
    garbage = b"\x1f\x8b\x08\x00" + os.urandom(4000)  # a gzip header, then noise
    push_blob(fresh.host, "broken", garbage)
    for blob in good.blobs().values():
        push_blob(fresh.host, "broken", blob)
    broken["layers"][1] |= {"digest": sha256(garbage), "size": len(garbage)}
    push_manifest(fresh.host, "broken", "latest", json.dumps(broken).encode())
    done = d_pull(f"{fresh.host}/broken:latest", str(tmp_path / "b"), cache=tmp_path / "cache")
    assert_one_line_error(done, "corrupt gzip data", sha256(garbage))


class HostileRegistry(LoopbackServer):
    """A registry that answers manifest requests with whatever a test sets: bad JSON, odd types, wrong bytes."""

    manifest = (b"", "")

    class handler(Handler):  # noqa: N801 - LoopbackServer's attribute name
        def do_GET(self) -> None:
            body, media_type = self.owner.manifest if "/manifests/" in self.path else (b"{}", "application/json")
            self.answer(200, body, {"Content-Type": media_type})


@pytest.fixture
def hostile():
    with HostileRegistry() as server:
        yield server


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize(
    ("body", "media_type", "says"),
    [
        (b"<html>hello</html>", "text/html", "not JSON"),
        (b'{"schemaVersion": 2, "mediaType": "application/x-other"}', "application/x-other", "unsupported media type"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "application/json", "schema 1"),
        (b'{"schemaVersion": 2, "layers": "nope", "config": 1}', OCI_MANIFEST, "config is not a JSON object"),
    ],
)
def test_bad_manifests_are_clear_errors(hostile: HostileRegistry, tmp_path: Path, body, media_type, says):
    hostile.manifest = (body, media_type)
    done = d_pull(f"{hostile.host}/app:1", str(tmp_path / "a"), cache=tmp_path / "cache")
    assert_one_line_error(done, says)
    assert not (tmp_path / "a").exists()


def test_manifest_that_does_not_match_its_digest_is_refused(hostile: HostileRegistry, tmp_path: Path):
    hostile.manifest = (image_with().manifest, OCI_MANIFEST)
    wrong = "sha256:" + "1" * 64
    done = d_pull(f"{hostile.host}/app@{wrong}", str(tmp_path / "a"), cache=tmp_path / "cache")
    assert_one_line_error(done, "does not match digest", wrong)
    assert not (tmp_path / "cache" / "blobs" / "sha256" / ("1" * 64)).exists()


def test_d_run_on_a_damaged_config_names_it(images, tmp_path: Path):
    assert d_pull(images["busybox"], str(tmp_path / "a"), cache=tmp_path / "cache").returncode == 0
    (tmp_path / "a" / "config.json").write_text('{"Cmd": ["sh"')
    assert_one_line_error(d_run(tmp_path / "a", "true"), "config.json", program="d-run")
    assert (tmp_path / "a" / "config.json").read_text() == '{"Cmd": ["sh"'
