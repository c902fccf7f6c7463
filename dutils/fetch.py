"""The `fetch` stage: one blob into the content-addressed cache, resumable, verified while it streams."""

import contextlib
import errno
import hashlib
import os
from pathlib import Path

from .errors import Error
from .locks import blob_locked
from .oci import Blob
from .progress import Progress
from .registry import Registry
from .store import NotRegular, blob_path, open_regular, partial_path, touch


def cached(cache: Path, digest: str) -> bool:
    """Whether the blob is in the cache, marked used now: pruning goes by last use."""
    path = blob_path(cache, digest)
    touch(path)
    return path.exists()


def fetch_blob(registry: Registry, blob: Blob, cache: Path, progress: Progress, url: str | None = None) -> Path:
    """The cached, verified blob, downloading what is missing of it into `<digest>.partial` (which survives a kill and
    a reboot, and is resumed by a Range request) under a lock per blob, so that concurrent pulls wait for one download
    instead of making their own. `url`: where a non-distributable layer lives, instead of the registry."""
    final = blob_path(cache, blob.digest)
    if cached(cache, blob.digest):
        return final
    try:
        download_verified(registry, blob, cache, progress, url)
    except OSError as err:  # the lock, the partial file, the rename: the cache's disk
        if err.errno == errno.ENOSPC:
            raise Error(
                f"disk full while downloading into {final.parent}: {blob.size} more bytes are needed for this blob",
                "free some space and run the same command again; what was downloaded is kept",
            ) from None
        raise Error(f"cannot write {final}: {err.strerror}", "choose another cache with --cache") from None
    progress.step(f"fetched {blob.digest[:19]} ({blob.size} bytes)")
    return final


def download_verified(registry: Registry, blob: Blob, cache: Path, progress: Progress, url: str | None) -> None:
    final = blob_path(cache, blob.digest)
    with blob_locked(cache, blob.digest):
        if final.exists():  # another process finished it while we waited
            return
        partial = partial_path(cache, blob.digest)
        with PartialBlob(partial, blob, progress) as sink:
            progress.expect(sink.missing)
            registry.download_blob(blob.digest, sink, url)
            if sink.hasher.hexdigest() != blob.digest.removeprefix("sha256:"):
                partial.unlink()
                raise Error(
                    f"blob {blob.digest} from {registry.ref.registry} does not match its digest",
                    "the registry or something in between corrupted it; the bad copy was deleted, run again",
                )
        os.replace(partial, final)


class PartialBlob(contextlib.AbstractContextManager):
    """`<digest>.partial`: what earlier downloads left (hashed on opening), appended to as bytes arrive and
    flushed at once, so what was received survives a kill."""

    def __init__(self, path: Path, blob: Blob, progress: Progress) -> None:
        self.path, self.blob, self.progress = path, blob, progress
        hint = "someone else may be able to write to this cache: remove the file, and check the cache's permissions"
        try:  # never through a link planted in its place (writing elsewhere), nor blocking on a FIFO
            self.file = os.fdopen(open_regular(path, os.O_RDWR | os.O_CREAT), "r+b")
        except NotRegular:
            raise Error(f"{path} is not a regular file", hint) from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise Error(f"{path} is a symbolic link, not a file of d-pull's", hint) from None
            raise
        self.hasher, self.have = hashlib.sha256(), 0
        if os.fstat(self.file.fileno()).st_size > blob.size:  # cannot be a prefix of this blob
            self.restart()
        while chunk := self.file.read(1 << 20):
            self.hasher.update(chunk)
            self.have += len(chunk)

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()

    @property
    def missing(self) -> int:
        return self.blob.size - self.have

    def write(self, chunk: bytes) -> None:
        if len(chunk) > self.missing:
            self.file.close()
            self.path.unlink(missing_ok=True)
            raise Error(f"blob {self.blob.digest} is larger than the {self.blob.size} bytes its manifest says")
        self.file.write(chunk)
        self.file.flush()
        self.hasher.update(chunk)
        self.have += len(chunk)
        self.progress.advance(len(chunk))

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hasher, self.have = hashlib.sha256(), 0
