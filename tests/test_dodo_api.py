"""The dodo.py API's Sandbox: its d-run command line, flag for flag, and how it is pulled."""

import io
import sys
from pathlib import Path

from dutils.manifest import parse_platform
from dutils.pipeline import Options, Sandbox
from dutils.progress import Lines


def test_run_settings_are_exactly_d_runs_flags(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sandbox = Sandbox(
        "sandboxes/tools",
        "alpine",
        command=["make", "-j2"],
        volumes=["src:/src", "/cache"],
        env={"A": "1", "B": "x y"},
        net=True,
        rw=True,
        user="app:app",
        workdir="/src",
        ports=["127.0.0.1:8080:80", "53:53/udp"],
        tmpfs=["/run", "/var/lib/nginx:size=16m"],
        hostname="tools",
        entrypoint=["/bin/sh", "-c"],
    )
    assert sandbox.d_run_argv() == [
        sys.executable, "-m", "dutils.run",
        "-v", "src:/src", "-v", "/cache", "-e", "A=1", "-e", "B=x y", "-n", "--rw", "-u", "app:app",
        "--workdir", "/src", "-p", "127.0.0.1:8080:80", "-p", "53:53/udp",
        "--tmpfs", "/run", "--tmpfs", "/var/lib/nginx:size=16m", "--hostname", "tools",
        "--entrypoint", '["/bin/sh", "-c"]', str(tmp_path / "sandboxes" / "tools"), "make", "-j2",
    ]  # fmt: skip
    assert Sandbox("s", "alpine").d_run_argv()[3:] == [str(tmp_path / "s")]  # d-run's defaults: nothing added
    assert Sandbox("s", "alpine", entrypoint="/init").d_run_argv()[3:5] == ["--entrypoint", "/init"]


def test_a_sandbox_pulls_for_its_platform_and_its_progress_lines_name_it(tmp_path: Path):
    lines = io.StringIO()
    options = Options(cache=tmp_path / "cache", platform=parse_platform("linux/amd64"), progress=Lines(lines))
    mine = Sandbox("sandboxes/arm", "alpine", platform="linux/arm64").options(options)
    assert (mine.platform, mine.cache) == (parse_platform("linux/arm64/v8"), options.cache)
    assert Sandbox("sandboxes/host", "alpine").options(options).platform == options.platform
    mine.progress.note("retrying")
    mine.progress.expect(10)
    assert lines.getvalue() == "sandboxes/arm: retrying\n"
    assert options.progress.total == 10  # one status for all the sandboxes
