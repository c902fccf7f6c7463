"""On-disk facts shared by d-pull and d-run (cache, pull folder, atomic writes, locks); stdlib only, for d-run."""

from __future__ import annotations  # Path in annotations only: no `re`, json.decoder or pathlib for d-run's start-up

import contextlib
import errno
import fcntl
import os
import stat
import sys
from collections import namedtuple
from collections.abc import Iterator

from .errors import Error

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import TypeVar

    T = TypeVar("T")
try:  # the C scanner json.loads uses, without json.decoder
    from _json import make_scanner
except ImportError:  # not CPython: no SCAN, and json.loads reads it all
    make_scanner = None

OVERLAY = "overlay"  # DIR/.d-pull/overlay: where d-run --rw writes to a shared folder (overlay.py)
SMALL_FILE = 4 << 20  # records, lock and auth files, config.json, /etc/passwd: far above real ones, far below harm
JSON_SPACE = " \t\n\r"
HEX = "0123456789abcdef"


class JSONDefaults:  # what json's scanner reads from its decoder: JSONDecoder()'s (float reads NaN, -Infinity too)
    strict, object_hook, object_pairs_hook, parse_float, parse_int, parse_constant = True, None, None, float, int, float


SCAN = make_scanner and make_scanner(JSONDefaults)


def load_json(data: str | bytes) -> object:
    """json.loads, too deep a nesting (a RecursionError) being the ValueError any other bad JSON is, for callers.
    UTF-8 JSON goes to json's C scanner (json.decoder imports `re`); what it does not take whole, to json.loads."""
    with contextlib.suppress(Exception):  # (JSON in UTF-16 or -32 holds a NUL, which the scanner refuses)
        text = data if isinstance(data, str) else data.decode("utf-8", "surrogatepass")
        value, end = SCAN(text, len(text) - len(text.lstrip(JSON_SPACE)))
        if not text[end:].lstrip(JSON_SPACE):
            return value
    import json

    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def is_digest(text: object) -> bool:
    """`sha256:<64 lowercase hex>` (a regular expression would import `re`)."""
    return isinstance(text, str) and len(text) == 71 and text[:7] == "sha256:" and not text[7:].strip(HEX)


def check_digest(digest: str) -> str:
    """Return `digest` if it is `sha256:<64 hex>`; a digest also names files, so nothing else passes."""
    if not is_digest(digest):
        raise Error(f"unsupported or malformed digest {digest!r}", "only sha256 digests are supported")
    return digest


def cache_dir(override: str | None = None) -> Path:
    """The blob cache: --cache, then $D_UTILS_CACHE, then $XDG_CACHE_HOME/d-utils, then ~/.cache/d-utils."""
    from pathlib import Path

    if chosen := override or os.environ.get("D_UTILS_CACHE"):
        return Path(chosen).absolute()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").absolute() / "d-utils"


# The cache's layout, all of it: CACHE/lock (shared by running pulls, taken whole by pruning), CACHE/pruned (when
# pruning last ran), and per blob in CACHE/blobs/sha256: HEX (verified), HEX.partial (downloading), HEX.lock.
def blob_path(cache: Path, digest: str) -> Path:
    """Where a verified blob lives: its name is its digest, so its presence is the proof."""
    return blob_folder(cache) / check_digest(digest).removeprefix("sha256:")


def blob_folder(cache: Path) -> Path:
    return cache / "blobs" / "sha256"


ANCHOR = "anchor"


def trees_folder(cache: Path) -> Path:
    """The store of applied images (share.py): CACHE/trees/HEX, HEX/anchor written last and linked into each folder."""
    return cache / "trees"


def partial_path(cache: Path, digest: str) -> Path:
    return blob_path(cache, digest).with_suffix(".partial")


def cache_lock(cache: Path) -> Path:
    return cache / "lock"


def pruned_marker(cache: Path) -> Path:
    return cache / "pruned"


@contextlib.contextmanager
def blob_locked(cache: Path, digest: str) -> Iterator[None]:
    """Held while a blob downloads (others wait for it); removed once the blob is in place: no locks pile up."""
    lock = blob_path(cache, digest).with_suffix(".lock")
    with locked(lock):
        yield
        if blob_path(cache, digest).exists():
            lock.unlink(missing_ok=True)


