"""The registry HTTP API: the only module that imports requests.

Each request states the statuses it expects; auth challenges, redirects, retries and transport errors are handled
here once, so callers see a response they asked for or an Error that says what failed.
"""

import base64
import email.utils
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as TransferError

from .auth import Credentials
from .errors import Error
from .reference import Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# Strict registries answer 404 when the index types are missing: always ask for all four.
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
MAX_MANIFEST = 4 << 20
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSPORT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
CHUNK = 1 << 20
TIMEOUT = (15, 60)  # connect, read: a stalled blob download is retried rather than waited on forever


class BlobUnknown(Error):
    """The registry does not have a blob: for a non-distributable layer, its URLs are asked instead."""


class Interrupted(Exception):
    """A transfer that broke off midway; the caller resumes it from the bytes it has."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's Retry-After is honoured up to `max_wait` seconds."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_wait: float = 600.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_wait)
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


class Registry:
    """One repository on one registry, with the credentials to read it."""

    def __init__(
        self,
        ref: Reference,
        credentials: Credentials | None = None,
        *,
        plain_http: bool = False,
        verify: bool | str = True,
        retry: RetryPolicy = RetryPolicy(),
        notify: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.ref = ref
        self.credentials = credentials
        self.base = f"{'http' if plain_http else 'https'}://{ref.api_host}"
        self.verify = trusted_certificates(verify)  # per request: a session-level verify loses to REQUESTS_CA_BUNDLE
        self.retry = retry
        self.notify = notify
        self.session = requests.Session()
        self.authorization: str | None = None
        self.auth_lock = threading.Lock()

    # -- the API

    def ping(self) -> None:
        """Find out how the registry wants us to authenticate, and do it now (the `auth` task)."""
        self.request("GET", "/v2/", expected={200}, what="the registry").close()  # request() answers the 401

    def get_manifest(self, wanted: str) -> tuple[bytes, str]:
        """The manifest bytes and media type for a tag or digest."""
        what = f"manifest {self.ref.repository}:{wanted}" if not wanted.startswith("sha256:") else f"manifest {wanted}"
        response = self.request(
            "GET",
            f"/v2/{self.ref.repository}/manifests/{wanted}",
            expected={200},
            what=what,
            headers={"Accept": ACCEPT},
        )
        with response:
            body = response.raw.read(MAX_MANIFEST + 1, decode_content=True)
        if len(body) > MAX_MANIFEST:
            raise Error(
                f"{what} from {self.ref.registry} is larger than {MAX_MANIFEST} bytes", "this is not a manifest"
            )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return body, media_type

    def open_blob(self, digest: str, start: int = 0, url: str | None = None) -> requests.Response:
        """A streaming response for a blob from byte `start`: status 206 if the server honoured the range, else 200.

        From the registry, or from `url` (a non-distributable layer's), where no credentials of ours are sent.
        """
        headers = {"Range": f"bytes={start}-"} if start else {}
        return self.request(
            "GET",
            url or f"/v2/{self.ref.repository}/blobs/{digest}",
            expected={200, 206},
            what=f"blob {digest}",
            headers=headers,
        )

    def read_blob(self, digest: str, start: int, url: str | None = None) -> tuple[int, Iterator[bytes]]:
        """(first byte offset, chunks) of a blob from `start`; a broken transfer raises Interrupted.

        The offset is 0 when the server ignored our Range. `read1` hands over whatever has arrived, so bytes
        received before a connection breaks are kept rather than lost with a half-filled buffer.
        """
        response = self.open_blob(digest, start, url)
        offset = content_range_start(response) if response.status_code == 206 else 0

        def chunks() -> Iterator[bytes]:
            try:
                while chunk := response.raw.read1(CHUNK):
                    yield chunk
            except (TransferError, OSError) as err:
                raise Interrupted(describe(err)) from None
            finally:
                response.close()

        return offset, chunks()

    # -- one request, with auth, redirects and retries

    def request(self, method: str, path: str, *, expected: set[int], what: str, headers: dict | None = None):
        url = urljoin(self.base, path)
        where = f"{what} at {urlsplit(url).netloc}"  # the registry, or a non-distributable layer's own host
        failures = 0
        reauthenticated = False
        while True:
            try:
                response = self.send(method, url, headers or {})
            except TRANSPORT_ERRORS as err:
                if final := tls_failure(self.ref.registry, err):
                    raise final from None  # trying again cannot make a certificate trusted
                failures = self.wait_before_retry(failures, where, describe(err), None)
                continue
            if response.status_code == 401 and not reauthenticated and "WWW-Authenticate" in response.headers:
                # First contact, or a token that expired in the middle of a long pull: authenticate and go on,
                # unless that gives the authorization just refused (wrong Basic credentials).
                used = response.request.headers.get("Authorization")
                self.authenticate(response, used)
                reauthenticated = True
                if self.authorization != used:
                    continue
            if response.status_code in RETRY_STATUSES:
                reason = f"HTTP {response.status_code}"
                failures = self.wait_before_retry(failures, where, reason, retry_after(response))
                continue
            if response.status_code in expected:
                return response
            raise self.failure(response, what)

    def send(self, method: str, url: str, headers: dict) -> requests.Response:
        """Send, following redirects by hand: the registry's Authorization never goes to another host (a CDN)."""
        for _ in range(10):
            sent = dict(headers)  # Range included: a resumed download stays resumed on the CDN
            if self.authorization and urlsplit(url)[:2] == urlsplit(self.base)[:2]:
                sent["Authorization"] = self.authorization
            response = self.session.request(
                method, url, headers=sent, stream=True, allow_redirects=False, timeout=TIMEOUT, verify=self.verify
            )
            if response.status_code not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                return response
            response.close()
            url = urljoin(url, response.headers["Location"])
        raise Error(f"too many redirects from {self.ref.registry} for {url}")

    def wait_before_retry(self, failures: int, what: str, reason: str, after: float | None) -> int:
        if failures + 1 >= self.retry.attempts or "[Errno -2]" in reason:  # -2: the host name does not exist
            raise Error(
                f"giving up on {what} after {failures + 1} attempts: {reason}",
                "check the registry name and your network, then run the same command again",
            )
        delay = self.retry.delay(failures, after)
        self.notify(
            f"{what}: {reason}; retrying in {delay:.0f} s" + (" (the registry asked us to wait)" if after else "")
        )
        time.sleep(delay)
        return failures + 1

    # -- authentication

    def authenticate(self, challenge: requests.Response, used: str | None) -> None:
        """Answer a 401: Bearer token flow or Basic credentials. Threads share one token."""
        with self.auth_lock:
            if self.authorization != used:
                return  # another thread has already renewed it
            scheme, params = parse_challenge(challenge.headers.get("WWW-Authenticate", ""))
            if scheme == "basic":
                if not self.credentials:
                    raise Error(f"{self.ref.registry} requires a login", "pass --username and --password-stdin")
                self.authorization = basic_header(self.credentials)
            elif scheme == "bearer" and "realm" in params:
                self.authorization = f"Bearer {self.fetch_token(params)}"
            else:
                raise Error(f"{self.ref.registry} asked for an unsupported authentication scheme {scheme!r}")

    def fetch_token(self, params: dict[str, str]) -> str:
        query = {"scope": params.get("scope") or self.ref.scope}
        if "service" in params:
            query["service"] = params["service"]
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            response = self.session.get(params["realm"], params=query, auth=auth, timeout=TIMEOUT, verify=self.verify)
        except requests.RequestException as err:  # a bad realm URL included
            server = f"the token server of {self.ref.registry}"
            raise tls_failure(server, err) or Error(f"cannot reach {server}: {describe(err)}") from None
        if response.status_code in (401, 403):
            raise Error(f"access denied by the token server of {self.ref.registry}", "check your credentials")
        if response.status_code != 200:
            raise Error(f"the token server of {self.ref.registry} answered HTTP {response.status_code}")
        try:
            answer = response.json()
            return answer.get("token") or answer["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise Error(f"the token server of {self.ref.registry} sent no token") from None

    # -- errors

    def repository_exists(self) -> bool:
        """Whether the repository is known, to tell an unknown image from an unknown tag."""
        try:
            response = self.request("GET", f"/v2/{self.ref.repository}/tags/list?n=1", expected={200, 404}, what="tags")
        except Error:
            return True  # cannot tell: say the less drastic thing
        return not (response.status_code == 404 and "NAME_UNKNOWN" in error_codes(response))

    def failure(self, response: requests.Response, what: str) -> Error:
        codes = error_codes(response)
        status = response.status_code
        response.close()
        where = f"{self.ref.registry}/{self.ref.repository}"
        if status == 404 and ("NAME_UNKNOWN" in codes or what.startswith("manifest") and not self.repository_exists()):
            return Error(f"unknown image {where}", "check the image name")
        if status == 404 and what.startswith("manifest"):
            return Error(f"unknown {what} in {where}", "check the tag or digest")
        if status == 404 and what.startswith("blob"):
            return BlobUnknown(f"{what} is missing from {where}", "the image is incomplete on this registry")
        if status in (401, 403) and self.credentials:
            return Error(
                f"access denied to {where} for {self.credentials.username} (HTTP {status}): "
                "the image does not exist, or these credentials may not read it",
                "check the image name, the user name and the password",
            )
        if status in (401, 403):
            return Error(
                f"access denied to {where} (HTTP {status}): the image does not exist or needs a login",
                "check the name, or pass --username and --password-stdin",
            )
        detail = f" ({', '.join(codes)})" if codes else ""
        return Error(f"{what} from {self.ref.registry}: unexpected HTTP {status}{detail}")


def trusted_certificates(verify: bool | str) -> bool | str:
    """What `verify` means to requests: a CA bundle given by the user, else the system's trust store.

    requests alone would use certifi's bundle (or $REQUESTS_CA_BUNDLE); the system's store, as OpenSSL finds it
    ($SSL_CERT_FILE, $SSL_CERT_DIR honoured), is where administrators install their CAs, as docker and skopeo read it.
    """
    if verify is True:
        system = ssl.get_default_verify_paths()
        return system.cafile or system.capath or True
    if verify and not os.path.exists(verify):
        raise Error(f"CA bundle {verify} does not exist", "give --ca-bundle a PEM file of the registry's CA")
    return verify


def tls_failure(server: str, err: Exception) -> Error | None:
    """The Error for a TLS failure that no retry can mend, if `err` is one (OpenSSL's code tells)."""
    found = re.search(r"\[(SSL|X509): (\w+)\] ([^(']*)", str(err))
    if not isinstance(err, requests.exceptions.SSLError) or not found:
        return None
    library, code, reason = found.group(1), found.group(2), found.group(3).strip()
    if code == "CERTIFICATE_VERIFY_FAILED":
        return Error(
            f"cannot verify the TLS certificate of {server}: {reason}",
            "give the registry's CA certificate with --ca-bundle FILE, or install it in the system's trust store",
        )
    if code in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
        return Error(f"{server} does not speak TLS ({reason})", "for a plain-HTTP registry, pass --insecure")
    if library == "X509":
        return Error(f"cannot use the CA certificates for {server}: {reason}", "give --ca-bundle a PEM file")
    return None


def content_range_start(response: requests.Response) -> int:
    found = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if not found:
        response.close()
        raise Interrupted("a partial response without a valid Content-Range")
    return int(found.group(1))


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def basic_header(credentials: Credentials) -> str:
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    return f"Basic {token}"


def retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    response.close()
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_codes(response: requests.Response) -> list[str]:
    """The distribution spec's error codes in a failed response's body, if any."""
    try:
        return [e.get("code", "") for e in response.json().get("errors", [])]
    except (ValueError, AttributeError, requests.RequestException):
        return []


def describe(err: BaseException) -> str:
    """The reason of a transport error in a few words, without urllib3's object reprs."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out|Connection (?:aborted|broken|reset)[^'\")]*", text)
    return found.group(0).strip(" .,") if found else type(err).__name__
