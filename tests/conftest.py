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

from dutils.locks import locked

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
        self.home = root / "home"  # a stand-in: no test touches the user's real home, nor another worker's
        self.env = {"HOME": str(self.home), "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        # runuser sets the user's real HOME: env sets the stand-in back
        self.become = [RUNUSER, "-u", USER, "--", "/usr/bin/env", f"HOME={self.home}"] if self.as_root else []

    def install(self) -> None:
        source = self.root / "src"
        ignore = shutil.ignore_patterns(".*", "*.egg-info", "__pycache__", "build", "cache", "tests", "bench")
        shutil.copytree(REPO, source, ignore=ignore)  # pip must not build inside a tree others work in
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", str(self.root / "venv")], check=True, timeout=120)
        pip = [str(self.bin / "pip"), "install", "-q", str(source)]
        subprocess.run(pip, check=True, capture_output=True, timeout=600)
        shutil.rmtree(source)
        subprocess.run(["chmod", "-R", "a+rX", str(self.root)], check=True)
        self.home.mkdir(mode=0o700)
        if self.as_root:
            shutil.chown(self.home, USER, USER)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(argv) as the ordinary user, in their home unless `cwd` says otherwise (never in the
        working tree, whose dutils would shadow the installed one); `env` entries are added to a sane environment."""
        env = self.env | kwargs.pop("env", {})
        kwargs.setdefault("cwd", self.home)
        return subprocess.run([*self.become, *map(str, argv)], env=env, **kwargs)

    def tool(self, name: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
        """d-pull, d-run or d-cache, as installed, run as the ordinary user; its output captured as text."""
        return self.run([self.bin / name, *args], capture_output=True, text=True, timeout=timeout)


# The users are shared by every worker of a run (pytest-xdist) and by other runs on the machine: made under a lock
# when missing, and removed only by the run that made them, once all its workers are done (pytest_sessionfinish).
USERS_LOCK = Path(tempfile.gettempdir()) / "d-utils-test-users.lock"


def run_folder(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of this whole run, shared by its xdist workers (each has a folder inside it)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def ensure_user(name: str, factory: pytest.TempPathFactory) -> None:
    """Makes the user `name` unless it exists, noting in the run's folder that this run made it."""
    with locked(USERS_LOCK):
        if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
            (run_folder(factory) / f"made-user-{name}").touch()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Removes the users this run made, in the process that ran the workers (or the only one) once they are done."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if os.environ.get("PYTEST_XDIST_WORKER") or factory is None:
        return
    for made in run_folder(factory).glob("made-user-*"):
        subprocess.run(["userdel", "-r", made.name.removeprefix("made-user-")], capture_output=True)
        made.unlink()


@pytest.fixture(scope="session")
def unprivileged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unprivileged]:
    if os.geteuid() == 0:
        ensure_user(USER, tmp_path_factory)
    user = Unprivileged(Path(tempfile.mkdtemp(prefix="d-utils-unprivileged-")))
    try:
        user.root.chmod(0o755)
        user.install()
        yield user
    finally:
        shutil.rmtree(user.root, ignore_errors=True)


@pytest.fixture(scope="session")
def other_user(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The second local user's name (made when missing, removed only when made by this run); root only: the tests
    plant its files and run commands as it."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    ensure_user(OTHER_USER, tmp_path_factory)
    return OTHER_USER


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
