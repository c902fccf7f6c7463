"""Running the installed command lines from tests, and checking what users see of them."""

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # the console scripts installed next to the interpreter running the tests


def d_pull(*args: str, cache: Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "d-pull", "--cache", str(cache), *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def start_d_pull(*args: str, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [BIN / "d-pull", "-q", "--cache", str(cache), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def d_run(folder: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "d-run", str(folder), *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str, program: str = "d-pull") -> None:
    """Exit status 1, and the last line of stderr is one `PROGRAM: error: …` line holding every word."""
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"{program}: error: "), done.stderr
    assert "Traceback" not in done.stderr
    assert all(word in lines[-1] for word in words), lines[-1]
