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
    """Counts bytes and layers from several threads, and prints nothing (--quiet); `Lines` and `Terminal` print."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.total = self.done = self.layers = self.applied = 0

    def expect(self, size: int) -> None:
        with self.lock:
            self.total += size

    def expect_layers(self, count: int) -> None:
        with self.lock:
            self.layers += count

    def advance(self, size: int) -> None:
        with self.lock:
            self.done += size

    def note(self, message: str) -> None:
        """A passing condition the user should see now: a retry, a wait."""

    def step(self, message: str) -> None:
        """A finished step: a blob fetched, a layer applied."""

    def layer_applied(self, message: str) -> None:
        with self.lock:
            self.applied += 1
        self.step(message)

    def close(self) -> None:
        """The pull ended."""


class Named:
    """One folder's progress among several sharing `progress`: each of its lines starts with the folder's name."""

    def __init__(self, progress: Progress, name: str) -> None:
        self.progress, self.prefix = progress, f"{name}: "

    def __getattr__(self, name: str) -> object:  # the counts: shared
        return getattr(self.progress, name)

    def note(self, message: str) -> None:
        self.progress.note(self.prefix + message)

    def step(self, message: str) -> None:
        self.progress.step(self.prefix + message)

    def layer_applied(self, message: str) -> None:
        self.progress.layer_applied(self.prefix + message)


class Lines(Progress):
    def note(self, message: str) -> None:
        with self.lock:
            print(message, file=self.stream, flush=True)

    step = note


class Terminal(Progress):
    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.start, self.drawn, self.note_text = time.monotonic(), 0.0, ""

    def advance(self, size: int) -> None:
        super().advance(size)
        with self.lock:
            if time.monotonic() - self.drawn >= REFRESH:
                self.redraw()

    def note(self, message: str) -> None:
        with self.lock:
            self.note_text = message
            self.redraw()

    def step(self, message: str) -> None:
        self.note("")

    def close(self) -> None:
        with self.lock:
            self.redraw()
            self.stream.write("\n")
            self.stream.flush()

    def redraw(self) -> None:  # with the lock held
        self.drawn = time.monotonic()
        rate = self.done / max(self.drawn - self.start, 1e-3)
        line = f"{human(self.done)}/{human(self.total)} at {human(rate)}/s, layers {self.applied}/{self.layers}"
        self.stream.write(f"\r\x1b[K{line}" + (f" | {self.note_text}" if self.note_text else ""))
        self.stream.flush()


def progress_for(stream: TextIO, quiet: bool) -> Progress:
    if quiet:
        return Progress(stream)
    return Terminal(stream) if stream.isatty() else Lines(stream)
