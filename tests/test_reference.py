"""Reference parsing is pure: every rule of Docker's grammar that users meet, and clear errors."""

import pytest

from dutils.errors import Error
from dutils.reference import checked_url, parse_reference, shown_url

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/team/sub/app:1.0", "localhost:5000", "team/sub/app", "1.0", None),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000", "busybox", "latest", None),
        ("ghcr.io/owner/image@" + DIGEST, "ghcr.io", "owner/image", None, DIGEST),
        ("quay.io/org/img:tag@" + DIGEST, "quay.io", "org/img", "tag", DIGEST),
        ("registry.example.com:8443/a/b-c_d.e:x_Y.z-1", "registry.example.com:8443", "a/b-c_d.e", "x_Y.z-1", None),
    ],
)
def test_parses_like_docker(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_docker_hub_is_served_elsewhere_and_digest_wins():
    ref = parse_reference("alpine:3@" + DIGEST)
    assert ref.api_host == "registry-1.docker.io"
    assert ref.wanted == DIGEST
    assert ref.scope == "repository:library/alpine:pull"
    assert str(ref) == f"docker.io/library/alpine:3@{DIGEST}"


def test_default_folder_name_is_the_last_component():
    assert parse_reference("localhost:5000/team/app:1").name == "app"


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:5000/x",
        "127.255.0.9:5000/x",
        "localhost:1/x",
        "localhost/x",
        "LocalHost:5000/x",
        "[::1]:5000/x",
        "[::1]/x",
        "[0:0:0:0:0:0:0:1]:5000/x",
        "[0000:0000:0000:0000:0000:0000:0000:0001]:5000/x",
        "[::ffff:127.0.0.1]:5000/x",
        "[::FFFF:7f00:1]:5000/x",
    ],
)
def test_loopback_registries_are_local_in_every_spelling(text):
    assert parse_reference(text).is_local


@pytest.mark.parametrize(
    "text",
    ["ghcr.io/x/y", "alpine", "10.0.0.1:5000/x", "[::2]:5000/x", "[::ffff:10.0.0.1]:1/x", "localhost.evil.com/x"],
)
def test_other_registries_are_not_local(text):
    assert not parse_reference(text).is_local


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Alpine", "lowercase"),
        ("alpine:", "bad tag"),
        ("alpine:a:b", "bad tag"),
        ("", "lowercase"),
        ("a//b", "lowercase"),
        ("alpine@sha256:123", "digest"),
        ("alpine@md5:" + "0" * 32, "digest"),
        ("ex ample.com/x", "bad registry host"),
        ("alpine:" + "t" * 200, "bad tag"),
    ],
)
def test_invalid_references_say_what_is_wrong(text, says):
    with pytest.raises(Error) as caught:
        parse_reference(text)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.example/token?x=1",
        "http://127.0.0.1:5000/v2/app/blobs/sha256:ab",
        "https://[::1]:443/t",
        "HTTPS://Host.Example/t",
    ],
)
def test_plain_http_urls_pass(url):
    assert checked_url(url, "the realm") == url


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://host/x",
        "https://user:secret@host/x",
        "https://user@host/x",
        "https:///nohost",
        "https://host:99999/x",
        "https://host:port/x",
        "http://[::1/x",
        "https://host/a b",
        "https://host/\x1b[2J",
        "https://ho\tst/x",
        "/relative",
        "",
    ],
)
def test_urls_that_are_not_plain_http_are_one_line_without_their_user_info(url):
    with pytest.raises(Error, match="the realm is not a plain http") as caught:
        checked_url(url, "the realm")
    assert "secret" not in str(caught.value) and "\x1b" not in str(caught.value) and "\t" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@host/x", "https://host/x"),
        ("http:u:p@host", "host"),
        ("https://host/x@y", "https://host/x@y"),
        ("https://a@b@host/", "https://host/"),
    ],
)
def test_shown_urls_never_carry_user_info(url, shown):
    assert shown_url(url) == shown
