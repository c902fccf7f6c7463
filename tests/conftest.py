"""Shared fixtures: a real registry with the standard images, and an ordinary user with d-utils installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from catalogue import unpack_with_umoci
from images import push_standard_set
from malicious import make_workspace
from registry import Registry

REPO = Path(__file__).parents[1]
USER = "dutest"
OTHER_USER = "dutest2"  # a second local user: an attacker among the machine's users
RUNUSER = "/usr/sbin/runuser"  # absolute: the user's PATH, which runs it, has no sbin
DEBIAN_PYTHON = "/usr/bin/python3"  # the pyenv python3 lives in /root, which an ordinary user cannot read


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    with Registry() as started:
        yield started


# Tests that need a registry, bwrap or the ordinary user: marked `integration`, so that
# `pytest -m "not integration"` is a fast inner loop. Fixtures tell for most; these modules start their own.
INTEGRATION_FIXTURES = {"registry", "images", "unprivileged", "umoci", "other_user"}
INTEGRATION_MODULES = {
    "test_auth",
    "test_faultproxy",
    "test_registries",
    "test_images",
    "test_resume",
    "test_rig",
    "test_run",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> reference of the standard images (see images.push_standard_set)."""
    return push_standard_set(registry.host, tmp_path_factory.mktemp("standard-images"))


class Unprivileged:
    """d-utils installed (not editable) in a venv of Debian's python, run as the ordinary user `dutest` when
    the tests run as root, else as the current user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "venv" / "bin"
        self.as_root = os.geteuid() == 0
        self.home = Path(f"/home/{USER}") if self.as_root else Path.home()
        self.env = {"HOME": str(self.home), "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def install(self) -> None:
        source = self.root / "src"
        ignore = shutil.ignore_patterns(".*", "*.egg-info", "__pycache__", "build", "cache", "tests", "bench")
        shutil.copytree(REPO, source, ignore=ignore)  # pip must not build inside a tree others work in
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", str(self.root / "venv")], check=True, timeout=120)
        pip = [str(self.bin / "pip"), "install", "-q", str(source)]
        subprocess.run(pip, check=True, capture_output=True, timeout=600)
        shutil.rmtree(source)
        subprocess.run(["chmod", "-R", "a+rX", str(self.root)], check=True)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(argv) as the ordinary user, in their home unless `cwd` says otherwise (never in the
        working tree, whose dutils would shadow the installed one); `env` entries are added to a sane environment."""
        env = self.env | kwargs.pop("env", {})
        kwargs.setdefault("cwd", self.home)
        prefix = [RUNUSER, "-u", USER, "--"] if self.as_root else []
        return subprocess.run([*prefix, *map(str, argv)], env=env, **kwargs)

    def tool(self, name: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
        """d-pull, d-run or d-cache, as installed, run as the ordinary user; its output captured as text."""
        return self.run([self.bin / name, *args], capture_output=True, text=True, timeout=timeout)


def ensure_user(name: str = USER) -> bool:
    """Makes the user `name` unless it exists; True when made here."""
    if subprocess.run(["id", "-u", name], capture_output=True).returncode == 0:
        return False
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    return True


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[Unprivileged]:
    made_user = os.geteuid() == 0 and ensure_user()
    user = Unprivileged(Path(tempfile.mkdtemp(prefix="d-utils-unprivileged-")))
    try:
        user.root.chmod(0o755)
        user.install()
        yield user
    finally:
        shutil.rmtree(user.root, ignore_errors=True)
        if made_user:
            subprocess.run(["userdel", "-r", USER], capture_output=True)


@pytest.fixture(scope="session")
def other_user() -> Iterator[str]:
    """The second local user's name (made when missing, removed only when made here); root only: the tests
    plant its files and run commands as it."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    made_user = ensure_user(OTHER_USER)
    yield OTHER_USER
    if made_user:
        subprocess.run(["userdel", "-r", OTHER_USER], capture_output=True)


@pytest.fixture(scope="module")
def workspace(unprivileged: Unprivileged) -> Iterator[Path]:
    """A folder the ordinary user can reach (pytest's tmp_path is private to root), with a `pull` folder it owns."""
    workspace = make_workspace()
    yield workspace
    shutil.rmtree(workspace)


@pytest.fixture(scope="session")
def umoci(unprivileged: Unprivileged) -> Iterator[dict[str, Path]]:
    """The layer catalogue as an OCI layout, unpacked once by umoci as root and with --rootless ("layout", "root",
    "rootless"), in a folder the ordinary user can read."""
    folder = make_workspace()
    yield unpack_with_umoci(folder)
    shutil.rmtree(folder)
