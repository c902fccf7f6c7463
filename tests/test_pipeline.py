"""The pipeline's pure parts, without a registry: one line for an OSError in a task, the cost per layer of a huge
image, the record's update policy and when a locked folder is settled."""

import errno
import os
import time
from pathlib import Path

import pytest

from dutils.folder import LockFile
from dutils.manifest import Blob, Image, parse_platform
from dutils.pipeline import Options, Pull, action
from dutils.store import Record

LAYERS = 27_000  # far more than any real image: the work per layer must not grow with their number


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_an_os_error_in_a_task_is_one_line_naming_the_file(tmp_path: Path):
    def write_image_json() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "a\x1b[2J" / "image.json"))

    failed = action(write_image_json)()
    assert failed.message == f"{tmp_path}/a\\x1b[2J/image.json: No space left on device"


def pull_of_many_layers(tmp_path: Path) -> Pull:
    pull = Pull("localhost:5000/app:1", tmp_path / "app", Options(cache=tmp_path / "cache"))
    layers = tuple(Blob(digest(n), 1, "application/vnd.oci.image.layer.v1.tar") for n in range(LAYERS))
    pull.image = Image(digest(LAYERS), "linux/amd64", Blob(digest(LAYERS + 1), 1, "config"), layers)
    pull.folder.state.mkdir(parents=True)
    pull.folder.rootfs.mkdir()
    return pull


def test_checking_every_layer_of_a_huge_image_costs_the_same_per_layer(tmp_path: Path):
    pull = pull_of_many_layers(tmp_path)
    pull.log.path.write_text("".join(f"{layer.digest}\n" for layer in pull.image.layers))
    started = time.monotonic()
    assert all(pull.log.is_applied(n, layer.digest) for n, layer in enumerate(pull.image.layers))
    assert time.monotonic() - started < 3  # re-reading the list per layer took minutes


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
