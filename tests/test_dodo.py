"""dodo.py, the example of sandboxes declared in a repository: `doit` materialises them, `doit d-run:DIR` runs one."""

import shutil
import subprocess
from pathlib import Path

from cli import BIN

REPO = Path(__file__).parents[1]


def doit(workdir: Path, registry: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir), "D_UTILS_REGISTRY": registry}
    return subprocess.run([BIN / "doit", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=180)


def test_doit_materialises_the_declared_sandboxes_and_runs_one(images, registry, tmp_path: Path):
    shutil.copy(REPO / "dodo.py", tmp_path / "dodo.py")  # a repository of the user's: the cache is its own
    listed = doit(tmp_path, registry.host, "list")
    assert listed.returncode == 0, listed.stderr
    for task in ["auth", "manifest", "fetch", "apply", "config", "d-run"]:
        assert task in listed.stdout

    first = doit(tmp_path, registry.host)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "sandboxes" / "busybox" / "rootfs" / "bin" / "busybox").exists()
    assert any((tmp_path / "cache" / "blobs" / "sha256").iterdir())

    served = registry.blob_gets()
    again = doit(tmp_path, registry.host)
    assert again.returncode == 0 and registry.blob_gets() == served  # up to date: nothing fetched
    assert "-- apply:sandboxes/busybox/0" in again.stdout

    ran = doit(tmp_path, registry.host, "d-run:sandboxes/busybox")
    assert ran.returncode == 0, ran.stderr
    assert "busybox" in ran.stdout.lower()
