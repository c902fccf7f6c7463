"""Attacks by a hostile registry, the hosts it redirects to, and a hostile user of a shared cache, each written as
the attacker would run it: a loopback server that answers as a registry, d-pull run against it as a subprocess.

Every refusal is one `d-pull: error:` line, exit status 1, no traceback, in bounded time, with d-pull's peak
memory (its VmHWM) under 150 MB; no credential ever reaches a host other than the registry and its own realm
(each hostile server records every request it got). Classes: credential leaks, unbounded bodies, unbounded
time, redirect schemes, content encodings, cache files planted by another user; credentials from outside d-utils'
lookup (~/.netrc) or in clear text after TLS, credential helper names, special credential and mirror files; one
deadline for every wait (trickled headers, token realms, Retry-After); every registry field checked as it enters."""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from certs import Authority
from cli import assert_one_line_error
from conftest import USER as USER_NAME
from conftest import Unprivileged
from httpd import Handler, LoopbackServer
from images import Image, Tar
from realworld import isolated_env

USER, PASSWORD = "victim", "s3cret-registry-password"
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
PEAK_KIB = 150 << 10
QUICK = 30  # seconds: a refusal never waits out a default timeout
FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Each test starts a server of its own and a d-pull process against it (half a second of CPU, most of the inner
# loop's time when they were in it): they run with the integration tests.
pytestmark = pytest.mark.integration


def odd_sized_image() -> Image:
    """A small image whose layer blob has an odd length (the case that made lying ranges loop forever)."""
    for _ in range(100):
        image = Image(layers=[Tar().file("etc/hello", b"hello\n").file("data", os.urandom(200_000))])
        if len(image.layer_blobs[0]) % 2:
            return image
    raise AssertionError("no odd-sized layer in 100 tries")


IMAGE = odd_sized_image()
CONFIG, LAYER = list(IMAGE.blobs())
# d-pull's own main, run so that it writes its peak resident memory (VmHWM) into argv[1] as it exits
MEASURED = (
    "import atexit, sys\n"
    "from dutils.pull import main\n"
    "def peak():\n"
    "    with open('/proc/self/status') as status:\n"
    "        kib = next(line.split()[1] for line in status if line.startswith('VmHWM:'))\n"
    "    with open(sys.argv[1], 'w') as out:\n"
    "        out.write(kib)\n"
    "atexit.register(peak)\n"
    "sys.exit(main(sys.argv[2:]))\n"
)
# Retries at once: for tests that count attempts, where the backoff's sleeps (8 to 16 s in all) prove nothing more.
QUICK_RETRIES = (
    "from dutils.registry import RetryPolicy\nRetryPolicy.delay = lambda policy, attempt, retry_after: 0.0\n"
)


# -- the attacker's servers


class HostileHandler(Handler):
    timeout = 60

    def do_GET(self) -> None:
        server: Hostile = self.owner
        with server.lock:
            server.seen.append((self.path, {name.lower(): value for name, value in self.headers.items()}))
        kind = next((k for k in ("/manifests/", "/blobs/", "/tags/") if k in self.path), self.path.split("?")[0])
        try:
            server.routes.get(kind, server.routes["*"])(self)
        except OSError:  # d-pull hung up, as it should on most of these
            self.close_connection = True


class Hostile(LoopbackServer):
    """Answers as a registry serving IMAGE as app:1 (anonymous /v2/, no challenge) unless a test replaces a route:
    routes["/v2/"], ["/manifests/"], ["/blobs/"], ["/tags/"], or ["*"] for any other path, each a function of the
    request handler. `seen` holds (path, headers) of every request."""

    handler = HostileHandler

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.blobs = IMAGE.blobs()
        self.manifest = IMAGE.manifest
        self.routes: dict[str, Callable[[HostileHandler], None]] = {
            "/v2/": lambda h: h.answer(200, b"{}"),
            "/manifests/": lambda h: h.answer(
                200, self.manifest, {"Content-Type": json.loads(self.manifest)["mediaType"]}
            ),
            "/blobs/": self.serve_blob,
            "/tags/": lambda h: h.answer(404),
            "*": lambda h: h.answer(404),
        }
        super().__init__()

    def serve_blob(self, handler: HostileHandler) -> None:
        blob = self.blobs.get(handler.path.rsplit("/", 1)[-1])
        handler.answer(200, blob) if blob is not None else handler.answer(404)

    def headers_seen(self) -> list[dict[str, str]]:
        with self.lock:
            return [headers for _, headers in self.seen]


@pytest.fixture
def hostile():
    with Hostile() as server:
        yield server


@pytest.fixture
def other():
    """A second host the registry sends d-pull to: a CDN, a foreign layer's host, a token realm."""
    with Hostile() as server:
        yield server


@pytest.fixture
def third():
    with Hostile() as server:
        yield server


def redirect(url: str, status: int = 307) -> Callable[[HostileHandler], None]:
    return lambda h: h.answer(status, b"", {"Location": url})


def unauthorized(challenge: str) -> Callable[[HostileHandler], None]:
    return lambda h: h.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})


