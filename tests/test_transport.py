"""The HTTP transport: sessions that read no ~/.netrc but honour the proxy variables, response headers bounded in
time as a whole (a server trickling them cannot hold a request), TLS failures classified from exception objects."""

import socket
import ssl
import threading
import time

import pytest
import requests
from httpd import Handler, LoopbackServer

from dutils.errors import Error
from dutils.transport import NotTls, Retryable, new_session, transport_failure


class Recorder(LoopbackServer):
    class handler(Handler):
        def do_GET(self) -> None:
            with self.owner.lock:
                self.owner.seen.append(dict(self.headers))
            self.answer(200, b"{}")

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        super().__init__()


def test_a_session_sends_no_netrc_password(tmp_path, monkeypatch):
    netrc = tmp_path / ".netrc"
    netrc.write_text("default login someone password from-netrc\nmachine 127.0.0.1 login me password also\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc))
    with Recorder() as server:
        new_session().get(f"{server.url}/v2/", timeout=10).close()
        assert requests.Session().get(f"{server.url}/v2/", timeout=10).request.headers.get("Authorization")  # it would
    assert server.seen and "Authorization" not in server.seen[0]
    assert server.seen[0]["Accept-Encoding"] == "identity"


def trickling_server(stop: threading.Event) -> socket.socket:
    """Accepts one connection, then sends a status line and headers one byte every 0.2 s, never ending them."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(4096)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                if stop.wait(0.2):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:  # the client hung up, as it should
                    return

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_read_timeout():
    stop = threading.Event()
    listener = trickling_server(stop)
    started = time.monotonic()
    try:
        with pytest.raises(requests.ConnectionError):
            new_session().get(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=(5, 0.6))
        assert time.monotonic() - started < 3  # each recv came within 0.6 s: only the whole is bounded
    finally:
        stop.set()
        listener.close()


# -- TLS failures told apart by OpenSSL's exception objects, whatever their text says


def wrapped(inner: ssl.SSLError) -> requests.exceptions.SSLError:
    """`inner` under requests' SSLError, chained as urllib3 and requests chain it; the outer text says nothing."""
    try:
        try:
            raise inner
        except ssl.SSLError as err:
            raise requests.exceptions.SSLError("some text that names no reason") from err
    except requests.exceptions.SSLError as outer:
        return outer


def ssl_error(kind: type[ssl.SSLError], library: str, reason: str, **attributes: str) -> ssl.SSLError:
    err = kind(1, "text that may change with OpenSSL")
    err.library, err.reason = library, reason
    for name, value in attributes.items():
        setattr(err, name, value)
    return err


@pytest.mark.parametrize(
    ("inner", "kind", "says"),
    [
        (
            ssl_error(ssl.SSLCertVerificationError, "SSL", "CERTIFICATE_VERIFY_FAILED", verify_message="self-signed"),
            Error,
            "cannot verify the TLS certificate of h: self-signed",
        ),
        (ssl_error(ssl.SSLError, "SSL", "WRONG_VERSION_NUMBER"), NotTls, "h does not speak TLS"),
        (ssl_error(ssl.SSLError, "SSL", "RECORD_LAYER_FAILURE"), NotTls, "h does not speak TLS"),
        (ssl_error(ssl.SSLError, "X509", "NO_CERTIFICATE_OR_CRL_FOUND"), Error, "cannot use the CA certificates"),
        (ssl_error(ssl.SSLError, "SSL", "UNEXPECTED_EOF_WHILE_READING"), Retryable, "SSLError"),
    ],
)
def test_tls_failures_are_classified_from_the_exception_chain(inner, kind, says):
    found = transport_failure("h", wrapped(inner))
    assert type(found) is kind and says in str(found)
