"""d-run's start-up cost: `d-run DIR /bin/true` against the bare bwrap command it execs.

    python3 bench/bench_run.py [DIR] [--d-run PATH] [--runs N]

DIR defaults to a throwaway pull folder of the busybox test image. The d-run measured is the script
installed beside this Python (`--d-run` picks another, e.g. one installed for /usr/bin/python3). The bare
command is exactly the one d-run execs, built by d-run's own functions, with the same data descriptors.
Runs are interleaved so that both see the same machine; each line is the median of N runs.
"""

import argparse
import io
import os
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

from dutils.run import make_parser, plan_sandbox  # noqa: E402
from dutils.sandbox import bwrap_argv, inherited_fds  # noqa: E402
from dutils.store import PullDir, Record  # noqa: E402

TARGET_MS = 25


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


def default_d_run() -> list[str]:
    script = Path(sys.executable).parent / "d-run"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dutils.run"]


def interpreter_of(command: list[str]) -> str:
    """The Python that runs `command`: its script's #! line, or the command itself (python -m dutils.run)."""
    with open(command[0], "rb") as program:
        first = program.readline(1000)
    return first[2:].split()[0].decode() if first.startswith(b"#!") else command[0]


def time_run(argv: list[str], pass_fds: tuple[int, ...] = ()) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, pass_fds=pass_fds, check=True)
    return time.perf_counter() - start


def time_bare_bwrap(folder: Path) -> float:
    """One run of exactly what d-run would exec, its descriptors made afresh (bwrap reads and closes them)."""
    box = plan_sandbox(make_parser().parse_args([str(folder), "/bin/true"]))
    box = box._replace(new_session=True)  # as for d-run, whose stdin is /dev/null here
    fds = tuple(inherited_fds(box))
    try:
        return time_run(bwrap_argv(box), fds)
    finally:
        for fd in fds:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", help="a pull folder (default: a new one of the busybox test image)")
    parser.add_argument("--d-run", help="the d-run to measure (default: the one installed beside this Python)")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        folder = Path(args.dir) if args.dir else make_pull_folder(scratch)
        d_run = [args.d_run] if args.d_run else default_d_run()
        python = interpreter_of(d_run)
        times: dict[str, list[float]] = {"bwrap": [], "d-run": [], "python": []}
        time_run([*d_run, str(folder), "/bin/true"])  # warm the caches once
        for _ in range(args.runs):
            times["bwrap"].append(time_bare_bwrap(folder))
            times["d-run"].append(time_run([*d_run, str(folder), "/bin/true"]))
            times["python"].append(time_run([python, "-c", "pass"]))
        median = {name: statistics.median(values) * 1000 for name, values in times.items()}
        overhead = median["d-run"] - median["bwrap"]
        print(f"d-run DIR /bin/true against the bwrap command it execs, median of {args.runs} interleaved runs")
        print(f"  d-run: {' '.join(d_run)}")
        print(f"  bare bwrap            {median['bwrap']:7.1f} ms")
        print(f"  d-run                 {median['d-run']:7.1f} ms")
        print(f"  ratio                 {median['d-run'] / median['bwrap']:7.2f} x")
        verdict = "within" if overhead <= TARGET_MS else "over"
        print(f"  overhead              {overhead:7.1f} ms ({verdict} the {TARGET_MS} ms target)")
        print(f"  of which interpreter  {median['python']:7.1f} ms ({python} -c pass, for reference)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
