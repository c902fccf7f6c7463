"""Pulls over a bad connection: cut, reset, corrupted, throttled and killed pulls all end in the clean tree,
with no byte downloaded twice and no corrupt byte kept. A fault-injecting proxy sits between d-pull and a real
registry on loopback."""

import contextlib
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli import BIN, assert_one_line_error, d_pull, start_d_pull
from faultproxy import FaultProxy
from images import Image, busybox_layer, push, random_files
from registry_server import Registry
from trees import tree_without_folder_times

pytestmark = pytest.mark.integration  # a registry of its own

PULL_TIMEOUT = 120
SLACK = 64 << 10  # what a resumed download may fetch twice, over all its interruptions
POLL = 0.01


@pytest.fixture(scope="module")
def origin():
    """A registry with one three-layer image of random data (new digests: exact counts)."""
    image = Image(
        layers=[busybox_layer(), random_files("a", 3, 1 << 20), random_files("b", 3000, 1 << 10)],
        config={"Cmd": ["sh"]},
    )
    with Registry() as registry:
        push(registry.host, "app", "latest", image)
        yield registry, image


@pytest.fixture
def proxy(origin):
    registry, _ = origin
    with FaultProxy(registry.url) as started:
        yield started


@pytest.fixture(scope="module")
def clean_tree(origin, tmp_path_factory):
    registry, _ = origin
    base = tmp_path_factory.mktemp("clean")
    assert d_pull(f"{registry.host}/app:latest", str(base / "app"), cache=base / "cache").returncode == 0
    return tree_without_folder_times(base / "app" / "rootfs")


def blob_sizes(image: Image) -> dict[str, int]:
    return {digest: len(data) for digest, data in image.blobs().items()}