def no_credentials_in(*servers: Hostile) -> bool:
    """No request to these servers carried an Authorization header, or the password in any form anywhere."""
    for server in servers:
        for path, headers in server.seen:
            if "authorization" in headers or any(s in path or s in str(headers) for s in SECRETS):
                return False
    return True


# -- running d-pull against them


class Outcome:
    def __init__(self, done: subprocess.CompletedProcess, peak_kib: int, seconds: float) -> None:
        self.done, self.peak_kib, self.seconds = done, peak_kib, seconds


def attack(
    server: Hostile,
    tmp_path: Path,
    *args: str,
    password: bool = False,
    limit: float = 120,
    user: Unprivileged | None = None,
    env: dict[str, str] | None = None,
    prelude: str = "",
) -> Outcome:
    """d-pull SERVER/app:1 into tmp_path/app, with the victim's credentials when `password`, as the ordinary `user`
    when given (from their install of d-utils), HOME tmp_path and `env` added, after the Python `prelude`; its peak
    memory."""
    peak = tmp_path / "peak"
    credentials = ["--username", USER, "--password-stdin"] if password else []
    python = str(user.bin / "python") if user else sys.executable
    command = [python, "-c", prelude + MEASURED, str(peak), "--cache", str(tmp_path / "cache"), *credentials, *args]
    command += [f"{server.host}/app:1", str(tmp_path / "app")]
    run = user.run if user else subprocess.run
    command = ["env", f"HOME={tmp_path}", *command] if user else command  # runuser sets the user's own HOME
    env = ({"HOME": str(tmp_path)} if user else isolated_env(tmp_path)) | (env or {})
    started = time.monotonic()
    stdin = PASSWORD + "\n" if password else ""
    done = run(command, env=env, cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=limit)
    return Outcome(done, int(peak.read_text()), time.monotonic() - started)


def assert_refused(outcome: Outcome, *words: str, within: float = QUICK) -> None:
    assert_one_line_error(outcome.done, *words)
    assert outcome.peak_kib < PEAK_KIB, outcome.peak_kib
    assert outcome.seconds < within, outcome.seconds


def assert_secrets_kept(outcome: Outcome) -> None:
    assert not [s for s in SECRETS if s in outcome.done.stdout + outcome.done.stderr]


# -- credential leaks: only the registry and the realm of its own /v2/ challenge get them


@pytest.mark.parametrize("challenge", ["basic", "bearer on the same host", "bearer on a third host"])
def test_a_cdn_that_answers_401_gets_no_credentials(challenge, hostile, other, third, tmp_path):
    """The registry does not challenge /v2/ and sends blobs to a CDN that asks for a login: the CDN must not get
    the registry's credentials, nor may the realm it names (itself or a third host)."""
    realm = {"bearer on the same host": f"{other.url}/token", "bearer on a third host": f"{third.url}/token"}
    hostile.routes["/blobs/"] = lambda h: redirect(f"{other.url}/cdn{h.path}")(h)
    header = f'Bearer realm="{realm[challenge]}",service="cdn"' if challenge in realm else 'Basic realm="cdn"'
    other.routes["*"] = unauthorized(header)
    other.routes["/blobs/"] = other.routes["*"]
    outcome = attack(hostile, tmp_path, password=True)
    assert_refused(outcome, other.host, "HTTP 401", "credentials only to")
    assert other.seen and no_credentials_in(other, third)
    assert not [path for path, _ in other.seen + third.seen if "token" in path]
    assert_secrets_kept(outcome)


def test_a_foreign_layer_url_that_answers_401_gets_no_credentials(hostile, other, tmp_path):
    manifest = json.loads(IMAGE.manifest)
    manifest["layers"][0] |= {"mediaType": FOREIGN, "urls": [f"{other.url}/layer"]}
    hostile.manifest = json.dumps(manifest).encode()
    hostile.blobs = {CONFIG: IMAGE.blobs()[CONFIG]}  # the registry does not serve the foreign layer
    other.routes["*"] = unauthorized(f'Bearer realm="{other.url}/token"')
    outcome = attack(hostile, tmp_path, "--allow-foreign-urls", password=True)
    assert_refused(outcome, other.host, "HTTP 401")
    assert other.seen and no_credentials_in(other)
    assert_secrets_kept(outcome)


