"""On-disk facts shared by d-pull and d-run (cache, pull folder, atomic writes; their locks: locks.py); stdlib only,
for d-run."""

from __future__ import annotations  # Path in annotations only: no `re`, json.decoder or pathlib for d-run's start-up

import contextlib
import errno
import os
import stat
from collections import namedtuple

from .errors import Error

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from pathlib import Path
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
TREE_SIZE = ".d-pull/size"  # a complete tree's disk use, counted by share.py as root sees it, shown by d-cache list


def trees_folder(cache: Path) -> Path:
    """The store of applied images (share.py): CACHE/trees/HEX, HEX/anchor written last and linked into each folder."""
    return cache / "trees"


def partial_path(cache: Path, digest: str) -> Path:
    return blob_path(cache, digest).with_suffix(".partial")


def cache_lock(cache: Path) -> Path:
    return cache / "lock"


def pruned_marker(cache: Path) -> Path:
    return cache / "pruned"


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
