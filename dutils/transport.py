"""The HTTP transport under registry.py: sessions that take nothing from the environment but its proxies, response
headers bounded in time as a whole, and transport failures classified from their exception objects."""

import contextlib
import os
import re
import socket
import ssl
import threading
from typing import TypeVar

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import Error

NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"})  # OpenSSL's, for plain text
E = TypeVar("E", bound=BaseException)


class NotTls(Error):
    """The server answered a TLS handshake with plain text: a loopback registry is then asked over plain HTTP."""


class Retryable(Exception):
    """A failure that trying again may mend: a busy server, a broken, stalled or garbled transfer."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class HeadersInTime:
    """Mixed into urllib3's connections: all response headers must come within the read timeout, which http.client
    applies to each recv alone (a server sending a byte every few seconds would hold us forever)."""

    def getresponse(self):
        timer = threading.Timer(self.timeout, cut, (self.sock,))
        timer.start()
        try:
            return super().getresponse()
        finally:
            timer.cancel()


def cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing to cut
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket under TLS too: the reader wakes with an error


def timed_pool(pool: type, connection: type) -> type:
    return type(pool.__name__, (pool,), {"ConnectionCls": type(connection.__name__, (HeadersInTime, connection), {})})


POOLS = {
    "http": timed_pool(HTTPConnectionPool, HTTPConnection),
    "https": timed_pool(HTTPSConnectionPool, HTTPSConnection),
}


class TimedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with HeadersInTime connections, direct and through an HTTP(S) proxy."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = POOLS

    def proxy_manager_for(self, proxy: str, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS managers have pools of their own
            manager.pool_classes_by_scheme = POOLS
        return manager


def trusted_certificates(verify: bool | str) -> bool | str:
    """A CA bundle given by the user, else the system's trust store as OpenSSL finds it ($SSL_CERT_FILE, _DIR): where
    administrators install their CAs, as docker and skopeo read it (requests alone would use certifi's bundle)."""
    if verify is True:
        system = ssl.get_default_verify_paths()
        return system.cafile or system.capath or True
    if verify and not os.path.exists(verify):
        raise Error(f"CA bundle {verify} does not exist", "give --ca-bundle a PEM file of the registry's CA")
    return verify


def transport_failure(server: str, err: requests.RequestException) -> Error | Retryable:
    """What a transport error means: a TLS failure or a host name that no retry can mend, else Retryable."""
    if caused_by(err, socket.gaierror):
        return Error(f"cannot find the host {server}", "check the registry name and your network")
    tls = caused_by(err, ssl.SSLError)  # OpenSSL's own, under requests' and urllib3's wrappers
    if isinstance(tls, ssl.SSLCertVerificationError):
        return Error(
            f"cannot verify the TLS certificate of {server}: {tls.verify_message}",
            "give the registry's CA certificate with --ca-bundle FILE, or install it in the system's trust store",
        )
    if tls and tls.reason in NOT_TLS:
        return NotTls(f"{server} does not speak TLS ({tls.reason})", "for a plain-HTTP registry, pass --insecure")
    if tls and tls.library == "X509":
        return Error(f"cannot use the CA certificates for {server}: {tls.reason}", "give --ca-bundle a PEM file")
    if isinstance(err, requests.exceptions.InvalidHeader):  # Content-Length twice, a header urllib3 cannot parse
        return Error(f"{server} sent invalid response headers", "this is not what a registry sends")
    if isinstance(err, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return Retryable(transport_reason(err))  # SSLError is one: a handshake cut short may go through next time
    return Error(f"cannot ask {server}: {transport_reason(err)}")


def caused_by(err: BaseException | None, kind: type[E]) -> E | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def transport_reason(err: BaseException) -> str:
    """The reason of a transport error in a few words, without urllib3's object reprs."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out|Connection (?:aborted|broken|reset)[^'\")]*", str(err))
    return found.group(0).strip(" .,") if found else type(err).__name__


def new_session() -> requests.Session:
    """No ~/.netrc (its passwords would go where d-utils' lookup sends none), no $REQUESTS_CA_BUNDLE over the verify
    of each request; the environment's proxies are looked up for each request (Registry.send)."""
    session = requests.Session()
    session.trust_env = False
    session.headers["Accept-Encoding"] = "identity"  # digests are of the bytes stored: no gzip
    session.mount("http://", TimedAdapter())
    session.mount("https://", TimedAdapter())
    return session
