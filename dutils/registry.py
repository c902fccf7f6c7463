"""The registry HTTP API, with transport.py the only modules importing requests: auth challenges, redirects, retries
handled once; non-blob bodies bounded by size (never decompressed), every wait by one Deadline."""

import base64
import contextlib
import email.utils
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as TransferError

from .auth import Credentials
from .errors import Error, printable
from .oci import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from .reference import Reference, checked_url, shown_url
from .store import load_json
from .transport import NotTls, Retryable, new_session, transport_failure, transport_reason, trusted_certificates

# Strict registries answer 404 when the index types are missing: always ask for all four.
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
MAX_MANIFEST = 4 << 20
MAX_BODY = 64 << 10  # error bodies and token replies
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 10
CHUNK = 1 << 20
CONNECT_TIMEOUT = 15
MIN_RATE = 512  # bytes a second, over a stall window: a slower transfer counts as a cut connection
PROGRESS = 64 << 10  # bytes a retried download must add to the most it ever kept for its failures to be forgiven
NO_AUTH = ("", "")  # for `Registry.send`: an origin that no URL has
TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")  # what may follow "Bearer ": visible ASCII
ERROR_CODE = re.compile(r"[A-Z_]{1,64}")
T = TypeVar("T")


class BlobUnknown(Error):
    """The registry does not have a blob: for a non-distributable layer, its URLs are asked instead."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff with jitter, Retry-After honoured up to `max_wait` s; `patience` (--timeout): seconds of no progress."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_wait: float = 600.0
    patience: float = 300.0

    @property
    def window(self) -> float:
        """Seconds over which a transfer must bring MIN_RATE bytes a second, and the socket read timeout."""
        return min(30.0, self.patience)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_wait)
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


class Deadline:
    """The one bound on every wait (connecting, sending, response headers, token requests, retries, Retry-After):
    `patience` (--timeout) seconds after the last progress. Body bytes are progress (see `retrying`); headers not."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.renew()

    def renew(self) -> None:
        self.end = time.monotonic() + self.patience

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def timeouts(self, window: float) -> tuple[float, float]:
        """(connect, read) seconds for one request; HeadersInTime makes the read timeout bound all of its headers."""
        if not (left := self.left()):
            raise Retryable(f"no time left of the {self.patience:.0f} s without progress")
        return min(CONNECT_TIMEOUT, left), min(window, left)


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
        # Loopback registries as Docker treats them: HTTPS first, plain HTTP when the server does not speak TLS.
        self.fallback = f"http://{ref.api_host}" if ref.is_local and not plain_http else None
        self.verify = trusted_certificates(verify)  # per request: a session-level verify loses to REQUESTS_CA_BUNDLE
        self.retry = retry
        self.notify = notify
        self.local = threading.local()  # a Session per thread: requests does not promise that one is thread-safe
        self.authorization: str | None = None
        self.realm: str | None = None  # the token realm of the registry's own /v2/ challenge: ours get credentials
        self.auth_lock = threading.Lock()

    # -- the API

    def ping(self) -> None:
        """Find out how the registry wants us to authenticate, and do it now (the `auth` task). Its answer is read out
        (as any, bounded) so that its connection serves the next request: a TLS handshake fewer for a no-op."""

        def attempt() -> None:
            with self.request("/v2/", what="the registry") as response, contextlib.suppress(Error, Retryable):
                self.read_body(response, MAX_BODY, "the registry's answer")  # what it says does not matter

        self.retrying(f"the registry {self.ref.registry}", attempt)

    def get_manifest(self, wanted: str) -> tuple[bytes, str]:
        what = f"manifest {self.ref.repository}:{wanted}" if not wanted.startswith("sha256:") else f"manifest {wanted}"

        def attempt() -> tuple[bytes, str]:
            path = f"/v2/{self.ref.repository}/manifests/{wanted}"
            missing = lambda: self.unknown_manifest(what)  # noqa: E731
            with self.request(path, what=what, headers={"Accept": ACCEPT}, missing=missing) as response:
                body = self.read_body(response, MAX_MANIFEST, f"{what} from {self.ref.registry}")
            return body, response.headers.get("Content-Type", "").split(";")[0].strip()

        return self.retrying(f"{what} from {self.ref.registry}", attempt)

    def download_blob(self, digest: str, sink, url: str | None = None) -> None:
        """Into `sink` (a PartialBlob) from its `have` bytes on, resuming; from `url` (a foreign layer's): no credentials."""
        what = f"blob {digest}"
        url = url and checked_url(url, f"the URL of {what}")
        where = f"blob {digest[:19]} from {urlsplit(url).netloc if url else self.ref.registry}"
        missing = lambda: BlobUnknown(  # noqa: E731
            f"{what} is missing from {self.ref.registry}/{self.ref.repository}",
            "the image is incomplete on this registry",
        )

        def attempt() -> None:
            start = sink.have
            headers = {"Range": f"bytes={start}-"} if start else {}
            path = url or f"/v2/{self.ref.repository}/blobs/{digest}"
            with self.request(path, what=what, expected={200, 206}, headers=headers, missing=missing) as response:
                refuse_encoded(response, what)
                if response.status_code == 206:
                    check_range(response, start)
                elif start:
                    sink.restart()  # the server ignored our Range: its body starts at byte 0
                for chunk in self.chunks(response):
                    sink.write(chunk)
            if sink.missing:
                raise Retryable("the connection closed early")

        self.retrying(where, attempt, kept=lambda: sink.have)

    # -- the one retry loop

    def retrying(self, where: str, attempt: Callable[[], T], kept: Callable[[], int] = lambda: 0) -> T:
        """`attempt()` until it succeeds, gives a final Error, or `retry.attempts` failures or the Deadline pass without
        progress: bytes kept beyond the most ever kept, so a server going back and forth gives up."""
        failures, best, deadline = 0, kept(), Deadline(self.retry.patience)
        self.local.deadline = deadline  # for every request of this thread's attempts, token requests included
        self.local.session = getattr(self.local, "session", None) or new_session()
        while True:
            try:
                return attempt()
            except Retryable as err:
                if kept() >= best + PROGRESS:
                    failures, best = 0, kept()
                    deadline.renew()
                failures += 1
                delay = self.retry.delay(failures - 1, err.retry_after)
                if failures >= self.retry.attempts or delay >= deadline.left():
                    waited = deadline.patience - deadline.left()
                    late = f"; waiting {delay:.0f} s more would pass --timeout" if 0 < deadline.left() < delay else ""
                    raise Error(
                        f"giving up on {where} after {failures} attempts in {waited:.0f} s without progress: {err}{late}",
                        "check the registry name and your network, then run the same command again",
                    ) from None
                asked = " (the registry asked us to wait)" if err.retry_after else ""
                self.notify(printable(f"{where}: {err}; retrying in {delay:.0f} s{asked}"))
                time.sleep(delay)

    # -- one request: auth and redirects

    def request(
        self,
        path: str,
        *,
        what: str,
        expected: set[int] = frozenset({200}),
        headers: dict | None = None,
        missing: Callable[[], Error] | None = None,
    ) -> requests.Response:
        """One attempt, authenticated as the registry asks: a response of an expected status, or Error, or Retryable."""
        url = urljoin(self.base, path)
        try:
            response = self.send(url, headers or {}, what)
        except NotTls:
            if not (self.fallback and url.startswith(self.base)):
                raise
            self.base, self.fallback, response = self.fallback, None, None
        if response is None:  # asked again outside the handler: TLS errors of later requests must not chain to it
            return self.request(path, what=what, expected=expected, headers=headers, missing=missing)
        self.fallback = None  # the registry answered: its scheme is settled (a CDN's failure must not change it)
        if response.status_code == 401 and self.answer_challenge(response):
            response = self.send(url, headers or {}, what)
        if response.status_code in expected:
            return response
        if response.status_code in RETRY_STATUSES:
            response.close()
            raise Retryable(f"HTTP {response.status_code}", retry_after(response.headers))
        raise self.failure(response, what, missing)

    def send(self, url: str, headers: dict, what: str, auth: tuple[str, str] | None = None) -> requests.Response:
        """Send, following redirects here: requests would read each redirect's body into memory, decompressed (a gzip
        bomb), and follow any scheme. `auth` (origin, header; by default the registry's) goes to that origin only."""
        if auth is None and self.authorization:
            auth = (origin(self.base), self.authorization)
        for _ in range(MAX_REDIRECTS):
            # Range included: a resumed download stays resumed on the CDN; origins name schemes: https -> http drops it
            sent = {**headers, "Authorization": auth[1]} if auth and origin(url) == auth[0] else headers
            timeout = self.local.deadline.timeouts(self.retry.window)
            try:
                response = self.local.session.get(
                    url, headers=sent, stream=True, allow_redirects=False, timeout=timeout, verify=self.verify,
                    proxies=requests.utils.get_environ_proxies(url),  # $NO_PROXY, $HTTP(S)_PROXY, as trust_env does
                )  # fmt: skip
            except requests.RequestException as err:
                raise transport_failure(urlsplit(url).netloc, err) from None
            except ValueError:  # requests parses a Location even when it does not follow it
                raise Error(f"the redirect of {what} is not a plain http(s) URL", "only http(s) is followed") from None
            if not response.is_redirect:  # 301, 302, 303, 307 or 308 with a Location
                return response
            response.close()
            url = checked_url(response.headers["Location"], f"the redirect of {what}", url)
        raise Error(f"too many redirects for {what}, last to {shown_url(url)}")

    def chunks(self, response: requests.Response) -> Iterator[bytes]:
        """The body as it arrives, undecoded, or Retryable; `read1` hands over whatever has arrived: nothing is lost."""
        window = self.retry.window
        started, got = time.monotonic(), 0
        try:
            while chunk := response.raw.read1(CHUNK):
                yield chunk
                got += len(chunk)
                if time.monotonic() - started >= window:
                    if got < MIN_RATE * window:
                        raise Retryable(f"stalled: {got} bytes in {window:.0f} s")
                    started, got = time.monotonic(), 0
        except (TransferError, OSError) as err:
            raise Retryable(transport_reason(err)) from None

    def read_body(self, response: requests.Response, cap: int, what: str) -> bytes:
        """A non-blob body: at most `cap` bytes, never decompressed."""
        refuse_encoded(response, what)
        body = bytearray()
        for chunk in self.chunks(response):
            body += chunk
            if len(body) > cap:
                raise Error(f"{what} is larger than {cap} bytes", "this is not what a registry sends")
        return bytes(body)

    # -- authentication

    def answer_challenge(self, response: requests.Response) -> bool:
        """Authenticate after a 401 from the registry itself (first contact, or a token that expired); whether to
        send the request again. A 401 from any other host gets nothing of ours: it is an error (see `failure`)."""
        header = response.headers.get("WWW-Authenticate", "")
        if origin(response.url) != origin(self.base) or not header:
            return False
        used = response.request.headers.get("Authorization")
        scheme, params = parse_challenge(header)
        response.close()
        with self.auth_lock:
            if self.authorization != used:
                return True  # another thread has already renewed it
            if urlsplit(response.url).path == "/v2/" and self.realm is None:
                self.realm = params.get("realm", "")
            if scheme == "basic":
                if not self.credentials:
                    raise Error(f"{self.ref.registry} requires a login", "pass --username and --password-stdin")
                self.authorization = basic_header(self.credentials)
            elif scheme == "bearer" and "realm" in params:
                self.authorization = f"Bearer {self.fetch_token(params)}"
            else:
                raise Error(f"{self.ref.registry} asked for an unsupported authentication scheme {scheme!r}")
            return self.authorization != used  # the same again: those credentials were refused

    def fetch_token(self, params: dict[str, str]) -> str:
        """A Bearer token from the realm; with our credentials only when it is the registry's own /v2/ realm."""
        server = f"the token server of {self.ref.registry}"
        realm = checked_url(params["realm"], f"the token realm of {self.ref.registry}")
        query = {"scope": params.get("scope") or self.ref.scope}
        if "service" in params:
            query["service"] = params["service"]
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        if self.credentials and self.realm is None:  # which realm /v2/ names: asked once, unauthenticated
            with self.send(urljoin(self.base, "/v2/"), {}, "the registry", NO_AUTH) as response:
                self.realm = parse_challenge(response.headers.get("WWW-Authenticate", ""))[1].get("realm", "")
        # never in clear text what was asked for over TLS: a plain-HTTP realm is asked anonymously, as any stranger
        clear = self.base.startswith("https:") and realm.startswith("http:")
        own = self.credentials and realm == self.realm and not clear
        auth = (origin(realm), basic_header(self.credentials)) if own else NO_AUTH
        with self.send(url, {}, server, auth) as response:
            if response.status_code in RETRY_STATUSES:
                raise Retryable(f"{server}: HTTP {response.status_code}", retry_after(response.headers))
            if response.status_code in (401, 403):
                raise Error(f"access denied by {server}", "check your credentials")
            if response.status_code != 200:
                raise Error(f"{server} answered HTTP {response.status_code}")
            body = self.read_body(response, MAX_BODY, f"the answer of {server}")
        try:
            answer = load_json(body)
            token = answer.get("token") or answer["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise Error(f"{server} sent no token") from None
        expires = answer.get("expires_in", 60)
        if not isinstance(token, str) or not TOKEN.fullmatch(token):
            raise Error(f"{server} sent a token that is not visible ASCII text of at most 8192 characters")
        if type(expires) not in (int, float) or not 0 <= expires < 1 << 31:
            raise Error(f"{server} sent an expires_in that is not a number of seconds: {str(expires)[:40]}")
        return token

    # -- errors

    def unknown_manifest(self, what: str) -> Error:
        """An unknown image or an unknown tag, as the repository's tag list tells (the less drastic when it cannot)."""
        where = f"{self.ref.registry}/{self.ref.repository}"
        tags = f"/v2/{self.ref.repository}/tags/list?n=1"
        with contextlib.suppress(Error, Retryable), self.request(tags, expected={200, 404}, what="tags") as response:
            if response.status_code == 404 and "NAME_UNKNOWN" in self.error_codes(response):
                return Error(f"unknown image {where}", "check the image name")
        return Error(f"unknown {what} in {where}", "check the tag or digest")

    def failure(self, response: requests.Response, what: str, missing: Callable[[], Error] | None) -> Error:
        status, host = response.status_code, urlsplit(response.url).netloc
        codes = self.error_codes(response)
        detail = f" ({', '.join(codes)})" if codes else ""
        where = f"{self.ref.registry}/{self.ref.repository}"
        if origin(response.url) != origin(self.base):  # a CDN, a foreign layer's host: never given our credentials
            hint = f"d-pull sends credentials only to {self.ref.registry}" if status in (401, 403) else ""
            return Error(f"{what} at {host}: HTTP {status}{detail}", hint)
        if status == 404 and "NAME_UNKNOWN" in codes:
            return Error(f"unknown image {where}", "check the image name")
        if status == 404 and missing:
            return missing()
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
        plain = status == 400 and response.url.startswith("http:")  # what TLS servers answer to plain HTTP
        hint = "if the registry speaks HTTPS only, leave out --insecure" if plain else ""
        return Error(f"{what} from {self.ref.registry}: unexpected HTTP {status}{detail}", hint)

    def error_codes(self, response: requests.Response) -> list[str]:
        """The distribution spec's error codes in a failed response's body, if any (read up to MAX_BODY)."""
        with response, contextlib.suppress(Error, Retryable, ValueError, TypeError, AttributeError):
            errors = load_json(self.read_body(response, MAX_BODY, "an error")).get("errors")
            return [e["code"] for e in errors if isinstance(e, dict) and ERROR_CODE.fullmatch(str(e.get("code")))]
        return []


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def refuse_encoded(response: requests.Response, what: str) -> None:
    """We ask for bytes as stored (Accept-Encoding: identity); a proxy that compresses anyway is named, since
    storing, hashing or decompressing its answer would be wrong or unbounded."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Error(
            f"{what} came {encoding}-encoded from {urlsplit(response.url).netloc} although it was asked for as stored",
            "a proxy in between compresses registry responses: configure it not to (nginx: gzip off)",
        )


def check_range(response: requests.Response, start: int) -> None:
    found = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if not found or int(found.group(1)) != start:
        sent = response.headers.get("Content-Range", "none")[:100]
        raise Retryable(f"asked for the bytes from {start} on, the server sent the range {sent!r}")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def basic_header(credentials: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds, from either of its forms (delta-seconds or an HTTP date); Error for anything else."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    if value.strip().isascii() and value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):
        raise Error(f"the registry sent a Retry-After that is neither seconds nor a date: {value[:60]!r}") from None
