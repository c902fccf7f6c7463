"""d-run's start-up cost: `d-run DIR /bin/true` against the bare bwrap command it execs.

    python3 bench/bench_run.py [DIR] [--d-run PATH] [--runs N]

DIR defaults to a throwaway pull folder of the busybox test image. The d-run measured is, by default, the one
install.sh makes, for Debian's /usr/bin/python3: a venv, pip upgraded, then `pip install` (made afresh in a scratch
folder from a copy of this tree); `--d-run` picks another. The bare command is exactly the one d-run execs, built by
d-run's own functions, with the same data descriptors. Runs are interleaved so that both see the same machine; each
line is the median and the best of N runs, in wall time and in CPU time (user and system, of the process and the
children it waited for: less sensitive to the machine's load). The overhead is then split: d-run's interpreter
with its site set-up, d-run's imports (that interpreter importing dutils.run), and the rest, d-run's own work.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dutils.errors import Error  # noqa: E402
from dutils.run import make_parser, plan_sandbox  # noqa: E402
from dutils.sandbox import bwrap_argv, inherited_fds  # noqa: E402
from dutils.store import PullDir, Record  # noqa: E402

TARGET_MS = 25
DEBIAN_PYTHON = "/usr/bin/python3"
INSTALL_TIMEOUT = 300  # seconds for venv + pip install


def make_pull_folder(parent: Path) -> Path:
    """A complete pull folder of the busybox test image, as d-pull leaves one."""
    from images import busybox_layer  # the tests' image builder (it imports requests: only here)

    folder = parent / "busybox"
    with tarfile.open(fileobj=io.BytesIO(busybox_layer())) as layer:
        layer.extractall(folder / "rootfs")
    (folder / "config.json").write_text('{"Cmd": ["sh"], "net": false, "rw": false}\n')
    record = Record(reference="busybox:latest", digest="sha256:" + "0" * 64, platform="linux/amd64", complete=True)
    PullDir(folder).write_record(record)
    return folder


def install_d_run(parent: Path, python: str = DEBIAN_PYTHON) -> list[str]:
    """d-run as a user installs it: `python -m venv`, then `pip install` of this tree (copied, so that the build
    leaves nothing in the repository; no dependencies: d-run needs only the standard library)."""
    source, venv = parent / "source", parent / "venv"
    shutil.copytree(REPO / "dutils", source / "dutils", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [venv / "bin" / "pip", "install", "-q"]
    for command in ([python, "-m", "venv", venv], [*pip, "--upgrade", "pip"], [*pip, "--no-deps", source]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise Error(f"{' '.join(map(str, command))} failed: {tail}", "or measure an installed one: --d-run PATH")
    return [str(venv / "bin" / "d-run")]


def interpreter_of(command: list[str]) -> str:
    """The Python that runs `command`: its script's #! line, or the command itself (python -m dutils.run)."""
    with open(command[0], "rb") as program:
        first = program.readline(1000)
    return first[2:].split()[0].decode() if first.startswith(b"#!") else command[0]


def time_run(argv: list[str], pass_fds: tuple[int, ...] = ()) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, pass_fds=pass_fds, check=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def time_bare_bwrap(folder: Path) -> tuple[float, float]:
    """One run of exactly what d-run would exec, its descriptors made afresh (bwrap reads and closes them)."""
    box = plan_sandbox(make_parser().parse_args([str(folder), "/bin/true"]))
    box = box._replace(new_session=True)  # as for d-run, whose stdin is /dev/null here
    fds = tuple(inherited_fds(box))
    try:
        return time_run(bwrap_argv(box), fds)
    finally:
        for fd in fds:
            os.close(fd)


def startup_ms(folder: Path, d_run: list[str], runs: int) -> dict[str, float]:
    """Median wall milliseconds of each command (bench_pull.py's figure)."""
    times = startup_times(folder, d_run, runs)
    return {name: statistics.median(wall for wall, _ in values) * 1000 for name, values in times.items()}


def startup_times(folder: Path, d_run: list[str], runs: int) -> dict[str, list[tuple[float, float]]]:
    """Wall and CPU times of the bare bwrap command, `d-run folder /bin/true`, d-run's interpreter alone and with
    d-run's imports, interleaved. Those two end in os._exit, as d-run ends in an exec: no clean-up of the modules
    (-I: no current folder on sys.path, whose dutils would be imported instead)."""
    python = interpreter_of(d_run)
    commands = {
        "bwrap": None,
        "d-run": [*d_run, str(folder), "/bin/true"],
        "python": [python, "-I", "-c", "import os; os._exit(0)"],
        "imports": [python, "-I", "-c", "import os, dutils.run; os._exit(0)"],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    time_run(commands["d-run"])  # warm the caches once
    for _ in range(runs):
        for name, command in commands.items():
            times[name].append(time_run(command) if command else time_bare_bwrap(folder))
    return times


def print_startup(times: dict[str, list[tuple[float, float]]], d_run: list[str], runs: int) -> None:
    """Each command's median and best, wall then CPU, in ms; the target is on the median wall time."""
    ms = {
        name: [f(t[i] for t in values) * 1000 for i in (0, 1) for f in (statistics.median, min)]
        for name, values in times.items()
    }
    load = ", ".join(f"{n:.2f}" for n in os.getloadavg())
    print(f"d-run DIR /bin/true against the bwrap command it execs, {runs} interleaved runs, load average {load}")
    print(f"  d-run: {' '.join(d_run)}")
    print(f"  {'':40} wall: median   best   CPU: median   best")
    for name, label in (("bwrap", "bare bwrap"), ("d-run", "d-run"), ("python", "python, no clean-up")):
        print_row(label, ms[name])
    overhead = [d - b for d, b in zip(ms["d-run"], ms["bwrap"], strict=True)]
    print_row("d-run - bwrap", overhead)
    verdict = "within" if overhead[0] <= TARGET_MS else "over"
    print(f"  overhead, median wall: {overhead[0]:.1f} ms ({verdict} the {TARGET_MS} ms target)")
    print("  where d-run's time over bwrap goes (differences of the figures of each column):")
    imports = [i - p for i, p in zip(ms["imports"], ms["python"], strict=True)]
    print_row("  the interpreter and its site set-up", ms["python"])
    print_row("  imports: python with dutils.run, less it", imports)
    own = [o - p - i for o, p, i in zip(overhead, ms["python"], imports, strict=True)]
    print_row("  d-run's own work up to the exec: the rest", own)


def print_row(label: str, figures: list[float]) -> None:
    """One line of the table: median and best wall time, median and best CPU time."""
    print(f"  {label:40} {figures[0]:13.1f} {figures[1]:6.1f} {figures[2]:13.1f} {figures[3]:6.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", help="a pull folder (default: a new one of the busybox test image)")
    parser.add_argument("--d-run", help=f"the d-run to measure (default: one pip-installed for {DEBIAN_PYTHON})")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    if args.d_run and not os.access(args.d_run, os.X_OK):
        parser.error(f"--d-run: {args.d_run} is not an executable file")
    scratch = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        folder = Path(args.dir) if args.dir else make_pull_folder(scratch)
        d_run = [args.d_run] if args.d_run else install_d_run(scratch)
        print_startup(startup_times(folder, d_run, args.runs), d_run, args.runs)
    except Error as err:
        print(f"bench_run: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
