"""Registries as they really are, end to end: references with nested paths and tag@digest, TLS with a private CA,
plain HTTP only when allowed, blob downloads redirected to a CDN, pull-through mirrors, and multi-platform indexes."""

import contextlib
import json
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from cdn import Cdn, RedirectingFront
from certs import Authority
from cli import assert_one_line_error, d_pull
from httpd import Handler, LoopbackServer
from images import busybox_image, platform_images, push_attestation, push_blob, push_index, push_manifest
from realworld import assert_pulled, htpasswd_config, pull, seed, storage_config
from registry_server import Registry, free_port

pytestmark = pytest.mark.integration  # registries of its own

USER, PASSWORD = "bob", "cdn-test-password"
BUSYBOX = "team/tools/busybox:1.0"  # a nested repository path
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
QUICK = 10  # seconds: a failure that is not retried


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("registries-storage")
    seed(folder, {BUSYBOX: busybox_image(), "library/busybox:latest": busybox_image()})
    return folder


@pytest.fixture(scope="module")
def plain(storage):
    """A plain-HTTP registry without auth, serving `storage`."""
    with Registry(storage_config(storage)) as registry:
        yield registry


# -- references


@pytest.mark.parametrize("tag", ["1.0", "stale-tag"])
def test_nested_path_with_tag_and_digest_pulls_by_the_verified_digest(tag, plain, tmp_path):
    """With both, the digest decides (the tag may have moved on or never existed), as in docker."""
    digest = busybox_image().manifest_digest
    image = f"{plain.host}/team/tools/busybox:{tag}@{digest}"
    by_digest, by_tag = plain.manifest_gets(digest), plain.manifest_gets(tag)
    record = assert_pulled(pull(image, tmp_path / "bb"), tmp_path / "bb")
    assert (record["reference"], record["digest"]) == (image, digest)
    assert (plain.manifest_gets(digest) - by_digest, plain.manifest_gets(tag) - by_tag) == (1, 0)


def test_localhost_is_a_registry_host_served_over_plain_http(plain, tmp_path):
    image = f"localhost:{plain.port}/{BUSYBOX}"
    assert assert_pulled(pull(image, tmp_path / "bb"), tmp_path / "bb")["reference"] == image


# -- TLS


@pytest.fixture(scope="module")
def loopback_name() -> str:
    """This machine's name, when it resolves to loopback: not `localhost` nor 127.x, so d-pull insists on HTTPS."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"the host name {name!r} does not resolve")
    if not address.startswith("127."):
        pytest.skip(f"the host name {name!r} is not a loopback name")
    return name


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[Authority, Path]:
    authority = Authority()
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_bytes(authority.root.cert_pem)
    return authority, path


@pytest.fixture(scope="module")
def tls(storage, ca, loopback_name, tmp_path_factory):
    """A TLS registry whose certificate, for this machine's loopback name, comes from a private CA."""
    folder = tmp_path_factory.mktemp("tls")
    certificate, key = ca[0].issue("registry", [loopback_name, "127.0.0.1"]).write(folder, "registry")
    config = storage_config(storage) | {"http": {"tls": {"certificate": str(certificate), "key": str(key)}}}
    with Registry(config) as registry:
        yield registry


# The machine's settings (these machines point requests at the system bundle) and none: requests would let
# either override a verify chosen for the session; d-pull must behave the same with both.
ENVIRONMENTS = {
    "machine": {"REQUESTS_CA_BUNDLE": SYSTEM_BUNDLE, "CURL_CA_BUNDLE": SYSTEM_BUNDLE},
    "unset": {"REQUESTS_CA_BUNDLE": None, "CURL_CA_BUNDLE": None},
}


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_tls_registry_with_its_ca_given(environment, tls, ca, loopback_name, tmp_path):
    image = f"{loopback_name}:{tls.port}/{BUSYBOX}"
    done = pull(image, tmp_path / "bb", "--ca-bundle", str(ca[1]), **ENVIRONMENTS[environment])
    assert_pulled(done, tmp_path / "bb")


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_tls_registry_without_its_ca_fails_at_once_and_says_why(environment, tls, loopback_name, tmp_path):
    started = time.monotonic()
    done = pull(f"{loopback_name}:{tls.port}/{BUSYBOX}", tmp_path / "bb", **ENVIRONMENTS[environment])
    assert time.monotonic() - started < QUICK
    assert_one_line_error(done, "cannot verify the TLS certificate", loopback_name, "--ca-bundle")
    assert "retrying" not in done.stderr
    assert not (tmp_path / "bb").exists()


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_tls_trusts_the_system_store(environment, tls, ca, loopback_name, tmp_path):
    """The system's store as OpenSSL finds it ($SSL_CERT_FILE here), not certifi's nor $REQUESTS_CA_BUNDLE."""
    image = f"{loopback_name}:{tls.port}/{BUSYBOX}"
    done = pull(image, tmp_path / "bb", SSL_CERT_FILE=str(ca[1]), **ENVIRONMENTS[environment])
    assert_pulled(done, tmp_path / "bb")