def test_connections_cut_in_every_blob_resume_without_fetching_twice(origin, proxy, clean_tree, tmp_path):
    _, image = origin
    for digest, size in blob_sizes(image).items():
        for _ in range(3):  # cut at 1/4, 1/2 and 3/4: each resumed request is cut a quarter further on
            proxy.cut(digest, after=max(size // 4, 1))
    done = d_pull(f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "connection closed early" in done.stderr or "IncompleteRead" in done.stderr or "retrying" in done.stderr
    for digest, size in blob_sizes(image).items():
        assert size <= proxy.served_bytes(digest) <= size + SLACK, digest
    assert tree_without_folder_times(tmp_path / "app" / "rootfs") == clean_tree


def test_reset_connections_and_server_errors_are_retried(origin, proxy, clean_tree, tmp_path):
    _, image = origin
    layer = list(image.blobs())[-1]
    proxy.reset("/manifests/")  # before any answer
    proxy.reset(layer, after=100_000)
    proxy.fail(503, times=2, match="/blobs/", retry_after="0")
    proxy.fail(429, match="/blobs/", retry_after="1")
    done = d_pull(f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "HTTP 503" in done.stderr and "HTTP 429" in done.stderr
    assert tree_without_folder_times(tmp_path / "app" / "rootfs") == clean_tree


def test_a_server_that_ignores_range_is_handled(origin, proxy, clean_tree, tmp_path):
    _, image = origin
    layer, size = max(blob_sizes(image).items(), key=lambda item: item[1])
    proxy.cut(layer, after=size // 2)
    proxy.ignore_range(layer)  # the resumed request gets 200 and the whole blob again
    done = d_pull(f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert proxy.served_bytes(layer) <= size + size // 2 + SLACK
    assert tree_without_folder_times(tmp_path / "app" / "rootfs") == clean_tree


def test_a_corrupted_blob_is_an_error_and_never_kept(origin, proxy, tmp_path):
    _, image = origin
    layer = list(image.blobs())[-1]
    proxy.corrupt(layer, offset=1000)
    cache = tmp_path / "cache"
    done = d_pull(f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=cache)
    assert_one_line_error(done, layer, proxy.host, "does not match its digest")
    hexdigest = layer.removeprefix("sha256:")
    assert not [
        p for p in (cache / "blobs" / "sha256").iterdir() if p.name.startswith(hexdigest) and "lock" not in p.name
    ]
    again = d_pull(f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=cache)  # the fault was one-off
    assert again.returncode == 0, again.stderr


def test_retries_are_bounded_and_say_what_failed(proxy, tmp_path):
    proxy.fail(503, times=50, match="/manifests/", retry_after="0")
    done = d_pull(f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=tmp_path / "cache")
    assert_one_line_error(done, "giving up", "HTTP 503", "attempts")
    assert proxy.hits("/manifests/") < 10


def test_a_long_retry_after_is_not_waited_out_silently(proxy, tmp_path):
    proxy.fail(429, match="/manifests/", retry_after="300")
    command = [BIN / "d-pull", "--cache", str(tmp_path / "cache"), f"{proxy.host}/app:latest", str(tmp_path / "app")]
    command[1:1] = ["--timeout", "600"]  # a wait longer than what is left of --timeout gives up at once instead
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line_with(process, "300 s", timeout=20)
    finally:
        process.kill()
        process.communicate(timeout=10)
    assert "429" in line and "asked us to wait" in line


def read_line_with(process: subprocess.Popen, text: str, timeout: float) -> str:
    """The first line of stderr holding `text`, waiting at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], deadline - time.monotonic())
        line = process.stderr.readline() if ready else ""
        if text in line:
            return line
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"no line with {text!r} within {timeout} s")


def kill_when(process: subprocess.Popen, ready, timeout: float = 30) -> bool:
    """SIGKILL the pull as soon as `ready()` holds (checked every few ms, for at most `timeout` seconds), and its
    process group when it leads one (runuser's child, d-pull as the ordinary user); whether it was caught at that
    moment, still running."""
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL)
    caught = process.poll() is None and ready()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL) if os.getpgid(process.pid) == process.pid else process.kill()
    process.communicate(timeout=10)
    return caught


def partial_size(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "blobs" / "sha256").glob("*.partial")) if cache.exists() else 0


def applied(folder: Path) -> int:
    try:  # one digest a line, appended as each layer is applied
        return len((folder / ".d-pull" / "applied").read_text().split())
    except FileNotFoundError:
        return 0


def files_in(folder: Path) -> int:
    """How many entries a flat folder holds: a listing, cheap enough to poll every few ms."""
    try:
        return len(os.listdir(folder))
    except FileNotFoundError:
        return 0


def test_kill_9_during_fetch_and_apply_then_the_same_command_gives_the_clean_tree(origin, proxy, clean_tree, tmp_path):
    _, image = origin
    folder, cache = tmp_path / "app", tmp_path / "cache"
    rootfs = folder / "rootfs"
    for digest in image.blobs():
        proxy.trickle(digest, chunk=64 << 10, delay=0.005, times=10)  # slow enough to be caught mid-blob
    moments = {
        "fetching, a little": lambda: partial_size(cache) > 100_000,
        "fetching, more": lambda: partial_size(cache) > 600_000,
        "fetching, again": lambda: partial_size(cache) > 200_000,
        "applying the last layer": lambda: applied(folder) == 2 and files_in(rootfs / "b") > 300,
        "applying it further": lambda: applied(folder) == 2 and files_in(rootfs / "b") > 1200,
        "applying it nearly all": lambda: applied(folder) == 2 and files_in(rootfs / "b") > 2400,
    }
    caught = {
        moment: kill_when(start_d_pull(f"{proxy.host}/app:latest", str(folder), cache=cache), ready)
        for moment, ready in moments.items()
    }
    assert all(caught.values()), caught
    done = d_pull(f"{proxy.host}/app:latest", str(folder), cache=cache)
    assert done.returncode == 0, done.stderr
    assert tree_without_folder_times(rootfs) == clean_tree


def test_progress_on_a_terminal_shows_bytes_rate_and_layers(origin, tmp_path):
    registry, _ = origin
    primary, secondary = pty.openpty()
    command = [BIN / "d-pull", "--cache", str(tmp_path / "cache"), f"{registry.host}/app:latest", str(tmp_path / "a")]
    process = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1)
        try:
            chunk = os.read(primary, 65536) if ready else b""
        except OSError:  # the terminal closes with the process
            break
        output += chunk
        if not chunk and process.poll() is not None:
            break
    os.close(primary)
    assert process.wait(timeout=10) == 0
    text = output.decode(errors="replace")
    assert "\r" in text and "/s" in text and "layers 3/3" in text
    assert "MiB" in text


def test_without_a_terminal_each_step_is_one_line(origin, tmp_path):
    registry, _ = origin
    done = d_pull(f"{registry.host}/app:latest", str(tmp_path / "a"), cache=tmp_path / "cache")
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert sum(line.startswith("fetched sha256:") for line in lines) == 4
    assert sum(line.startswith("applied layer") for line in lines) == 3
    assert lines[-1].startswith("pulled ")


def watch(process: subprocess.Popen, seen, timeout: float = 60) -> bool:
    """Poll until `seen()` holds or the pull ends; whether it held while the pull ran."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if seen():
            return True
        time.sleep(POLL)
    return False


def partials(cache: Path) -> int:
    return len(list((cache / "blobs" / "sha256").glob("*.partial"))) if cache.exists() else 0


@pytest.mark.parametrize(("jobs", "at_once"), [("3", True), ("1", False)])
def test_blobs_download_side_by_side_up_to_jobs(origin, proxy, tmp_path, jobs, at_once):
    _, image = origin
    for digest in image.blobs():
        proxy.trickle(digest, chunk=16 << 10, delay=0.01)
    cache = tmp_path / "cache"
    process = start_d_pull("-j", jobs, f"{proxy.host}/app:latest", str(tmp_path / "app"), cache=cache)
    assert watch(process, lambda: partials(cache) >= 2) is at_once
    assert process.wait(timeout=PULL_TIMEOUT) == 0


def test_layers_are_applied_while_later_blobs_download(origin, proxy, tmp_path):
    _, image = origin
    last = list(image.blobs())[-1]
    proxy.trickle(last, chunk=8 << 10, delay=0.02)  # the last layer arrives slowly
    folder, cache = tmp_path / "app", tmp_path / "cache"
    process = start_d_pull(f"{proxy.host}/app:latest", str(folder), cache=cache)
    assert watch(process, lambda: applied(folder) >= 1 and partials(cache) >= 1)
    assert process.wait(timeout=PULL_TIMEOUT) == 0


def test_ctrl_c_stops_the_pull_with_a_hint_and_the_same_command_resumes(origin, proxy, clean_tree, tmp_path):
    _, image = origin
    for digest in image.blobs():
        proxy.trickle(digest, chunk=16 << 10, delay=0.01)
    folder, cache = tmp_path / "app", tmp_path / "cache"
    command = [BIN / "d-pull", "--cache", str(cache), f"{proxy.host}/app:latest", str(folder)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert watch(process, lambda: partial_size(cache) > 50_000)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "d-pull: interrupted; run the same command again to resume"
    assert "Traceback" not in err
    proxy.clear()
    done = d_pull(f"{proxy.host}/app:latest", str(folder), cache=cache)
    assert done.returncode == 0, done.stderr
    assert tree_without_folder_times(folder / "rootfs") == clean_tree