def test_a_realm_not_named_at_v2_gets_no_credentials(hostile, other, tmp_path):
    """The registry answers /v2/ without a challenge, then challenges a manifest with a realm elsewhere: that realm
    is asked anonymously (it could be anyone's), and the pull fails without a credential leaving."""
    hostile.routes["/manifests/"] = unauthorized(f'Bearer realm="{other.url}/token",service="x"')
    other.routes["*"] = lambda h: h.answer(200, b'{"token": "from-the-attacker"}', {"Content-Type": "application/json"})
    outcome = attack(hostile, tmp_path, password=True)
    assert_refused(outcome, "access denied")
    assert [path for path, _ in other.seen if path.startswith("/token")]
    assert no_credentials_in(other)
    assert_secrets_kept(outcome)


def test_redirect_chains_carry_credentials_to_no_other_host(hostile, other, third, tmp_path):
    """registry -> host A -> host B, which serves the blob: the pull works, neither host saw an Authorization."""
    hostile.routes["/v2/"] = lambda h: (
        h.answer(200, b"{}") if h.headers.get("Authorization") else unauthorized('Basic realm="r"')(h)
    )
    hostile.routes["/blobs/"] = lambda h: redirect(f"{other.url}/hop{h.path}")(h)
    other.routes["/blobs/"] = lambda h: redirect(f"{third.url}/final{h.path.removeprefix('/hop')}", 302)(h)
    outcome = attack(hostile, tmp_path, password=True)
    assert outcome.done.returncode == 0, outcome.done.stderr
    assert (tmp_path / "app" / "rootfs" / "etc" / "hello").read_bytes() == b"hello\n"
    assert other.seen and third.seen and no_credentials_in(other, third)
    assert all(h.get("authorization", "").startswith("Basic ") for p, h in hostile.seen if "/blobs/" in p)


def test_a_redirect_loop_ends_in_one_line(hostile, other, tmp_path):
    hostile.routes["/blobs/"] = redirect(f"{other.url}/a")
    other.routes["*"] = lambda h: redirect(f"{hostile.url}/v2/app/blobs/{LAYER}")(h)
    assert_refused(attack(hostile, tmp_path), "too many redirects")


# -- unbounded bodies: nothing but blobs is read past a cap, nothing is decompressed


