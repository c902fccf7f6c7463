"""The `fetch` stage: one blob into the content-addressed cache, resumable, verified while it streams."""

import contextlib
import errno
import hashlib
import os
from pathlib import Path

from .errors import Error
from .manifest import Blob
from .progress import Progress
from .registry import Interrupted, Registry
from .store import blob_locked, blob_path, partial_path, touch


def fetch_blob(registry: Registry, blob: Blob, cache: Path, progress: Progress, url: str | None = None) -> Path:
    """Return the cached, verified blob, downloading what is missing of it.

    Bytes go to `<digest>.partial`, which survives interruptions (and reboots) and is resumed with a Range
    request; the file takes its final name only once size and digest are verified. A lock per blob makes
    concurrent pulls wait for one download instead of making their own. `url`: where a non-distributable
    layer lives, instead of the registry.
    """
    final = blob_path(cache, blob.digest)
    if final.exists():
        touch(final)
        return final
    try:
        download_verified(registry, blob, cache, progress, url)
    except OSError as err:  # the lock, the partial file, the rename: the cache's disk
        raise write_error(final, err, blob.size) from None
    progress.step(f"fetched {blob.digest[:19]} ({blob.size} bytes)")
    return final


def download_verified(registry: Registry, blob: Blob, cache: Path, progress: Progress, url: str | None) -> None:
    final = blob_path(cache, blob.digest)
    with blob_locked(cache, blob.digest):
        if final.exists():  # another process finished it while we waited
            return
        partial = partial_path(cache, blob.digest)
        hasher, have = hash_existing(partial, blob.size)
        progress.expect(blob.size - have)
        hasher = download(registry, blob, partial, hasher, have, progress, url)
        if hasher.hexdigest() != blob.digest.removeprefix("sha256:"):
            partial.unlink()
            raise Error(
                f"blob {blob.digest} from {registry.ref.registry} does not match its digest",
                "the registry or something in between corrupted it; the bad copy was deleted, run again",
            )
        os.replace(partial, final)


def hash_existing(partial: Path, size: int) -> tuple["hashlib._Hash", int]:
    """The hash state and length of what an earlier, interrupted download left behind."""
    hasher = hashlib.sha256()
    try:
        with open(partial, "rb") as existing:
            while chunk := existing.read(1 << 20):
                hasher.update(chunk)
        have = partial.stat().st_size
    except FileNotFoundError:
        return hasher, 0
    if have > size:  # cannot be a prefix of this blob: start again
        partial.unlink()
        return hashlib.sha256(), 0
    return hasher, have


def download(
    registry: Registry,
    blob: Blob,
    partial: Path,
    hasher: "hashlib._Hash",
    have: int,
    progress: Progress,
    url: str | None,
) -> "hashlib._Hash":
    """Append the rest of the blob to `partial`, resuming after every broken connection; return the full hash."""
    failures = 0
    try:
        with open(partial, "ab", buffering=0) as out:  # unbuffered: what was received is on disk
            while have < blob.size:
                before = have
                try:
                    offset, chunks = registry.read_blob(blob.digest, have, url)
                    if offset != have:  # the server ignored our Range: start over from its first byte
                        out.truncate(0)
                        hasher, have = hashlib.sha256(), 0
                    for chunk in chunks:
                        have = append(out, chunk, have, blob, hasher)
                        progress.advance(len(chunk))
                    if have < blob.size:
                        raise Interrupted("the connection closed early")
                except Interrupted as err:
                    failures = 0 if have > before else failures
                    where = f"blob {blob.digest[:19]} from {url or registry.ref.registry}"
                    failures = registry.wait_before_retry(failures, where, str(err), None)
    except OSError as err:
        raise write_error(partial, err, blob.size - have) from None
    return hasher


def append(out, chunk: bytes, have: int, blob: Blob, hasher: "hashlib._Hash") -> int:
    if have + len(chunk) > blob.size:
        out.close()
        with contextlib.suppress(OSError):
            os.unlink(out.name)
        raise Error(f"blob {blob.digest} is larger than the {blob.size} bytes its manifest says")
    out.write(chunk)
    hasher.update(chunk)
    return have + len(chunk)


def write_error(path: Path, err: OSError, missing: int) -> Error:
    if err.errno == errno.ENOSPC:
        return Error(
            f"disk full while downloading into {path.parent}: {missing} more bytes are needed for this blob",
            "free some space and run the same command again; what was downloaded is kept",
        )
    return Error(f"cannot write {path}: {err.strerror}", "choose another cache with --cache")
