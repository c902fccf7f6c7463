"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a plain-HTTP registry, for resumable and retrying pulls.

    with FaultProxy(registry.url) as proxy:
        proxy.cut(layer_digest, after=100_000)     # the next GET of that blob ends after 100 kB (FIN)
        proxy.fail(503, times=2, retry_after="1")  # the next two requests answer 503
        ... d-pull {proxy.host}/busybox ...
        assert proxy.served_bytes(layer_digest) < 2 * size

Requests are forwarded as they come (Range included, Host kept so the registry's Location headers point back
here); each request meets at most one fault: the first one added whose `match` is in its path, until spent.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 64 * 1024
UPSTREAM_TIMEOUT = 60
IDLE_TIMEOUT = 30  # a keep-alive connection left idle this long is closed
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Fault:
    """What to do to the next `times` requests whose path contains `match` ("" matches every request)."""

    match: str = ""
    times: int = 1
    status: int | None = None  # answer this status instead of forwarding ...
    retry_after: str | None = None  # ... with this Retry-After header
    drop: str | None = None  # end the connection: "close" (FIN) or "reset" (RST) ...
    after: int | None = None  # ... after this many body bytes; None: before any answer
    chunk: int = CHUNK  # send the body in pieces of this size ...
    delay: float = 0.0  # ... this many seconds apart
    flip: int | None = None  # invert the body byte at this offset
    whole: bool = False  # ignore the request's Range: answer 200 with the whole body, as some servers do


class FaultProxy:
    """The proxy, serving from a thread of the test process until stop()."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()  # blob digest -> body bytes sent
        self.paths: Counter[str] = Counter()  # request path -> requests
        self.connections = 0
        self.open_sockets: set[socket.socket] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="faultproxy", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stops serving and closes every connection still open."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for sock in self.open_sockets:
                with contextlib.suppress(OSError):  # already ended by its client or by a fault
                    sock.shutdown(socket.SHUT_RDWR)
        self.thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- faults

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def fail(self, status: int, times: int = 1, match: str = "", retry_after: str | None = None) -> Fault:
        """Answer `status` (e.g. 503, 429) without asking the registry."""
        return self.add(Fault(match, times, status=status, retry_after=retry_after))

    def cut(self, match: str, after: int, times: int = 1) -> Fault:
        """Close the connection (FIN) after `after` body bytes: the client sees a short body."""
        return self.add(Fault(match, times, drop="close", after=after))

    def reset(self, match: str = "", times: int = 1, after: int | None = None) -> Fault:
        """Reset the connection (RST), before answering or after `after` body bytes."""
        return self.add(Fault(match, times, drop="reset", after=after))

    def trickle(self, match: str, chunk: int = 1024, delay: float = 0.01, times: int = 1) -> Fault:
        """Send the body slowly: `chunk` bytes every `delay` seconds."""
        return self.add(Fault(match, times, chunk=chunk, delay=delay))

    def corrupt(self, match: str, offset: int = 0, times: int = 1) -> Fault:
        """Invert one byte of the body, at `offset`."""
        return self.add(Fault(match, times, flip=offset))

    def ignore_range(self, match: str, times: int = 1) -> Fault:
        """Forward without the Range header: the client gets 200 and the whole body."""
        return self.add(Fault(match, times, whole=True))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, path: str) -> Fault | None:
        """The fault the request for `path` meets, counted as used; also counts the request."""
        with self.lock:
            self.paths[path] += 1
            for fault in self.faults:
                if fault.match in path and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    # -- counters

    def served_bytes(self, digest: str) -> int:
        """Body bytes of blob `digest` handed to clients' connections so far, over all its GETs."""
        with self.lock:
            return self.served[digest]

    def hits(self, match: str = "") -> int:
        """Requests whose path contains `match`."""
        with self.lock:
            return sum(count for path, count in self.paths.items() if match in path)

    def count_served(self, path: str, size: int) -> None:
        _, found, digest = path.partition("/blobs/")
        if found and digest.startswith("sha256:"):
            with self.lock:
                self.served[digest] += size


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as registries and their clients use it
    timeout = IDLE_TIMEOUT

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    def setup(self) -> None:
        super().setup()
        with self.proxy.lock:
            self.proxy.connections += 1
            self.proxy.open_sockets.add(self.connection)

    def finish(self) -> None:
        with self.proxy.lock:
            self.proxy.open_sockets.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests assert on counters, not on a log."""

    def end_headers(self) -> None:
        if self.close_connection:  # the client asked for it: say so, or it may reuse the connection
            self.send_header("Connection", "close")
        super().end_headers()

    def relay(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length) if length else None
        fault = self.proxy.take_fault(self.path) or Fault(times=0)
        if fault.status is not None:
            self.answer_status(fault)
        elif fault.drop and fault.after is None:
            self.drop(fault.drop)
        else:
            self.forward(body, fault)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = relay

    def answer_status(self, fault: Fault) -> None:
        body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by faultproxy"}]}'
        self.send_response(fault.status)
        if fault.retry_after is not None:
            self.send_header("Retry-After", fault.retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def forward(self, body: bytes | None, fault: Fault) -> None:
        upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            dropped = HOP_BY_HOP | ({"range"} if fault.whole else set())
            headers = {name: value for name, value in self.headers.items() if name.lower() not in dropped}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            length = response.getheader("Content-Length")
            content = None if length is not None else response.read()  # re-sent with a length, not chunked
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            if content is not None:
                self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.send_body(response, content, fault)
        finally:
            upstream.close()

    def send_body(self, response: http.client.HTTPResponse, content: bytes | None, fault: Fault) -> None:
        sent = 0
        while piece := (content[sent : sent + fault.chunk] if content is not None else response.read(fault.chunk)):
            if fault.flip is not None and sent <= fault.flip < sent + len(piece):
                index = fault.flip - sent
                piece = piece[:index] + bytes([piece[index] ^ 0xFF]) + piece[index + 1 :]
            if fault.after is not None and sent + len(piece) >= fault.after:
                self.write(piece[: fault.after - sent])
                self.drop(fault.drop)
                return
            self.write(piece)
            sent += len(piece)
            time.sleep(fault.delay)

    def write(self, data: bytes) -> None:
        self.proxy.count_served(self.path, len(data))  # first: the client may have it all before write() returns
        self.wfile.write(data)

    def drop(self, how: str) -> None:
        """Ends the connection now: with FIN ("close") or RST ("reset", SO_LINGER 0)."""
        self.close_connection = True
        if how == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket's file descriptor closes only with its last reader
            self.connection.close()
        else:
            self.connection.shutdown(socket.SHUT_RDWR)