def gzip_bomb(size: int = 1 << 30) -> bytes:
    """`size` zero bytes, gzip-compressed (about a thousandth of that on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(size >> 20)) + packer.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb()


def gzipped(status: int, body: bytes, extra: dict | None = None) -> Callable[[HostileHandler], None]:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"} | (extra or {})
    return lambda h: h.answer(status, body, headers)


@pytest.mark.parametrize("status", [400, 404])
def test_a_gzip_bomb_as_an_error_body_is_never_inflated(status, bomb, hostile, tmp_path):
    hostile.routes["/manifests/"] = hostile.routes["/tags/"] = gzipped(status, bomb)
    assert_refused(attack(hostile, tmp_path), "manifest")


def test_a_gzip_bomb_as_a_token_reply_is_never_inflated(bomb, hostile, tmp_path):
    hostile.routes["/v2/"] = unauthorized(f'Bearer realm="{hostile.url}/token",service="s"')
    hostile.routes["*"] = gzipped(200, bomb)
    assert_refused(attack(hostile, tmp_path, password=True), "token server", "gzip-encoded")


DEEP_JSON = b"[" * 60_000  # under the body cap, nested far deeper than Python's JSON parser goes


def test_json_nested_too_deeply_in_an_error_body_or_a_token_reply_is_one_line(hostile, tmp_path):
    json_body = {"Content-Type": "application/json"}
    (tmp_path / "error").mkdir(), (tmp_path / "token").mkdir()
    hostile.routes["/manifests/"] = hostile.routes["/tags/"] = lambda h: h.answer(404, DEEP_JSON, json_body)
    assert_refused(attack(hostile, tmp_path / "error"), "unknown manifest")
    hostile.routes["/v2/"] = unauthorized(f'Bearer realm="{hostile.url}/token",service="s"')
    hostile.routes["*"] = lambda h: h.answer(200, DEEP_JSON, json_body)
    assert_refused(attack(hostile, tmp_path / "token", password=True), "token server", "sent no token")


def endless(chunked: bool, status: int = 200, piece: bytes = b" " * (64 << 10)) -> Callable[[HostileHandler], None]:
    """An answer whose body never ends: chunked, or announcing 100 GB."""

    def send(handler: HostileHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        handler.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(100 << 30))))
        handler.end_headers()
        frame = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
        for _ in range(200_000):  # 12 GB at most: d-pull hangs up long before
            handler.wfile.write(frame)

    return send


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "huge-length"])
@pytest.mark.parametrize("route", ["/manifests/", "/blobs/", "/tags/"])
def test_endless_bodies_are_cut_at_a_cap(route, chunked, hostile, tmp_path):
    """A manifest or an error body is read up to its cap; a blob up to the size its manifest gives."""
    hostile.routes[route] = endless(chunked)
    if route == "/tags/":  # an error body: the manifest's 404 makes d-pull ask whether the repository exists
        hostile.routes[route] = endless(chunked, status=404)
        hostile.routes["/manifests/"] = lambda h: h.answer(404, b"{}")
    says = {"/manifests/": "larger than 4194304 bytes", "/blobs/": "larger than the", "/tags/": "unknown manifest"}
    assert_refused(attack(hostile, tmp_path), says[route])


# -- time: a transfer without progress is a cut connection, a pull without progress gives up


def announce(handler: HostileHandler) -> bytes:
    """Send a 200 announcing the whole blob asked for; return the blob, for the caller to send (or not)."""
    blob = handler.owner.blobs[handler.path.rsplit("/", 1)[-1]]
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(blob)))
    handler.end_headers()
    return blob


def trickle(delay: float) -> Callable[[HostileHandler], None]:
    """The blob announced in full, then one byte every `delay` seconds."""

    def send(handler: HostileHandler) -> None:
        for byte in announce(handler)[:200]:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(delay)

    return send


def stall(after: int) -> Callable[[HostileHandler], None]:
    """The blob announced, `after` bytes sent, then silence with the connection open (until the client leaves)."""

    def send(handler: HostileHandler) -> None:
        handler.wfile.write(announce(handler)[:after])
        handler.wfile.flush()
        handler.rfile.read(1)  # returns when d-pull closes the connection (or after the handler's timeout)

    return send


@pytest.mark.parametrize(("route", "says"), [(trickle(0.5), "stalled"), (stall(1000), "timed out")])
def test_a_transfer_without_progress_gives_up_within_the_timeout(route, says, hostile, tmp_path):
    hostile.routes["/blobs/"] = lambda h: (route if LAYER in h.path else hostile.serve_blob)(h)
    outcome = attack(hostile, tmp_path, "--timeout", "3")
    assert_refused(outcome, "giving up", LAYER[:19], says, within=20)


def test_silence_before_any_answer_gives_up_within_the_timeout(hostile, tmp_path):
    hostile.routes["/manifests/"] = lambda h: h.rfile.read(1)
    assert_refused(attack(hostile, tmp_path, "--timeout", "2"), "giving up", "manifest", within=20)


def lying_ranges(lie: Callable[[int, int], str]) -> Callable[[HostileHandler], None]:
    """The first GET of the layer is cut halfway; every Range request after it is answered 206 with the
    Content-Range `lie(start, size)` and the bytes from where the lie says, cut halfway again."""

    def send(handler: HostileHandler) -> None:
        blob = handler.owner.blobs[handler.path.rsplit("/", 1)[-1]]
        start = int(handler.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        claimed = lie(start, len(blob)) if start else ""
        offset = int(claimed[6:].split("-")[0]) if claimed[6:7].isdigit() else 0
        handler.send_response(206 if start else 200)
        if claimed:
            handler.send_header("Content-Range", claimed)
        handler.send_header("Content-Length", str(len(blob) - offset))
        handler.end_headers()
        handler.wfile.write(blob[offset : offset + (len(blob) - offset) // 2 + 1])
        handler.close_connection = True

    return send


LIES = {
    "from zero": lambda start, size: f"bytes 0-{size - 1}/{size}",
    "one byte early": lambda start, size: f"bytes {start - 1}-{size - 1}/{size}",
    "alternating": lambda start, size: f"bytes {start // 2 | 1}-{size - 1}/{size}",
    "garbage": lambda start, size: "bytes */*",
}


@pytest.mark.parametrize("lie", LIES)
def test_lying_content_ranges_end_in_bounded_retries(lie, hostile, tmp_path):
    """Bytes that a lie made us drop are no progress: the attempts stay bounded. The first lie waits the real backoff
    (bounded in time too), the others retry at once."""
    assert len(IMAGE.blobs()[LAYER]) % 2 == 1
    hostile.routes["/blobs/"] = lambda h: (lying_ranges(LIES[lie]) if LAYER in h.path else hostile.serve_blob)(h)
    outcome = attack(hostile, tmp_path, limit=180, prelude="" if lie == next(iter(LIES)) else QUICK_RETRIES)
    assert_refused(outcome, "giving up", LAYER[:19], within=120)
    assert sum(LAYER in path for path, _ in hostile.seen) <= 6


# -- schemes: only http(s) is followed


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/blob", "gopher://127.0.0.1:70/x"])
def test_a_redirect_to_another_scheme_is_one_line(target, hostile, tmp_path):
    hostile.routes["/blobs/"] = lambda h: (redirect(target) if LAYER in h.path else hostile.serve_blob)(h)
    assert_refused(attack(hostile, tmp_path), "redirect", "not a plain http(s) URL", target)


# -- content encodings: bytes are stored as the registry stores them, or refused


@pytest.mark.parametrize("route", ["/manifests/", "/blobs/"])
def test_a_response_gzipped_against_our_will_is_refused_and_never_stored(route, hostile, tmp_path):
    """We ask for Accept-Encoding: identity; a proxy that gzips anyway would have us store the gzip stream."""
    honest = hostile.routes[route]
    body = hostile.manifest if route == "/manifests/" else hostile.blobs[LAYER]
    media_type = json.loads(hostile.manifest)["mediaType"] if route == "/manifests/" else "application/octet-stream"
    zipping = gzipped(200, gzip_of(body), {"Content-Type": media_type})
    hostile.routes[route] = lambda h: (zipping if route == "/manifests/" or LAYER in h.path else honest)(h)
    outcome = attack(hostile, tmp_path)
    assert_refused(outcome, "gzip-encoded", "gzip off")
    assert all(h.get("accept-encoding") == "identity" for h in hostile.headers_seen())
    kept = tmp_path / "cache" / "blobs" / "sha256" / LAYER.removeprefix("sha256:")
    assert not kept.exists()
    assert not kept.with_suffix(".partial").exists() or kept.with_suffix(".partial").stat().st_size == 0


def gzip_of(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


# -- the cache: files another user planted are never followed, never waited on


def planted(top: Path, suffix: str, user: Unprivileged | None = None) -> Path:
    """Where the layer's `suffix` file (.partial, .lock) lives in the cache under `top`, its folders made (and
    owned by the user who pulls)."""
    folder = top / "cache" / "blobs" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    for made in (top / "cache", top / "cache" / "blobs", folder):
        owned(made, user)
    return folder / (LAYER.removeprefix("sha256:") + suffix)


@pytest.fixture(params=["root", "ordinary user"])
def victim(request, tmp_path) -> tuple[Path, Unprivileged | None]:
    """A folder of the victim's, who pulls: root, or the ordinary user (owning the folder)."""
    if request.param == "root":
        return tmp_path, None
    user: Unprivileged = request.getfixturevalue("unprivileged")
    folder = Path(tempfile.mkdtemp(prefix="attack-", dir=user.home))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return owned(folder, user), user


