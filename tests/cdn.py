"""A registry that sends blob downloads to a CDN, as Docker Hub and most cloud registries do:

    with Cdn(image.blobs(), cut={layer: 100_000}) as cdn, RedirectingFront(registry.url, cdn) as front:
        ... d-pull {front.host}/repo ...
        assert not any("authorization" in headers for headers in cdn.requests)

The front passes every request to the registry as it came, except blob GETs the registry would answer (asked with a
HEAD carrying the same credentials): those get a 307 to the blob on the CDN, a second loopback server that records
each request's headers and serves the bytes, Range honoured.
"""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlsplit

from httpd import Handler, LoopbackServer

BLOB_PATH = re.compile(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})")
RANGE = re.compile(r"bytes=(\d+)-$")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
UPSTREAM_TIMEOUT = 60


class CdnHandler(Handler):
    def do_GET(self) -> None:
        cdn: Cdn = self.owner
        digest = self.path.split("?")[0].removeprefix("/blobs/")
        with cdn.lock:
            cdn.requests.append({name.lower(): value for name, value in self.headers.items()})
            cut = cdn.cut.pop(digest, None)
        blob = cdn.blobs.get(digest)
        if blob is None:
            self.answer(404)
            return
        start = int(found.group(1)) if (found := RANGE.match(self.headers.get("Range", ""))) else 0
        status, headers = (206, {"Content-Range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"}) if start else (200, {})
        if cut is None:
            self.answer(status, blob[start:], headers)
            return
        self.send_response(status)  # announce every byte, send `cut` of them, and hang up
        self.send_header("Content-Length", str(len(blob) - start))
        self.end_headers()
        self.wfile.write(blob[start : start + cut])
        self.close_connection = True


class Cdn(LoopbackServer):
    """Serves `blobs` (digest -> bytes) at /blobs/<digest>; the first response for each digest in `cut` breaks off
    after that many bytes. `requests` holds every request's headers, names in lower case."""

    handler = CdnHandler

    def __init__(self, blobs: dict[str, bytes], cut: dict[str, int] | None = None) -> None:
        self.blobs = blobs
        self.cut = dict(cut or {})
        self.requests: list[dict[str, str]] = []
        super().__init__()


class FrontHandler(Handler):
    def do_GET(self) -> None:
        front: RedirectingFront = self.owner
        blob = BLOB_PATH.fullmatch(self.path)
        if not blob:
            self.relay(self.command)
            return
        forwarded = self.forwarded_headers()
        with front.lock:
            front.blob_requests.append({name.lower(): value for name, value in self.headers.items()})
            expired, front.expired = front.expired, False
        if expired:
            forwarded = {name: value for name, value in forwarded.items() if name.lower() != "authorization"}
        status, headers, _ = front.ask_registry("HEAD", self.path, forwarded)
        if status != 200:  # let the client see the registry's 401 or 404
            self.answer(status, b"", headers)
            return
        self.answer(307, b"", {"Location": f"{front.cdn.url}/blobs/{blob.group(1)}?expires=4102444800&signature=x"})

    def do_HEAD(self) -> None:
        self.relay("HEAD")

    def relay(self, method: str) -> None:
        status, headers, body = self.owner.ask_registry(method, self.path, self.forwarded_headers())
        self.answer(status, body, headers)

    def forwarded_headers(self) -> dict[str, str]:
        return {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP | {"host"}}


class RedirectingFront(LoopbackServer):
    """In front of the registry at `upstream`; `blob_requests` holds the headers of every blob GET it saw."""

    handler = FrontHandler

    def __init__(self, upstream: str, cdn: Cdn) -> None:
        self.upstream = urlsplit(upstream)
        self.cdn = cdn
        self.blob_requests: list[dict[str, str]] = []
        self.expired = False
        super().__init__()

    def expire_authorization(self) -> None:
        """The next blob GET reaches the registry without its Authorization, as if its token had just expired:
        the client gets the registry's 401 and challenge."""
        with self.lock:
            self.expired = True

    def ask_registry(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of the registry's answer; Range is not forwarded for a HEAD."""
        if method == "HEAD":
            headers = {name: value for name, value in headers.items() if name.lower() != "range"}
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=UPSTREAM_TIMEOUT)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        kept = {name: value for name, value in response.getheaders() if name.lower() not in HOP_BY_HOP}
        kept.pop("Content-Length", None)  # Handler.answer sets it from the body
        return response.status, kept, body
