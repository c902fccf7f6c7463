"""Attacks by a hostile registry, the hosts it redirects to, and a hostile user of a shared cache, each written as
the attacker would run it: a loopback server that answers as a registry, d-pull run against it as a subprocess.

Every refusal is one `d-pull: error:` line, exit status 1, no traceback, in bounded time, with d-pull's peak
memory (its VmHWM) under 150 MB; no credential ever reaches a host other than the registry and its own realm
(each hostile server records every request it got). Classes: credential leaks, unbounded bodies, unbounded
time, redirect schemes, content encodings, cache files planted by another user."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
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
) -> Outcome:
    """d-pull SERVER/app:1 into tmp_path/app, with the victim's credentials when `password`, as the ordinary `user`
    when given (from their install of d-utils); its peak memory."""
    peak = tmp_path / "peak"
    credentials = ["--username", USER, "--password-stdin"] if password else []
    python = str(user.bin / "python") if user else sys.executable
    command = [python, "-c", MEASURED, str(peak), "--cache", str(tmp_path / "cache"), *credentials, *args]
    command += [f"{server.host}/app:1", str(tmp_path / "app")]
    run = user.run if user else subprocess.run
    env = {"HOME": str(tmp_path)} if user else isolated_env(tmp_path)
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


@pytest.mark.integration  # slow: the bomb takes seconds to make
@pytest.mark.parametrize("status", [400, 404])
def test_a_gzip_bomb_as_an_error_body_is_never_inflated(status, bomb, hostile, tmp_path):
    hostile.routes["/manifests/"] = hostile.routes["/tags/"] = gzipped(status, bomb)
    assert_refused(attack(hostile, tmp_path), "manifest")


@pytest.mark.integration  # slow: the bomb takes seconds to make
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


@pytest.mark.integration  # slow: waits out --timeout
@pytest.mark.parametrize(("route", "says"), [(trickle(0.5), "stalled"), (stall(1000), "timed out")])
def test_a_transfer_without_progress_gives_up_within_the_timeout(route, says, hostile, tmp_path):
    hostile.routes["/blobs/"] = lambda h: (route if LAYER in h.path else hostile.serve_blob)(h)
    outcome = attack(hostile, tmp_path, "--timeout", "3")
    assert_refused(outcome, "giving up", LAYER[:19], says, within=20)


@pytest.mark.integration  # slow: waits out --timeout
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


@pytest.mark.integration  # slow: a real retry back-off
@pytest.mark.parametrize("lie", LIES)
def test_lying_content_ranges_end_in_bounded_retries(lie, hostile, tmp_path):
    assert len(IMAGE.blobs()[LAYER]) % 2 == 1
    hostile.routes["/blobs/"] = lambda h: (lying_ranges(LIES[lie]) if LAYER in h.path else hostile.serve_blob)(h)
    outcome = attack(hostile, tmp_path, limit=180)
    assert_refused(outcome, "giving up", LAYER[:19], within=120)
    assert sum(LAYER in path for path, _ in hostile.seen) <= 6


# -- schemes: only http(s) is followed


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/blob", "gopher://127.0.0.1:70/x"])
def test_a_redirect_to_another_scheme_is_one_line(target, hostile, tmp_path):
    hostile.routes["/blobs/"] = lambda h: (redirect(target) if LAYER in h.path else hostile.serve_blob)(h)
    scheme = target.split(":")[0]
    assert_refused(attack(hostile, tmp_path), f"redirected to a {scheme} URL", "http")


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


@pytest.fixture(params=["root", pytest.param("ordinary user", marks=pytest.mark.integration)])
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
