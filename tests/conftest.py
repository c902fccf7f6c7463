"""Shared fixtures (a real registry with the standard images, an ordinary user with d-utils installed, bwrap) and
the rule that marks the tests needing them `integration`."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from catalogue import unpack_with_umoci
from images import push_standard_set
from malicious import make_workspace
from registry_server import Registry

REPO = Path(__file__).parents[1]
USER = "dutest"
OTHER_USER = "dutest2"  # a second local user: an attacker among the machine's users
RUNUSER = "/usr/sbin/runuser"  # absolute: the user's PATH, which runs it, has no sbin
DEBIAN_PYTHON = "/usr/bin/python3"  # the pyenv python3 lives in /root, which an ordinary user cannot read


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    with Registry() as started:
        yield started


# The inner loop, `pytest -m "not integration"`, holds every test that needs no registry, no bwrap, no other user
# and no more than a second. The others are marked `integration`: by the fixtures they use (directly or through
# other fixtures) when one of these is among them, and by hand (`pytest.mark.integration`) when they start a
# server of their own or are slow. A slow test left unmarked is named at the end of the run, never failed: a
# loaded machine stretches every test's time, but not the CPU it takes, and not by this much.
INTEGRATION_FIXTURES = {"registry", "unprivileged", "other_user", "bwrap"}
SLOW_CPU, SLOW_WALL = 1.0, 5.0  # seconds


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parametrized = getattr(item, "callspec", None)  # an argument named `registry` is no registry
        fixtures = set(getattr(item, "fixturenames", ())) - set(parametrized.params if parametrized else ())
        if INTEGRATION_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)


def cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for (d-pull, d-run, tar, ...)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    started = cpu_seconds()
    yield
    item.user_properties.append(("cpu", cpu_seconds() - started))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Names the tests of the inner loop that took over SLOW_CPU of CPU or SLOW_WALL of time."""
    reports = [report for kind in ("passed", "failed") for report in terminalreporter.stats.get(kind, ())]
    slow = [
        (report, cpu)
        for report in reports
        if report.when == "call" and "integration" not in report.keywords
        for cpu in [dict(report.user_properties).get("cpu", 0.0)]
        if cpu > SLOW_CPU or report.duration > SLOW_WALL
    ]
    if slow:
        terminalreporter.section("slow tests not marked integration")
        for report, cpu in slow:
            terminalreporter.write_line(f"{report.duration:.1f} s ({cpu:.1f} s of CPU) {report.nodeid}")


@pytest.fixture(scope="session")
def bwrap() -> str:
    """Where bubblewrap is: every fixture or test that starts a sandbox asks for it, which marks it integration."""
    found = shutil.which("bwrap")
    assert found, "bwrap is not installed: run ./install.sh"
    return found


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