def open_cache(cache: Path) -> Path:
    """The cache, made if need be and trusted only when all of it is the user's alone (as ssh does with its keys)."""
    if not os.path.lexists(cache):
        make_folder(cache, "cache folder (--cache or $D_UTILS_CACHE)")
    check_cache(cache)
    for folder in (blob_folder(cache).parent, blob_folder(cache)):
        make_folder(folder, "cache folder (--cache or $D_UTILS_CACHE)")
    return cache


def check_cache(cache: Path) -> Path:
    link = cache.lstat()  # the cache itself may be a link, if the user made it
    check_private(cache, cache.stat() if link.st_uid == os.geteuid() else link)
    trees = os.fspath(trees_folder(cache))  # each tree's folder is checked, not its files: they are the image's
    for parent, folders, files in os.walk(cache):
        for name in folders + files:
            with contextlib.suppress(FileNotFoundError):  # a lock another pull removed meanwhile
                check_private(os.path.join(parent, name), os.lstat(os.path.join(parent, name)))
        if parent == trees:
            folders.clear()
    return cache


def check_private(path: str | Path, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        problem, fix = "is a symbolic link", f"remove it: rm {path}"
    elif not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        problem, fix = "is not a regular file or folder", f"remove it: rm {path}"
    elif info.st_uid != os.geteuid():
        problem, fix = f"belongs to user {info.st_uid}", "remove it, or choose a cache of your own with --cache"
    elif info.st_mode & 0o022:
        problem, fix = "is writable by other users", f"chmod go-w {path}"
    elif stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        problem, fix = "has other hard links", f"remove it: rm {path}"
    else:
        return
    raise Error(f"refusing the cache: {path} {problem}", fix)


def make_folder(path: Path, what: str) -> None:
    import tempfile  # d-pull's only: d-run's start-up does without

    try:
        path.mkdir(0o755, parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise Error(f"cannot write to the {what} {path}: {err.strerror}", f"choose another {what}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    import tempfile  # d-pull's only: d-run's start-up does without

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644 & ~current_umask())  # mkstemp's 0600 would make config.json private; never o+w
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_json(path: Path, value: object) -> None:
    import json

    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


class NotRegular(OSError):
    """What `open_regular` found instead of a regular file: a FIFO, a device, a socket or a folder."""


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o644, dir_fd: int | None = None) -> int:
    """Open `path` only as a regular file (else NotRegular), never through a link (ELOOP), never waiting on a FIFO:
    for every file that someone else may have planted (cache files, the image's own files that d-run reads)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd


def read_small(path: str | os.PathLike[str], cap: int = SMALL_FILE, dir_fd: int | None = None) -> bytes:
    """The bytes of the regular file `path`, never more than `cap`: a device is never opened (lstat says what it is
    first), nor a FIFO waited on, nor a link followed (ELOOP). FileNotFoundError when there is none, NotRegular for
    anything but a regular file, OSError EFBIG over `cap`."""
    kind = os.lstat(path, dir_fd=dir_fd).st_mode
    if not (stat.S_ISREG(kind) or stat.S_ISLNK(kind)):
        raise NotRegular(errno.EINVAL, "not a regular file", os.fspath(path))
    fd = open_regular(path, os.O_RDONLY, dir_fd=dir_fd)  # NotRegular too when swapped since the lstat
    try:
        data = os.read(fd, cap + 1)  # a regular file gives all it has, up to the count
    finally:
        os.close(fd)
    if len(data) > cap:
        raise OSError(errno.EFBIG, f"larger than {cap} bytes", os.fspath(path))
    return data


def read_small_json(path: Path, hint: str) -> object:
    """The JSON in the small regular file `path` (see read_small), None when there is none."""
    try:
        return load_json(read_small(path))
    except FileNotFoundError:
        return None
    except OSError as err:  # a link, a FIFO, a folder or a huge file there is none of ours
        raise Error(f"cannot read {path}: {err.strerror}", hint) from None
    except ValueError as err:
        raise Error(f"{path} is not valid JSON ({err})", hint) from None


def read_small_followed(path: str | os.PathLike[str], cap: int = SMALL_FILE) -> bytes:
    """read_small through symbolic links: for the user's own files, which dotfile managers make links."""
    return read_small(os.path.realpath(path), cap)


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


RECORD_FIELDS = "reference digest platform complete config_digest config_xxh64 verified_by"


class Record(namedtuple("Record", RECORD_FIELDS, defaults=(False, "", "", ""))):
    """What a pull folder holds, `complete` set by its last task; `config_digest`: the image config that config.json
    was made from (to merge the user's edits into), `config_xxh64`: the fingerprint of the config.json we wrote (to
    notice them), `verified_by`: the keys that verified its signature (policy.py). A namedtuple: d-run imports this,
    and dataclasses (or typing) would cost it milliseconds."""

    __slots__ = ()

    def retarget(self, reference: str, digest: str, platform: str, root: Path, replace: bool) -> Record:
        """The record for holding `digest`: a finished folder changes image only when `replace` (--update, a lock)."""
        if (self.reference, self.digest) == (reference, digest):
            return self
        if self.complete and not replace:
            raise Error(
                f"{root} holds {self.reference} ({self.digest[:19]}), and {reference} is now {digest[:19]}",
                "run with --update to replace it; your config.json edits and volumes/ are kept",
            )
        return self._replace(reference=reference, digest=digest, platform=platform, complete=False)


class PullDir:
    """A pull folder's paths: pathlib.Path, or for d-run (whose start-up pathlib would cost 4 ms) `kind` str."""

    def __init__(self, root: str | os.PathLike[str], kind: type | None = None) -> None:
        if kind is None:
            from pathlib import Path as kind
        self.root = kind(absolute(root))
        self.rootfs = kind(os.path.join(self.root, "rootfs"))
        self.config = kind(os.path.join(self.root, "config.json"))
        self.volumes = kind(os.path.join(self.root, "volumes"))
        self.record_path = kind(os.path.join(self.root, "image.json"))  # what was pulled; the rest: in `state`
        self.state = kind(os.path.join(self.root, ".d-pull"))

    def read_record(self) -> Record | None:
        """The record, or None when this folder was never the target of a pull."""
        try:
            record = Record(**load_json(read_small(self.record_path)))
            if not all(isinstance(text, str) for text in record[:3]):  # what a no-op compares and parses
                raise TypeError("its reference, digest and platform must be strings")
            return record
        except FileNotFoundError:
            return None
        except OSError as err:
            raise Error(f"cannot use {self.root}: {err.strerror}", "choose a folder you can write") from None
        except (ValueError, TypeError) as err:
            raise Error(
                f"{self.record_path}: damaged pull record ({err})", "delete the folder and pull again"
            ) from None

    def check_trusted(self) -> None:
        """Refuse a folder someone else could have changed, as ssh judges its files: DIR and what d-pull and d-run keep
        in it owned by the user or root, writable by no one else who can reach it (in a 0700 DIR, umask 002 is fine),
        and no link in DIR/.d-pull (one planted there would make a pull write, as its owner, where it leads)."""
        parts = [self.root, self.state, self.rootfs, self.config, self.record_path, self.volumes]
        with contextlib.suppress(OSError):  # none, or not ours to list: nothing of it is used then
            parts += [os.path.join(self.state, name) for name in os.listdir(self.state)]
        others = 0o022  # the write bits that matter: for what is inside DIR, those of whoever can enter DIR
        for path in parts:
            try:
                info = os.stat(path) if path == self.root else os.lstat(path)  # DIR itself is named by the user
            except OSError:  # missing, or not ours to see: what uses it says so
                continue
            if path == self.root:
                others &= (info.st_mode & 0o011) << 1
            if stat.S_ISLNK(info.st_mode):
                problem, fix = "is a symbolic link", f"remove it: rm {path}"
            elif info.st_uid not in (os.geteuid(), 0):
                problem, fix = f"belongs to user {info.st_uid}", "pull into a folder of your own"
            elif info.st_mode & (0o022 if path == self.root else others):
                problem, fix = "is writable by other users", f"chmod go-w {path}"
            else:
                continue
            raise Error(f"refusing {path}: it {problem}", fix)

    def write_record(self, record: Record) -> None:
        write_json(self.record_path, record._asdict())

    def is_complete(self, record: Record | None) -> bool:
        return bool(record and record.complete and os.path.exists(self.config) and os.path.isdir(self.rootfs))

    def require_complete(self) -> Record:
        """The record of a finished pull, or an error saying how to finish it."""
        self.check_trusted()
        record = self.read_record()
        if record is None:
            raise Error(f"{self.root} is not a folder made by d-pull", "run d-pull IMAGE DIR first")
        if not self.is_complete(record):
            raise Error(
                f"the pull into {self.root} is incomplete",
                f"run the same d-pull again: d-pull {record.reference} {self.root}",
            )
        return record


def absolute(path: str | os.PathLike[str]) -> str:
    """str(Path(path).absolute()): "." and empty parts dropped, ".." kept (a link's parent is not its folder's)."""
    path = os.path.join(os.getcwd(), path)
    head = "//" if path[:2] == "//" and path[2:3] != "/" else "/"  # as pathlib: POSIX leaves "//" to the system
    return head + "/".join(part for part in path.split("/") if part not in ("", "."))


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


def libc(name: str, *args: object) -> None:
    """The C library's function `name` (one Python lacks), an OSError when it fails. Through ctypes' C module, as
    ctypes.CDLL(None, use_errno=True) calls it (ints and bytes in, an int out): `import ctypes` costs 1.5 ms."""
    import _ctypes

    class Program:  # what CDLL(None) opens: the program's own symbols, the C library's among them
        _handle = _ctypes.dlopen(None)

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

    if Function((name, Program))(*args) != 0:
        code = _ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def close_all_but(*fds: int) -> None:
    """Close every descriptor of this process but `fds` (standard input and output too)."""
    start = 0
    for fd in sorted(fds):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))