@pytest.mark.parametrize(("content", "says"), [(None, "does not exist"), ("not a certificate\n", "cannot use the CA")])
def test_a_missing_or_unreadable_ca_bundle_is_a_one_line_error(content, says, tls, loopback_name, tmp_path):
    bundle = tmp_path / "given.crt"
    if content is not None:
        bundle.write_text(content)
    started = time.monotonic()
    done = pull(f"{loopback_name}:{tls.port}/{BUSYBOX}", tmp_path / "bb", "--ca-bundle", str(bundle))
    assert time.monotonic() - started < QUICK
    assert_one_line_error(done, says)
    assert "retrying" not in done.stderr


# -- loopback registries: HTTPS first, then plain HTTP, as Docker does


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_a_tls_registry_on_loopback_is_spoken_to_over_https_with_the_system_store(environment, tls, ca, tmp_path):
    image = f"127.0.0.1:{tls.port}/{BUSYBOX}"
    assert_pulled(pull(image, tmp_path / "bb", SSL_CERT_FILE=str(ca[1]), **ENVIRONMENTS[environment]), tmp_path / "bb")


def test_a_tls_registry_on_loopback_that_is_not_trusted_is_one_line(tls, tmp_path):
    """The server speaks TLS, so plain HTTP cannot work either: say what to trust, at once."""
    started = time.monotonic()
    done = pull(f"127.0.0.1:{tls.port}/{BUSYBOX}", tmp_path / "bb")
    assert time.monotonic() - started < QUICK
    assert_one_line_error(done, "cannot verify the TLS certificate of 127.0.0.1", "--ca-bundle")
    assert "retrying" not in done.stderr


def test_insecure_still_means_plain_http_on_loopback(tls, tmp_path):
    done = pull(f"127.0.0.1:{tls.port}/{BUSYBOX}", tmp_path / "bb", "--insecure")
    assert_one_line_error(done, "HTTP 400", "leave out --insecure")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_a_plain_registry_on_loopback_is_used_after_https_fails(host, plain, tmp_path):
    image = f"{host}:{plain.port}/{BUSYBOX}"
    assert assert_pulled(pull(image, tmp_path / "bb"), tmp_path / "bb")["reference"] == image


def test_plain_http_only_when_asked(plain, loopback_name, tmp_path):
    """A registry that is not localhost/127.x is spoken to over TLS unless --insecure says otherwise."""
    image = f"{loopback_name}:{plain.port}/{BUSYBOX}"
    started = time.monotonic()
    refused = pull(image, tmp_path / "https")
    assert time.monotonic() - started < QUICK
    assert_one_line_error(refused, "does not speak TLS", "--insecure")
    assert_pulled(pull(image, tmp_path / "bb", "--insecure"), tmp_path / "bb")


# -- blobs redirected to a CDN


@pytest.fixture(scope="module")
def guarded(storage, tmp_path_factory):
    """A registry with Basic auth, so that every request to it carries an Authorization header."""
    config = htpasswd_config(tmp_path_factory.mktemp("guarded"), {USER: PASSWORD}) | storage_config(storage)
    with Registry(config) as registry:
        yield registry


def test_redirected_blobs_get_no_authorization_and_keep_their_range(guarded, tmp_path):
    image = busybox_image()
    blobs = image.blobs()
    layer = max(blobs, key=lambda digest: len(blobs[digest]))
    cut = 100_000
    with Cdn(blobs, cut={layer: cut}) as cdn, RedirectingFront(guarded.url, cdn) as front:
        done = pull(f"{front.host}/{BUSYBOX}", tmp_path / "bb", "--username", USER, password=PASSWORD)
        assert_pulled(done, tmp_path / "bb")
        assert front.blob_requests and all(h["authorization"].startswith("Basic ") for h in front.blob_requests)
        assert len(cdn.requests) == len(blobs) + 1  # each blob, and the broken one resumed
        assert not [h for h in cdn.requests if "authorization" in h]
        assert [h.get("range") for h in cdn.requests].count(f"bytes={cut}-") == 1
        assert {h.get("range") for h in front.blob_requests} == {None, f"bytes={cut}-"}  # sent, then followed


# -- pull-through mirrors


