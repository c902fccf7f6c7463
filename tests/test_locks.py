"""locks.py's rules on their own: a lock never made through a planted link or FIFO, a busy lock refused or waited
for as asked, the folder's lock handed to a holder that keeps it exactly while its pipe is open, and the bounded wait
for what an ended process lets go. d-run's and d-pull's uses are tested with them (test_attacks_run, test_ports)."""

import errno
import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_run import wait_until

from dutils import locks
from dutils.errors import Error
from dutils.locks import blob_locked, hold_folder, hold_while_open, locked, soon, taken_by_an_ended_process
from dutils.store import blob_path

# Takes an exclusive flock on argv[1], hands it to a child that keeps it argv[2] seconds, and ends at once.
ENDED_TAKER = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
if os.fork() == 0:
    time.sleep(float(sys.argv[2]))
os._exit(0)
"""


# Takes an exclusive flock on argv[1], says so, and keeps it until its standard input ends.
HOLDER = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def flock_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["link", "fifo", "folder"])
def test_a_lock_path_that_is_no_regular_file_is_refused_and_left_alone(tmp_path: Path, kind: str) -> None:
    lock, target = tmp_path / "lock", tmp_path / "elsewhere"
    if kind == "link":
        lock.symlink_to(target)  # dangling: O_CREAT through it would make the attacker's file
    elif kind == "fifo":
        os.mkfifo(lock)  # opening it for reading would block
    else:
        lock.mkdir()
    started = time.monotonic()
    with pytest.raises(Error) as caught, locked(lock):
        pass
    assert str(lock) in str(caught.value) and time.monotonic() - started < 5
    assert not target.exists() and os.path.lexists(lock)


def test_a_busy_lock_is_refused_with_its_message_or_waited_for_saying_so(tmp_path: Path, capfd) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    with holder:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(Error, match="^busy: try later$"), locked(lock, "busy: try later"):
            pass
        threading.Timer(0.3, holder.stdin.close).start()  # lets go once this one waits
        with locked(lock, waiting="waiting for the lock"):
            assert holder.wait(timeout=20) == 0 and not flock_free(lock)
    assert "waiting for the lock" in capfd.readouterr().err
    assert flock_free(lock)


def test_a_blobs_lock_file_is_removed_once_the_blob_is_in_place(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    blob = blob_path(tmp_path, digest)
    blob.parent.mkdir(parents=True)
    with blob_locked(tmp_path, digest):
        pass  # the download failed: the lock stays for the next try
    assert blob.with_suffix(".lock").exists()
    with blob_locked(tmp_path, digest):
        blob.write_bytes(b"verified")
    assert not blob.with_suffix(".lock").exists() and blob.read_bytes() == b"verified"


def test_a_folders_lock_lasts_exactly_as_long_as_its_holders_pipe(tmp_path: Path) -> None:
    fd = hold_folder(tmp_path, fcntl.LOCK_EX, "in use")
    started = time.monotonic()
    with pytest.raises(Error, match="^in use; "):
        hold_folder(tmp_path, fcntl.LOCK_SH, "in use")
    assert time.monotonic() - started < locks.RELEASED_WITHIN / 2  # a taker that runs on: refused at once, no wait
    write_end = hold_while_open(fd)  # the lock's descriptor is closed here: only the holder keeps it
    copy = os.dup(write_end)  # as a container taking a copy of bwrap's --sync-fd
    os.close(write_end)
    time.sleep(0.2)
    assert not flock_free(tmp_path)  # a copy left open keeps the lock
    os.close(copy)
    assert wait_until(lambda: flock_free(tmp_path))


def test_only_a_lock_whose_taker_has_ended_counts_as_about_to_be_let_go(tmp_path: Path) -> None:
    handed, kept = tmp_path / "handed", tmp_path / "kept"
    handed.mkdir(), kept.mkdir()
    subprocess.run([sys.executable, "-c", ENDED_TAKER, str(handed), "3"], check=True, timeout=30)
    fd = os.open(handed, os.O_RDONLY)
    try:
        assert not flock_free(handed) and taken_by_an_ended_process(fd)
    finally:
        os.close(fd)
    fd = hold_folder(kept, fcntl.LOCK_EX, "in use")  # taken by this process, which runs on
    try:
        assert not taken_by_an_ended_process(fd)
    finally:
        os.close(fd)


def test_soon_retries_only_its_own_errno_and_only_within_its_bound(monkeypatch) -> None:
    monkeypatch.setattr(locks, "RELEASED_WITHIN", 0.3)
    tries = iter([OSError(errno.EADDRINUSE, "in use")] * 3 + ["free"])

    def attempt() -> str:
        outcome = next(tries)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    assert soon(attempt, errno.EADDRINUSE) == "free"

    def busy() -> None:
        raise OSError(errno.EADDRINUSE, "in use")

    started = time.monotonic()
    with pytest.raises(OSError):
        soon(busy, errno.EADDRINUSE)
    assert 0.3 <= time.monotonic() - started < 5
    for other, worth in ((errno.EADDRINUSE, lambda: False), (errno.EACCES, lambda: True)):
        calls = []
        with pytest.raises(OSError):
            soon(lambda calls=calls: calls.append(1) or busy(), other, worth)
        assert len(calls) == 1  # refused at once: nothing to wait for