def read_setting(path: str) -> str:
    """A /proc/sys value or /etc/subuid's text, or "" where there is none."""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def touch(path: Path) -> None:
    """Mark a cache entry as used now, so that pruning by age keeps it."""
    with contextlib.suppress(OSError):
        os.utime(path, follow_symlinks=False)


def remove_tree(path: Path) -> None:
    """Remove `path` with everything below it, however deep; links are removed, never followed."""
    remove_entry(None, os.fspath(path))


LISTABLE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_entry(dir_fd: int | None, name: str) -> None:
    """Remove `name` in `dir_fd` (None: the current folder) and all below it, one folder open at a time (back up through
    ".."): no depth or width is too much; folders an ordinary user could not empty (mode 0000) get owner rwx first."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = open_to_empty(dir_fd, name)
    names, todo, folders = [name], [listing(fd)], [folder_id(fd)]
    try:
        while todo:
            if todo[-1]:
                child, is_dir = todo[-1].pop()
                if is_dir:
                    fd = swap_fd(fd, open_to_empty(fd, child))
                    names.append(child)
                    todo.append(listing(fd))
                    folders.append(folder_id(fd))
                else:
                    os.unlink(child, dir_fd=fd)
                continue
            todo.pop()
            folders.pop()
            if todo:
                fd = swap_fd(fd, os.open("..", LISTABLE, dir_fd=fd))
                if folder_id(fd) != folders[-1]:  # moved elsewhere meanwhile, by someone it is writable to: stop there
                    raise OSError(errno.ESTALE, "a folder was moved while it was removed", os.path.join(*names))
                os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def folder_id(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def open_to_empty(dir_fd: int | None, name: str) -> int:
    try:
        fd = os.open(name, LISTABLE, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, stat.S_IRWXU, dir_fd=dir_fd, follow_symlinks=False)
        fd = os.open(name, LISTABLE, dir_fd=dir_fd)
    mode = os.fstat(fd).st_mode
    if mode & stat.S_IRWXU != stat.S_IRWXU:
        os.fchmod(fd, stat.S_IMODE(mode) | stat.S_IRWXU)
    return fd


def listing(fd: int) -> list[tuple[str, bool]]:
    """The names in the open directory `fd`, each with whether it is a directory (links are not)."""
    with os.scandir(fd) as entries:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]


def swap_fd(old_fd: int, new_fd: int) -> int:
    """Close `old_fd` for `new_fd`: one step down (or up) a walk that holds one directory open at a time."""
    os.close(old_fd)
    return new_fd