def owned(path: Path, user: Unprivileged | None) -> Path:
    """`path`, given to the ordinary user when they are the victim (and we are root)."""
    if user and user.as_root:
        entry = pwd.getpwnam(USER_NAME)
        os.lchown(path, entry.pw_uid, entry.pw_gid)
    return path


@pytest.mark.parametrize("suffix", [".partial", ".lock"])
def test_a_symlink_planted_as_a_partial_or_lock_is_never_followed(suffix, victim, hostile):
    """To the victim's file (a resume would append to it), or to a name that does not exist (it would be made)."""
    folder, user = victim
    bashrc = folder / ".bashrc"
    bashrc.write_bytes(b"# the victim's own\n")
    owned(bashrc, user)
    missing = folder / "created-through-the-link"
    link = planted(folder, suffix, user)
    for target in (bashrc, missing):
        link.symlink_to(target)
        assert_refused(attack(hostile, folder, user=user), "symbolic link", "remove")
        link.unlink()
    assert bashrc.read_bytes() == b"# the victim's own\n"
    assert not missing.exists()


def test_a_fifo_planted_as_a_partial_never_hangs(victim, hostile):
    folder, user = victim
    fifo = planted(folder, ".partial", user)
    os.mkfifo(fifo)
    owned(fifo, user)
    assert_refused(attack(hostile, folder, limit=60, user=user), "not a regular file")


# -- credentials come only from d-utils' own lookup, and never travel in clear text after TLS

NETRC_USER, NETRC_PASSWORD = "netrc-user", "netrc-password-never-sent"


def no_netrc_secret_in(*servers: Hostile) -> bool:
    secrets = (NETRC_PASSWORD, base64.b64encode(f"{NETRC_USER}:{NETRC_PASSWORD}".encode()).decode())
    return not [h for server in servers for _, h in server.seen if any(s in str(h) for s in secrets)]


