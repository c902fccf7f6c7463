"""Who may use what, and when: the flocks on a pull folder (d-run and d-pull), on the cache and its blobs, and the
wait for a lock or a port that a container just ended lets go. The one owner of these rules; stdlib only, for d-run."""

from __future__ import annotations  # Path in annotations only: d-run's start-up loads no pathlib

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator

from .errors import Error
from .store import SMALL_FILE, NotRegular, blob_path, close_all_but, open_regular

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import TypeVar

    T = TypeVar("T")


@contextlib.contextmanager
def locked(path: Path, busy_message: str | None = None, kind: int = fcntl.LOCK_EX, waiting: str = "") -> Iterator[None]:
    """Hold a lock (`kind`: fcntl.LOCK_EX or LOCK_SH) on `path`: wait for it (saying `waiting`), or fail with
    `busy_message`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # whoever planted a link or a FIFO must not make us create or block on its target
        fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o600)
    except NotRegular:
        raise Error(f"the lock {path} is not a regular file", f"remove it: rm {path}") from None
    except OSError as err:
        raise Error(f"cannot use the lock {path}: {err.strerror}", "remove it if it is a link") from None
    with open(fd, "r+b") as handle:
        try:
            fcntl.flock(handle, kind | (fcntl.LOCK_NB if busy_message or waiting else 0))
        except BlockingIOError:
            if not waiting:
                raise Error(busy_message or "") from None
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, kind)
        yield


@contextlib.contextmanager
def blob_locked(cache: Path, digest: str) -> Iterator[None]:
    """Held while a blob downloads (others wait for it); removed once the blob is in place: no locks pile up."""
    lock = blob_path(cache, digest).with_suffix(".lock")
    with locked(lock):
        yield
        if blob_path(cache, digest).exists():
            lock.unlink(missing_ok=True)


def hold_folder(root: Path, kind: int, busy: str) -> int:
    """A descriptor of `root` holding its flock `kind` (LOCK_SH: a container runs; LOCK_EX: one that can change what a
    starting d-run mounts, or a pull changing DIR), else Error(`busy`). d-run gives it to a holder (hold_while_open)."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:  # a folder root opened to others for running only (0711)
        raise Error(f"cannot use {root}: {err.strerror}", "ask its owner to make it readable") from None
    try:  # a lock whose taker still runs (a container) is refused at once
        soon(lambda: fcntl.flock(fd, kind | fcntl.LOCK_NB), errno.EWOULDBLOCK, lambda: taken_by_an_ended_process(fd))
    except BlockingIOError:
        os.close(fd)
        raise Error(busy, "wait until it ends: a --rw run (or a volume's nested mount) runs alone") from None
    return fd


def taken_by_an_ended_process(fd: int) -> bool:
    """Whether a flock on `fd`'s file was taken by a process that has ended (/proc/locks names the taker): the lock
    of a d-run whose status is out, which its holder (hold_while_open) lets go a moment later."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", "rb") as locks:
            lines = locks.read(SMALL_FILE).decode("ascii", "replace").splitlines()
    except OSError:
        return False
    takers = [fields[4] for fields in map(str.split, lines) if fields[1:2] == ["FLOCK"] and fields[5:6] == [key]]
    return any(not taker.isdigit() or not os.path.exists(f"/proc/{taker}") for taker in takers)


RELEASED_WITHIN = 2.0  # seconds: see soon()


def soon(attempt: Callable[[], T], busy: int, worth_waiting: Callable[[], bool] = lambda: True) -> T:
    """attempt(), tried again for up to RELEASED_WITHIN seconds while it fails with errno `busy` (if `worth_waiting`
    when it first does): what a container whose d-run has just ended held (DIR's lock in its holder, its host ports in
    pasta) is let go by processes that end a moment after its exit status is out, so `d-run …; d-run …` would race
    them."""
    try:
        return attempt()
    except OSError as err:
        if err.errno != busy or not worth_waiting():
            raise
    import time  # only when busy: d-run's start-up is measured

    deadline = time.monotonic() + RELEASED_WITHIN
    while True:
        time.sleep(0.02)
        try:
            return attempt()
        except OSError as err:
            if err.errno != busy or time.monotonic() > deadline:
                raise


def hold_while_open(lock_fd: int) -> int:
    """Hand the lock on `lock_fd` to a child process that keeps it until every copy of the returned pipe end is
    closed. bwrap's init inside the sandbox keeps its --sync-fd open, where the container can take a copy
    (pidfd_getfd): a copy of this pipe end can only make the lock last longer, never release it."""
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the holder: nothing but the lock and the pipe's other end
        try:
            close_all_but(lock_fd, read_end)  # the caller's output too: its reader must see it end
            os.read(read_end, 1)  # end of file: bwrap and everything in the sandbox are gone
        finally:
            os._exit(0)
    os.close(read_end)
    os.close(lock_fd)
    return write_end
