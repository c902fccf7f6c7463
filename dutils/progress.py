"""What a pull tells its user: a live status line on a terminal, one line per finished step otherwise."""

import sys
import threading
import time
from typing import TextIO

REFRESH = 0.1  # seconds between redraws of the status line


def human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


class Progress:
    """Counts bytes and steps from several threads; `Quiet` prints nothing, `Lines` a line per step."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.start = time.monotonic()
        self.layers = 0
        self.applied = 0
        self.note_text = ""
        self.drawn = 0.0

    def expect(self, size: int) -> None:
        with self.lock:
            self.total += size

    def expect_layers(self, count: int) -> None:
        with self.lock:
            self.layers += count

    def advance(self, size: int) -> None:
        with self.lock:
            self.done += size
            self.redraw()

    def note(self, message: str) -> None:
        """A passing condition the user should see now: a retry, a wait."""
        with self.lock:
            self.note_text = message
            self.redraw(force=True)

    def step(self, message: str) -> None:
        """A finished step: a blob fetched, a layer applied."""
        with self.lock:
            self.note_text = ""
            self.redraw(force=True)

    def layer_applied(self, message: str) -> None:
        with self.lock:
            self.applied += 1
        self.step(message)

    def close(self) -> None:
        pass

    def redraw(self, force: bool = False) -> None:
        pass

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-3)


class Terminal(Progress):
    def redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.drawn < REFRESH:
            return
        self.drawn = now
        line = f"{human(self.done)}/{human(self.total)} at {human(self.rate())}/s, layers {self.applied}/{self.layers}"
        if self.note_text:
            line += f" | {self.note_text}"
        self.stream.write(f"\r\x1b[K{line}")
        self.stream.flush()

    def close(self) -> None:
        with self.lock:
            self.redraw(force=True)
            self.stream.write("\n")
            self.stream.flush()


class Lines(Progress):
    def note(self, message: str) -> None:
        with self.lock:
            print(message, file=self.stream, flush=True)

    def step(self, message: str) -> None:
        with self.lock:
            print(message, file=self.stream, flush=True)


class Quiet(Progress):
    pass


def progress_for(stream: TextIO, quiet: bool) -> Progress:
    if quiet:
        return Quiet(stream)
    return Terminal(stream) if stream.isatty() else Lines(stream)