def write_owned(path: Path, content: bytes, user: Unprivileged | None, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    return owned(path, user)


@pytest.mark.parametrize("entry", ["default", "machine 127.0.0.1", "machine localhost"])
def test_netrc_passwords_go_to_no_registry_cdn_or_realm(entry, victim, hostile, other, third):
    """~/.netrc is the victim's, for other tools: the registry (which asks for a token), the realm it names and the
    CDN its blobs are redirected to (all on 127.0.0.1) get none of it; the anonymous pull works."""
    folder, user = victim
    write_owned(folder / ".netrc", f"{entry} login {NETRC_USER} password {NETRC_PASSWORD}\n".encode(), user)
    host = "localhost" if "localhost" in entry else "127.0.0.1"
    needs_token = lambda h: h.headers.get("Authorization") == "Bearer anon"  # noqa: E731
    challenge = unauthorized(f'Bearer realm="http://{host}:{other.host.split(":")[1]}/token",service="s"')
    hostile.routes["/v2/"] = lambda h: h.answer(200, b"{}") if needs_token(h) else challenge(h)
    serve = hostile.routes["/manifests/"]
    hostile.routes["/manifests/"] = lambda h: serve(h) if needs_token(h) else challenge(h)
    hostile.routes["/blobs/"] = lambda h: redirect(f"http://{host}:{third.host.split(':')[1]}/cdn{h.path}")(h)
    other.routes["*"] = lambda h: h.answer(200, b'{"token": "anon"}')
    outcome = attack(hostile, folder, user=user)
    assert outcome.done.returncode == 0, outcome.done.stderr
    assert other.seen and third.seen and no_netrc_secret_in(hostile, other, third)
    assert no_credentials_in(other, third)


class RecordingProxy(LoopbackServer):
    """A forward HTTP proxy: GET absolute-URI, relayed upstream; `seen` holds every URL it was asked for."""

    class handler(Handler):
        def do_GET(self) -> None:
            with self.owner.lock:
                self.owner.seen.append(self.path)
            parts = urlsplit(self.path)
            upstream = http.client.HTTPConnection(parts.netloc, timeout=30)
            upstream.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=dict(self.headers))
            answer = upstream.getresponse()
            body = answer.read()
            headers = {k: v for k, v in answer.getheaders() if k.lower() not in ("content-length", "connection")}
            self.answer(answer.status, body, headers)
            upstream.close()

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__()


def test_http_proxy_from_the_environment_still_carries_the_pull(victim, hostile):
    """trust_env is off (no netrc): the proxy variables must still work, read by d-utils itself."""
    folder, user = victim
    with RecordingProxy() as proxy:
        env = {"http_proxy": proxy.url, "HTTP_PROXY": proxy.url, "no_proxy": "", "NO_PROXY": ""}
        outcome = attack(hostile, folder, user=user, env=env)
    assert outcome.done.returncode == 0, outcome.done.stderr
    assert f"{hostile.url}/v2/app/manifests/1" in proxy.seen
    assert f"{hostile.url}/v2/app/blobs/{LAYER}" in proxy.seen


def test_no_proxy_is_honoured(hostile):
    with tempfile.TemporaryDirectory() as home, RecordingProxy() as proxy:
        env = {"http_proxy": proxy.url, "HTTP_PROXY": proxy.url, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
        outcome = attack(hostile, Path(home), env=env)
    assert outcome.done.returncode == 0, outcome.done.stderr
    assert hostile.seen and not proxy.seen


class TlsHandler(HostileHandler):
    """TLS or plain HTTP on the same port, as the first byte says (0x16 opens a TLS handshake)."""

    def setup(self) -> None:
        self.tls = self.request.recv(1, socket.MSG_PEEK) == b"\x16"
        if self.tls:
            self.request = self.owner.context.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self) -> None:
        with self.owner.lock:
            self.owner.schemes.append(("https" if self.tls else "http", self.path, self.headers.get("Authorization")))
        super().do_GET()


class TlsHostile(Hostile):
    handler = TlsHandler

    def __init__(self, folder: Path) -> None:
        authority = Authority()
        cert, key = authority.issue("127.0.0.1", ["127.0.0.1"]).write(folder, "server")
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(authority.root.cert_pem)
        self.ca.chmod(0o644)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.schemes: list[tuple[str, str, str | None]] = []
        super().__init__()
        self.url = f"https://{self.host}"


@pytest.fixture
def tls_hostile(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="tls-", dir="/tmp"))
    folder.chmod(0o755)
    with TlsHostile(folder) as server:
        yield server
    shutil.rmtree(folder)


def basic_only(server: Hostile, route: str) -> None:
    serve = server.routes[route]
    server.routes[route] = lambda h: serve(h) if h.headers.get("Authorization") else unauthorized('Basic realm="r"')(h)


