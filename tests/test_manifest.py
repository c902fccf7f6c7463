"""Platform choice and manifest checks, without a network: pure functions on JSON."""

import json

import pytest

from dutils.errors import Error
from dutils.manifest import (
    Platform,
    choose_platform,
    host_platform,
    image_from_manifest,
    parse_manifest,
    parse_platform,
)
from dutils.reference import parse_reference

REF = parse_reference("127.0.0.1:5000/app:1")
D = {name: "sha256:" + hexdigit * 64 for name, hexdigit in zip(["amd64", "arm64", "armv7", "att"], "1234", strict=True)}
INDEX = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [
        {"digest": D["att"], "size": 1, "platform": {"os": "unknown", "architecture": "unknown"}},
        {"digest": D["amd64"], "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": D["arm64"], "size": 1, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": D["armv7"], "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
    ],
}


@pytest.mark.parametrize(
    ("wanted", "chosen"),
    [("linux/amd64", "amd64"), ("linux/arm64", "arm64"), ("linux/arm64/v8", "arm64"), ("linux/arm/v7", "armv7")],
)
def test_index_is_narrowed_to_the_wanted_platform(wanted, chosen):
    assert choose_platform(INDEX, parse_platform(wanted), REF)["digest"] == D[chosen]


def test_arm64_without_variant_in_index_matches_v8():
    index = {"manifests": [{"digest": D["arm64"], "platform": {"os": "linux", "architecture": "arm64"}}]}
    assert choose_platform(index, parse_platform("linux/arm64/v8"), REF)["digest"] == D["arm64"]


def test_attestations_are_never_chosen_and_missing_platform_lists_offers():
    with pytest.raises(Error) as caught:
        choose_platform(INDEX, Platform("unknown", "unknown"), REF)
    with pytest.raises(Error) as caught2:
        choose_platform(INDEX, parse_platform("linux/s390x"), REF)
    for message in (str(caught.value), str(caught2.value)):
        assert "it offers linux/amd64, linux/arm/v7, linux/arm64/v8; choose one with --platform" in message


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d"])
def test_bad_platforms_are_refused(text):
    with pytest.raises(Error, match="OS/ARCH"):
        parse_platform(text)


def test_host_platform_is_linux():
    assert host_platform().os == "linux" and host_platform().arch


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
        (json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(), "unsupported media type"),
    ],
)
def test_bad_manifests_are_refused_clearly(body, says):
    with pytest.raises(Error, match=says):
        parse_manifest(body, "", REF)


def test_manifest_without_layers_is_refused():
    body = json.dumps({"schemaVersion": 2, "config": {}}).encode()
    manifest = parse_manifest(body, "application/vnd.oci.image.manifest.v1+json", REF)
    with pytest.raises(Error, match="config or layers"):
        image_from_manifest(manifest, D["amd64"], host_platform(), REF)


def test_descriptor_digests_must_be_sha256():
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": "sha256:../../etc", "size": 1},
        "layers": [],
    }
    with pytest.raises(Error, match="digest"):
        image_from_manifest(manifest, D["amd64"], host_platform(), REF)
