"""dutils.progress: sizes as people read them, and what a pull prints: nothing (--quiet), a line per step, or a
status line redrawn on a terminal (a real pseudo-terminal where it matters)."""

import io
import os
import re
import select
import threading
from collections.abc import Iterator

import pytest

from dutils import progress
from dutils.progress import Lines, Progress, Terminal, human, progress_for


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2, "1.0 MiB"),
        (int(2.25 * 1024**2), "2.2 MiB"),
        (1024**3, "1.0 GiB"),
        (5 * 1024**4, "5120.0 GiB"),  # no unit past GiB
    ],
)
def test_human_sizes(size, shown):
    assert human(size) == shown


def fill(shown: Progress) -> None:
    """What a pull of two layers of 1000 and 500 bytes tells its progress, with a note and a step between."""
    shown.expect(1000)
    shown.expect(500)
    shown.expect_layers(2)
    shown.advance(600)
    shown.note("blob sha256:aaa: connection reset; retrying in 1 s")
    shown.advance(900)
    shown.step("fetched blob sha256:aaa")
    shown.layer_applied("applied layer 1 of 2")
    shown.layer_applied("applied layer 2 of 2")
    shown.close()


def test_quiet_counts_and_prints_nothing():
    stream = io.StringIO()
    quiet = progress_for(stream, quiet=True)
    fill(quiet)
    assert type(quiet) is Progress and stream.getvalue() == ""
    assert (quiet.total, quiet.done, quiet.layers, quiet.applied) == (1500, 1500, 2, 2)


def test_counts_from_many_threads_add_up():
    counted = Progress(io.StringIO())
    threads = [threading.Thread(target=lambda: [counted.advance(3) for _ in range(2_000)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert counted.done == 8 * 2_000 * 3


def test_without_a_terminal_each_note_and_step_is_one_line_and_bytes_print_nothing():
    stream = io.StringIO()
    lines = progress_for(stream, quiet=False)
    fill(lines)
    assert type(lines) is Lines
    assert stream.getvalue().splitlines() == [
        "blob sha256:aaa: connection reset; retrying in 1 s",
        "fetched blob sha256:aaa",
        "applied layer 1 of 2",
        "applied layer 2 of 2",
    ]


STATUS = re.compile(r"([\d.]+ \w?i?B)/([\d.]+ \w?i?B) at [\d.]+ \w?i?B/s, layers (\d)/(\d)(?: \| (.*))?\s*")
CLEAR = "\r\x1b[K"  # to the start of the line, which is then cleared


def drawn(text: str) -> list[tuple[str, ...]]:
    """Each redraw of the status line: done, total, layers applied, layers, note."""
    assert text.startswith(CLEAR), repr(text)
    return [STATUS.fullmatch(line).groups("") for line in text.split(CLEAR)[1:]]


class TtyStream(io.StringIO):
    """A stream that says it is a terminal, read back exactly as written (a real one is tested at the end)."""

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_status_line_is_redrawn_with_the_latest_note(monkeypatch):
    monkeypatch.setattr(progress, "REFRESH", 0)  # every byte count redraws: no timing involved
    stream = TtyStream()
    status = progress_for(stream, quiet=False)
    fill(status)
    assert type(status) is Terminal
    assert "\n" not in stream.getvalue()[:-1] and stream.getvalue().endswith("\n")  # one line, ended at the close
    assert drawn(stream.getvalue()) == [
        ("600 B", "1.5 KiB", "0", "2", ""),
        ("600 B", "1.5 KiB", "0", "2", "blob sha256:aaa: connection reset; retrying in 1 s"),
        ("1.5 KiB", "1.5 KiB", "0", "2", "blob sha256:aaa: connection reset; retrying in 1 s"),  # kept over bytes
        ("1.5 KiB", "1.5 KiB", "0", "2", ""),  # a step clears the note
        ("1.5 KiB", "1.5 KiB", "1", "2", ""),
        ("1.5 KiB", "1.5 KiB", "2", "2", ""),
        ("1.5 KiB", "1.5 KiB", "2", "2", ""),  # the close
    ]


def test_bytes_redraw_the_line_only_once_refresh_has_passed(monkeypatch):
    stream = TtyStream()
    status = Terminal(stream)
    monkeypatch.setattr(progress, "REFRESH", float("inf"))
    for _ in range(1000):
        status.advance(1)
    assert stream.getvalue() == ""
    monkeypatch.setattr(progress, "REFRESH", 0)
    status.advance(1)
    assert drawn(stream.getvalue()) == [("1001 B", "0 B", "0", "0", "")]


@pytest.fixture
def terminal() -> Iterator[tuple[int, io.TextIOWrapper]]:
    """A real pseudo-terminal: its reading end, and its other end as a text stream, as d-pull's stderr is."""
    reader, writer = os.openpty()
    with open(writer, "w", encoding="utf-8") as stream:
        yield reader, stream
    os.close(reader)


def read_line(fd: int, timeout: float = 10) -> str:
    """What the terminal shows up to the end of the line (bounded in time: an unended line fails the test)."""
    shown = b""
    while not shown.endswith(b"\n") and select.select([fd], [], [], timeout)[0]:
        shown += os.read(fd, 65536)
    return shown.decode()


def test_a_real_terminal_gets_the_status_line(terminal):
    reader, stream = terminal
    status = progress_for(stream, quiet=False)
    assert type(status) is Terminal
    status.expect(2048)
    status.expect_layers(1)
    status.advance(1024)
    status.layer_applied("applied layer 1 of 1")
    status.close()
    shown = read_line(reader)
    assert drawn(shown)[-1] == ("1.0 KiB", "2.0 KiB", "1", "1", "")
    assert shown.endswith("\r\n")  # the terminal's own line ending: the shell prompt starts on a line of its own