def test_a_tls_registry_naming_a_plain_http_realm_gets_no_password(victim, tls_hostile, other):
    """The realm is asked anonymously (a public image still pulls); the password never goes out in clear text."""
    folder, user = victim
    tls_hostile.routes["/v2/"] = unauthorized(f'Bearer realm="{other.url}/token",service="s"')
    other.routes["*"] = lambda h: h.answer(200, b'{"token": "anonymous"}')
    outcome = attack(tls_hostile, folder, "--ca-bundle", str(tls_hostile.ca), password=True, user=user)
    assert_refused(outcome, "access denied")
    assert [path for path, _ in other.seen if path.startswith("/token")]
    assert no_credentials_in(other)
    assert_secrets_kept(outcome)


def test_a_redirect_from_https_to_plain_http_on_the_same_host_and_port_drops_the_password(victim, tls_hostile):
    folder, user = victim
    basic_only(tls_hostile, "/v2/")
    basic_only(tls_hostile, "/manifests/")
    serve = tls_hostile.serve_blob
    tls_hostile.routes["/blobs/"] = lambda h: serve(h) if not h.tls else redirect(f"http://{h.owner.host}{h.path}")(h)
    outcome = attack(tls_hostile, folder, "--ca-bundle", str(tls_hostile.ca), password=True, user=user)
    assert outcome.done.returncode == 0, outcome.done.stderr
    plain = [auth for scheme, path, auth in tls_hostile.schemes if scheme == "http"]
    assert plain and plain == [None] * len(plain)
    assert any(auth for scheme, _, auth in tls_hostile.schemes if scheme == "https")


EVIL = '#!/bin/sh\ntouch \'{marker}\'\necho \'{{"Username": "u", "Secret": "p"}}\'\n'


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
@pytest.mark.parametrize("name", ["x/../../{top}/somewhere/evil", "../evil", "-evil", "ev\x00il", "ev\nil", 5])
def test_a_credential_helper_that_is_not_a_program_name_never_runs(key, name, victim, hostile):
    folder, user = victim
    marker = folder / "the-helper-ran"
    evil = folder / "somewhere" / "evil"
    write_owned(evil, EVIL.format(marker=marker).encode(), user, 0o755)
    owned(evil.parent, user)
    (folder / "docker-credential-x").mkdir()  # for x/../..: the folder the name walks out of
    helper = name.format(top=folder.name) if isinstance(name, str) else name
    config = {"credHelpers": {hostile.host: helper}} if key == "credHelpers" else {"credsStore": helper}
    write_owned(folder / ".docker" / "config.json", json.dumps(config).encode(), user)
    owned(folder / ".docker", user)
    outcome = attack(hostile, folder, user=user)
    assert_refused(outcome, "credential helper", "not a program name")
    assert not marker.exists()


def test_a_docker_config_that_is_a_symbolic_link_is_followed(victim, hostile):
    """Dotfile managers link ~/.docker/config.json into their repository: its credentials are used."""
    folder, user = victim
    basic_only(hostile, "/v2/")
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    real = write_owned(
        folder / "dotfiles" / "docker.json", json.dumps({"auths": {hostile.host: {"auth": auth}}}).encode(), user
    )
    owned(real.parent, user)
    (folder / ".docker").mkdir()
    (folder / ".docker" / "config.json").symlink_to(real)
    outcome = attack(hostile, folder, user=user)
    assert outcome.done.returncode == 0, outcome.done.stderr
    assert any(h.get("authorization") == f"Basic {auth}" for h in hostile.headers_seen())


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "5 MiB"])
@pytest.mark.parametrize("where", [".docker/config.json", ".config/d-utils/mirrors.json"])
def test_a_credential_or_mirror_file_that_is_special_or_huge_is_one_line(kind, where, victim, hostile):
    folder, user = victim
    path = folder / where
    path.parent.mkdir(parents=True)
    for made in (path.parent, path.parent.parent):
        owned(made, user)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "5 MiB":
        path.write_bytes(b" " * (5 << 20) + b"{}")
    else:
        path.symlink_to("/dev/zero")
    owned(path, user)
    says = "larger than" if kind == "5 MiB" else "not a regular file"
    assert_refused(attack(hostile, folder, user=user, limit=60), where.rsplit("/", 1)[-1], says)


# -- one deadline bounds every wait: response headers, token requests, Retry-After

TRICKLE_HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Slow: " + b"a" * 100


def trickle_headers(handler: HostileHandler) -> None:
    """A status line, then the headers one byte every 3 s (each recv returns in time, the headers never end)."""
    for byte in TRICKLE_HEADERS[:40]:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(3)


@pytest.mark.parametrize("route", ["/manifests/", "token realm"])
def test_response_headers_trickled_a_byte_at_a_time_end_within_the_timeout(route, hostile, other, tmp_path):
    if route == "token realm":
        hostile.routes["/v2/"] = unauthorized(f'Bearer realm="{other.url}/token",service="s"')
        other.routes["*"] = trickle_headers
    else:
        hostile.routes[route] = trickle_headers
    assert_refused(attack(hostile, tmp_path, "--timeout", "5", limit=90), "giving up", within=30)


