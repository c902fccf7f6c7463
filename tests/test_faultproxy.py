"""The fault proxy, checked fault by fault with plain requests against the real registry."""

from __future__ import annotations

import hashlib
import http.client
import time
from collections.abc import Iterator

import pytest
import requests
from faultproxy import Fault, FaultProxy
from images import ALL_MANIFEST_TYPES, push_blob, sha256
from registry_server import Registry, session


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as started:
        yield started


@pytest.fixture(scope="module")
def layer(registry: Registry, images: dict[str, str]) -> tuple[str, bytes]:
    """The busybox layer of the standard image: its digest and bytes, straight from the registry."""
    url = f"{registry.url}/v2/busybox/manifests/latest"
    manifest = session().get(url, headers={"Accept": ALL_MANIFEST_TYPES}, timeout=30).json()
    digest = max(manifest["layers"], key=lambda layer: layer["size"])["digest"]
    data = session().get(f"{registry.url}/v2/busybox/blobs/{digest}", timeout=30).content
    assert sha256(data) == digest and len(data) > 500_000
    return digest, data


def blob_url(proxy: FaultProxy, digest: str) -> str:
    return f"{proxy.url}/v2/busybox/blobs/{digest}"


def get_partial(proxy: FaultProxy, digest: str) -> bytes:
    """The blob's body as far as it arrives before the connection ends (http.client keeps every byte, where
    requests drops its last partial read)."""
    connection = http.client.HTTPConnection(proxy.host, timeout=30)
    try:
        connection.request("GET", f"/v2/busybox/blobs/{digest}")
        response = connection.getresponse()
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        return cut.value.partial
    finally:
        connection.close()


def test_passes_blobs_ranges_manifests_and_uploads_through_on_one_connection(proxy, registry, layer) -> None:
    digest, data = layer
    client = session()
    assert client.get(blob_url(proxy, digest), timeout=30).content == data
    part = client.get(blob_url(proxy, digest), headers={"Range": "bytes=1000-"}, timeout=30)
    assert (part.status_code, part.content) == (206, data[1000:])
    assert part.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    head = client.head(blob_url(proxy, digest), timeout=30)
    assert (head.status_code, head.headers["Content-Length"], head.content) == (200, str(len(data)), b"")
    manifest = client.get(
        f"{proxy.url}/v2/busybox/manifests/latest", headers={"Accept": ALL_MANIFEST_TYPES}, timeout=30
    )
    assert manifest.headers["Docker-Content-Digest"] == sha256(manifest.content)
    assert proxy.connections == 1  # keep-alive
    assert proxy.served_bytes(digest) == 2 * len(data) - 1000
    assert (proxy.hits(digest), proxy.hits("/manifests/"), proxy.hits()) == (3, 1, 4)
    uploaded = push_blob(proxy.host, "through-proxy", b"uploaded through the proxy")  # Location points back here
    assert (
        session().get(f"{registry.url}/v2/through-proxy/blobs/{uploaded}", timeout=30).content
        == b"uploaded through the proxy"
    )


def test_connection_close_is_honoured(proxy, layer) -> None:
    client = session()
    for _ in range(2):
        assert client.get(blob_url(proxy, layer[0]), headers={"Connection": "close"}, timeout=30).ok
    assert proxy.connections == 2


def test_cut_ends_one_body_after_n_bytes_and_a_range_request_resumes(proxy, layer) -> None:
    digest, data = layer
    proxy.cut(digest, after=100_000)
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
        session().get(blob_url(proxy, digest), timeout=30)
    proxy.cut(digest, after=100_000)
    received = get_partial(proxy, digest)
    assert received == data[:100_000]
    rest = session().get(blob_url(proxy, digest), headers={"Range": f"bytes={len(received)}-"}, timeout=30)
    assert rest.status_code == 206 and received + rest.content == data
    assert proxy.served_bytes(digest) == 100_000 + len(data)


def test_reset_before_answering(proxy, layer) -> None:
    proxy.reset(layer[0], times=2)
    for _ in range(2):
        with pytest.raises(requests.ConnectionError, match="reset by peer"):
            session().get(blob_url(proxy, layer[0]), timeout=30)
    assert session().get(blob_url(proxy, layer[0]), timeout=30).content == layer[1]
    assert proxy.hits(layer[0]) == 3


def test_reset_in_the_middle_of_a_body(proxy, layer) -> None:
    digest, data = layer
    proxy.reset(digest, after=200_000)
    with pytest.raises(requests.RequestException, match="reset by peer"):
        session().get(blob_url(proxy, digest), timeout=30)
    assert proxy.served_bytes(digest) == 200_000


@pytest.mark.parametrize("status", [503, 429])
def test_status_with_retry_after_for_the_next_requests(proxy, layer, status: int) -> None:
    proxy.fail(status, times=2, match="/blobs/", retry_after="3")
    assert session().get(f"{proxy.url}/v2/", timeout=30).status_code == 200  # not matched
    client = session()
    answers = [client.get(blob_url(proxy, layer[0]), timeout=30) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [status, status, 200]
    assert [answer.headers.get("Retry-After") for answer in answers] == ["3", "3", None]
    assert answers[2].content == layer[1] and proxy.connections <= 2  # error answers keep the connection


def test_trickle_slows_one_body(proxy, layer) -> None:
    digest, data = layer
    window = {"Range": "bytes=0-131071"}
    proxy.trickle(digest, chunk=16384, delay=0.1)
    started = time.monotonic()
    slow = session().get(blob_url(proxy, digest), headers=window, timeout=30)
    slow_time = time.monotonic() - started
    assert slow.content == data[:131072] and slow_time >= 0.7  # 8 pieces, 7 pauses at least
    started = time.monotonic()
    assert session().get(blob_url(proxy, digest), headers=window, timeout=30).content == data[:131072]
    assert time.monotonic() - started < slow_time


def test_corrupt_flips_exactly_one_byte(proxy, layer) -> None:
    digest, data = layer
    proxy.corrupt(digest, offset=70_000)  # past the first piece sent
    bad = session().get(blob_url(proxy, digest), timeout=30).content
    assert len(bad) == len(data) and [i for i in range(len(data)) if bad[i] != data[i]] == [70_000]
    assert bad[70_000] == data[70_000] ^ 0xFF and "sha256:" + hashlib.sha256(bad).hexdigest() != digest
    assert session().get(blob_url(proxy, digest), timeout=30).content == data


def test_faults_combine_and_apply_in_order(proxy, layer) -> None:
    digest, data = layer
    proxy.add(Fault(digest, drop="close", after=50_000, chunk=10_000, delay=0.01, flip=5))
    proxy.fail(500)
    started = time.monotonic()
    received = get_partial(proxy, digest)
    assert time.monotonic() - started >= 0.04  # 5 pieces, 4 pauses at least
    assert len(received) == 50_000 and received[5] == data[5] ^ 0xFF and received[6:] == data[6:50_000]
    assert session().get(blob_url(proxy, digest), timeout=30).status_code == 500
    assert session().get(blob_url(proxy, digest), timeout=30).content == data


def test_stop_closes_idle_connections(registry, layer) -> None:
    client = session()
    with FaultProxy(registry.url) as proxy:
        assert client.get(blob_url(proxy, layer[0]), timeout=30).ok
    with pytest.raises(requests.ConnectionError):
        client.get(blob_url(proxy, layer[0]), timeout=5)