@pytest.fixture
def origin(storage):
    """A registry of its own for each test, so its counters count that test only."""
    with Registry(storage_config(storage)) as registry:
        yield registry


def test_mirror_configured_each_way_makes_the_origin_serve_each_blob_once(origin, tmp_path):
    config_home = tmp_path / "config"
    (config_home / "d-utils").mkdir(parents=True)
    image = f"{origin.host}/{BUSYBOX}"
    with Registry({"proxy": {"remoteurl": origin.url}}) as mirror:
        (config_home / "d-utils" / "mirrors.json").write_text(json.dumps({origin.host: [mirror.host]}))
        ways = {
            "flag": (["--mirror", mirror.host], {}),
            "environment": ([], {"D_UTILS_MIRRORS": f"docker.io=127.0.0.1:9,{origin.host}={mirror.host}"}),
            "config file": ([], {"XDG_CONFIG_HOME": str(config_home)}),
        }
        blobs = busybox_image().blobs()
        served = []  # by the origin, per blob, after each pull
        for n, (way, (args, env)) in enumerate(ways.items(), start=1):
            assert_pulled(pull(image, tmp_path / way, *args, **env), tmp_path / way)
            assert mirror.blob_gets() == n * len(blobs), way  # every blob of every pull came from the mirror
            served.append([origin.blob_gets(digest) for digest in blobs])
    # On its first miss, distribution 2.8's proxy fetches a blob twice (one stream for the client, one for its
    # storage); after that it never asks the origin again.
    assert all(1 <= count <= 2 for count in served[0]), served
    assert served == [served[0]] * len(ways)


def test_a_dead_mirror_falls_back_to_the_origin(origin, tmp_path):
    with socket.socket() as held:  # bound, never listening: refused, and no server of a test beside this one takes it
        held.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{held.getsockname()[1]}"
        done = pull(f"{origin.host}/{BUSYBOX}", tmp_path / "bb", "--mirror", dead)
    assert_pulled(done, tmp_path / "bb")
    assert f"not using mirror {dead}" in done.stderr
    assert origin.blob_gets() == len(busybox_image().blobs())


def test_a_mirror_without_the_image_falls_back_to_the_origin(origin, tmp_path):
    with Registry() as empty:
        done = pull(f"{origin.host}/{BUSYBOX}", tmp_path / "bb", "--mirror", empty.host)
        assert empty.manifest_gets() == 0
    assert_pulled(done, tmp_path / "bb")
    assert f"mirror {empty.host}" in done.stderr and "unknown image" in done.stderr


@pytest.mark.parametrize("name", ["busybox", "docker.io/busybox", "index.docker.io/library/busybox:latest"])
def test_docker_hub_names_reach_a_mirror_spelled_as_docker_hub_stores_them(name, plain, tmp_path):
    """Docker Hub itself is out of reach here: the mirror must serve the whole pull."""
    done = pull(name, tmp_path / "bb", "--mirror", plain.host)
    assert_pulled(done, tmp_path / "bb")
    asked = {entry["http.request.uri"] for entry in plain.responses()}
    assert "/v2/library/busybox/manifests/latest" in asked


# -- multi-platform indexes


@pytest.fixture(scope="module")
def indexes(plain) -> dict[str, str]:
    """A Docker manifest list (which docker-registry 2.8 silently answers with linux/amd64 when the client does not
    accept lists) and an OCI index with an attestation, both on nested paths."""
    docker_images = [replace(image, media="docker") for image in platform_images()]
    push_index(plain.host, "team/docker-list", "1.0", docker_images, media="docker")
    amd64, arm64 = platform_images()
    attestation = push_attestation(plain.host, "team/oci-index", amd64.manifest_digest)
    push_index(plain.host, "team/oci-index", "1.0", [amd64, arm64], extra=[attestation])
    return {"docker": f"{plain.host}/team/docker-list:1.0", "oci": f"{plain.host}/team/oci-index:1.0"}


@pytest.mark.parametrize("platform", ["linux/arm64/v8", "linux/arm64"])
def test_docker_manifest_list_gives_the_platform_asked_for(platform, indexes, tmp_path):
    done = pull(indexes["docker"], tmp_path / "m", "--platform", platform)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "rootfs" / "etc" / "arch").read_text() == "arm64\n"
    arm64 = replace(platform_images()[1], media="docker")
    assert json.loads((tmp_path / "m" / "image.json").read_text())["digest"] == arm64.manifest_digest


def test_attestations_are_never_chosen_nor_offered(indexes, tmp_path):
    done = pull(indexes["oci"], tmp_path / "m", "--platform", "unknown/unknown")
    assert_one_line_error(done, "no image for platform unknown/unknown", "it offers linux/amd64, linux/arm64/v8;")
    assert "offers unknown" not in done.stderr and ", unknown" not in done.stderr