@pytest.mark.parametrize("value", ["600", "99999999999999999999999999999", "{date}"])
def test_a_retry_after_beyond_the_timeout_gives_up_at_once(value, hostile, tmp_path):
    later = email.utils.formatdate(time.time() + 86400 * 365, usegmt=True)
    header = {"Retry-After": value.format(date=later)}
    hostile.routes["/manifests/"] = lambda h: h.answer(503, b"", header)
    assert_refused(attack(hostile, tmp_path, "--timeout", "10"), "would pass --timeout", within=QUICK / 2)


# -- every field from the registry checked where it enters, every message escaped

UNSHOWN = "hunter2-in-user-info"


@pytest.mark.parametrize(
    "location",
    [
        f"http://user:{UNSHOWN}@127.0.0.1:1/x",
        f"//user:{UNSHOWN}@127.0.0.1:1/x",
        "http://127.0.0.1:99999999/x",
        "http://[::1/x",
        "http://127.0.0.1:1/a\x1b[2Jb",
        "gopher://127.0.0.1:1/x",
    ],
)
def test_a_location_that_is_not_a_plain_http_url_is_one_line(location, hostile, tmp_path):
    hostile.routes["/blobs/"] = lambda h: h.answer(307, b"", {"Location": location})
    outcome = attack(hostile, tmp_path)
    assert_refused(outcome, "redirect", "not a plain http(s) URL")
    assert UNSHOWN not in outcome.done.stderr and "\x1b" not in outcome.done.stderr


@pytest.mark.parametrize(
    "realm",
    [f"http://u:{UNSHOWN}@127.0.0.1:{{port}}/token", "file:///etc/passwd", "http://127.0.0.1:{port}/t\x07oken", ""],
)
def test_a_challenge_with_an_odd_realm_is_one_line(realm, hostile, other, tmp_path):
    realm = realm.format(port=other.host.split(":")[1])
    hostile.routes["/v2/"] = unauthorized(f'Bearer realm="{realm}",service="s"')
    outcome = attack(hostile, tmp_path, password=True)
    assert_refused(outcome, "realm")
    assert not other.seen and UNSHOWN not in outcome.done.stderr and "\x07" not in outcome.done.stderr


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        ({"token": {"nested": 1}}, "token that is not"),
        ({"token": "abc\r\nX-Injected: 1"}, "token that is not"),
        ({"token": "t" * 9000}, "token that is not"),
        ({"token": "t", "expires_in": "soon"}, "expires_in"),
        ({"token": "t", "expires_in": -1}, "expires_in"),
        ({"token": "t", "expires_in": 1e300}, "expires_in"),
        ([1, 2], "sent no token"),
    ],
)
def test_token_replies_with_odd_fields_are_one_line(reply, says, hostile, other, tmp_path):
    hostile.routes["/v2/"] = unauthorized(f'Bearer realm="{other.url}/token",service="s"')
    other.routes["*"] = lambda h: h.answer(200, json.dumps(reply).encode())
    assert_refused(attack(hostile, tmp_path), says)


@pytest.mark.parametrize(
    "body",
    [b'{"errors": "NAME_UNKNOWN"}', b'{"errors": [{"code": {"a": 1}}]}', b'{"errors": [{"code": "\\u001b[2J"}]}',
     b"[1, 2]", b'{"errors": 7}', b'{"errors": [null, 3, "x"]}'],
)  # fmt: skip
def test_error_bodies_of_odd_types_are_one_line(body, hostile, tmp_path):
    hostile.routes["/manifests/"] = lambda h: h.answer(404, body)
    outcome = attack(hostile, tmp_path)
    assert_refused(outcome, "unknown manifest")
    assert "\x1b" not in outcome.done.stderr and "internal error" not in outcome.done.stderr


@pytest.mark.parametrize("length", ["-1", "abc", "99999999999999999999999", "12, 13"])
def test_an_odd_content_length_is_one_line(length, hostile, tmp_path):
    def lie(handler: HostileHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", json.loads(hostile.manifest)["mediaType"])
        handler.send_header("Content-Length", length)
        handler.end_headers()
        handler.wfile.write(hostile.manifest)
        handler.close_connection = True

    hostile.routes["/manifests/"] = lie
    outcome = attack(hostile, tmp_path, "--timeout", "5")
    assert outcome.done.returncode in (0, 1), outcome.done.stderr
    assert "Traceback" not in outcome.done.stderr and "internal error" not in outcome.done.stderr
    if outcome.done.returncode:
        assert_refused(outcome)
