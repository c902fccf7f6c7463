"""Fetching blobs into the cache: where a resumed download starts, what it keeps of an earlier `.partial`, and
`cached` marking a blob used, all on real files."""

import hashlib
import os
from pathlib import Path

import pytest

from dutils.errors import Error
from dutils.fetch import PartialBlob, cached
from dutils.manifest import Blob
from dutils.progress import Lines
from dutils.store import blob_path

BLOB = bytes(range(256)) * 40


def partial_blob(tmp_path: Path, existing: bytes | None) -> PartialBlob:
    path = tmp_path / "blob.partial"
    if existing is not None:
        path.write_bytes(existing)
    digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
    return PartialBlob(path, Blob(digest, len(BLOB), "application/octet-stream"), Lines())


@pytest.mark.parametrize("have", [0, 1, 5000, len(BLOB) - 1])
def test_a_resume_starts_after_the_bytes_kept_and_hashes_them(have, tmp_path):
    with partial_blob(tmp_path, BLOB[:have] if have else None) as sink:
        assert (sink.have, sink.missing) == (have, len(BLOB) - have)
        sink.write(BLOB[have:])
        assert sink.hasher.hexdigest() == hashlib.sha256(BLOB).hexdigest()
    assert (tmp_path / "blob.partial").read_bytes() == BLOB


def test_a_partial_longer_than_the_blob_starts_over(tmp_path):
    with partial_blob(tmp_path, BLOB + b"x") as sink:
        assert sink.have == 0
    assert (tmp_path / "blob.partial").read_bytes() == b""


def test_a_restart_drops_the_bytes_kept(tmp_path):
    with partial_blob(tmp_path, b"not the start of the blob") as sink:
        sink.restart()
        sink.write(BLOB)
        assert sink.hasher.hexdigest() == hashlib.sha256(BLOB).hexdigest()
    assert (tmp_path / "blob.partial").read_bytes() == BLOB


def test_more_bytes_than_the_manifest_says_are_refused_and_dropped(tmp_path):
    with partial_blob(tmp_path, BLOB[:10]) as sink, pytest.raises(Error) as caught:
        sink.write(BLOB[10:] + b"extra")
    assert "larger than the" in str(caught.value)
    assert not (tmp_path / "blob.partial").exists()


# -- cached: a blob in the cache is marked used, so that pruning by age keeps it


def test_a_cached_blob_is_found_and_marked_used_now(tmp_path):
    digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
    path = blob_path(tmp_path, digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(BLOB)
    os.utime(path, (1_000_000, 1_000_000))
    assert cached(tmp_path, digest)
    assert path.stat().st_mtime > 1_000_000 and path.read_bytes() == BLOB


def test_a_blob_not_in_the_cache_is_not_cached_and_nothing_is_made(tmp_path):
    digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
    assert not cached(tmp_path, digest)
    assert list(tmp_path.iterdir()) == []


def test_cached_refuses_a_malformed_digest(tmp_path):
    with pytest.raises(Error, match="malformed digest"):
        cached(tmp_path, "sha256:../../etc/passwd")