# -- non-distributable layers: the manifest says where they live


class LayerHost(LoopbackServer):
    """Serves one blob at /layer, honouring Range, counting requests and the headers they carried."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.requests = blob, []
        super().__init__()

    class handler(Handler):  # noqa: N801 - LoopbackServer's attribute name
        def do_GET(self) -> None:
            self.owner.requests.append(dict(self.headers))
            start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
            ranged = {"Content-Range": f"bytes {start}-{len(self.owner.blob) - 1}/{len(self.owner.blob)}"}
            self.answer(206 if start else 200, self.owner.blob[start:], ranged if start else {})


@pytest.fixture
def foreign(tmp_path):
    """An image whose upper layer is non-distributable: listed with `urls`, absent from the registry."""
    image = replace(busybox_image(), media="docker")
    manifest = json.loads(image.manifest)
    layer = manifest["layers"][-1]
    blob = image.blobs()[layer["digest"]]
    allow = {"validation": {"manifests": {"urls": {"allow": ["^http://127\\.0\\.0\\.1"]}}}}
    with Registry(allow) as registry, LayerHost(blob) as host:
        layer |= {"mediaType": FOREIGN, "urls": [f"{host.url}/layer"]}
        for digest, data in image.blobs().items():
            if digest != layer["digest"]:
                push_blob(registry.host, "win", data)
        push_manifest(registry.host, "win", "latest", json.dumps(manifest).encode())
        yield f"{registry.host}/win:latest", host, layer["digest"]


FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def test_a_non_distributable_layer_is_a_clear_error_unless_allowed(foreign, tmp_path):
    reference, host, digest = foreign
    refused = d_pull(reference, str(tmp_path / "a"), cache=tmp_path / "cache")
    assert_one_line_error(refused, "non-distributable", digest, host.url, "--allow-foreign-urls")
    assert host.requests == []  # nothing fetched from elsewhere unless allowed

    allowed = d_pull("--allow-foreign-urls", reference, str(tmp_path / "a"), cache=tmp_path / "cache")
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "a" / "rootfs" / "etc" / "added-by-layer-2").exists()
    assert all("Authorization" not in headers for headers in host.requests)


# -- a proxy that compresses everything it can


class Nginx:
    """nginx on a free loopback port, in front of `upstream` (host:port), configured by `directives` (http level)."""

    def __init__(self, upstream: str, directives: str, folder: Path) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        temp = " ".join(
            f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.config = folder / "nginx.conf"
        self.config.write_text(
            f"daemon off; master_process off; pid {folder}/nginx.pid; error_log {folder}/error.log;\n"
            "events { worker_connections 64; }\n"
            f"http {{ access_log off; {temp} {directives}\n"
            f"  server {{ listen {self.host}; location / {{ proxy_pass http://{upstream}; proxy_set_header Host $http_host; }} }}\n"
            "}\n"
        )
        self.process = subprocess.Popen(["nginx", "-p", str(folder), "-c", str(self.config)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start: {self.process.stderr.read().decode()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


GZIP_EVERYTHING = "gzip on; gzip_types *; gzip_proxied any; gzip_min_length 1;"


def test_a_proxy_that_gzips_everything_it_may_does_not_touch_what_we_pull(plain, tmp_path):
    """We ask for Accept-Encoding: identity, so the proxy sends blobs as the registry stores them (it would gzip
    them for a client that accepts gzip, as requests does by default: checked first)."""
    layer = max(busybox_image().blobs().items(), key=lambda item: len(item[1]))[0]
    with Nginx(plain.host, GZIP_EVERYTHING, tmp_path) as proxy:
        url = f"http://{proxy.host}/v2/{BUSYBOX.split(':')[0]}/blobs/{layer}"
        compressed = requests.get(url, headers={"Accept-Encoding": "gzip"}, timeout=30, stream=True)
        assert compressed.status_code == 200 and compressed.headers.get("Content-Encoding") == "gzip"
        compressed.close()
        assert_pulled(pull(f"{proxy.host}/{BUSYBOX}", tmp_path / "bb"), tmp_path / "bb")


def test_a_host_name_that_does_not_resolve_is_one_line_at_once(tmp_path):
    started = time.monotonic()
    done = pull("no-such-registry.invalid/team/app:1", tmp_path / "app")
    assert time.monotonic() - started < QUICK
    assert_one_line_error(done, "cannot find the host no-such-registry.invalid")
    assert "retrying" not in done.stderr
