"""A small HTTP server on 127.0.0.1 for tests, serving from a daemon thread of the test process."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STOP_TIMEOUT = 10
POLL = 0.05  # seconds between the serving thread's looks at stop(): socketserver's 0.5 s slows every test


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, quiet, with `owner` (the LoopbackServer) at hand."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is closed after this many seconds

    @property
    def owner(self):
        return self.server.owner

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the tests read what they need from the owner's records


class LoopbackServer:
    """Serves `handler` on a free 127.0.0.1 port until stop(); a context manager."""

    handler: type[Handler] = Handler

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(POLL,), name=type(self).__name__, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(STOP_TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
