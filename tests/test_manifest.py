"""Platform choice and manifest checks: pure functions on JSON first, then pulls from a real registry."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from cli import BIN, assert_one_line_error, d_pull
from images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Tar,
    busybox_image,
    busybox_layer,
    canonical_json,
    descriptor,
    index,
    push,
    push_blob,
    push_index,
    push_manifest,
    sha256,
)
from malicious import as_root, make_workspace

from dutils.errors import Error
from dutils.manifest import (
    MAX_LAYERS,
    MAX_PROBES,
    Platform,
    choose_platform,
    compatible,
    host_platform,
    image_from_manifest,
    parse_manifest,
    parse_platform,
)
from dutils.oci import MAX_CONFIG
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
    index = {"manifests": [{"digest": D["arm64"], "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}]}
    assert choose_platform(index, parse_platform("linux/arm64/v8"), REF)["digest"] == D["arm64"]


def test_attestations_are_never_chosen_and_missing_platform_lists_offers():
    with pytest.raises(Error) as caught:
        choose_platform(INDEX, Platform("unknown", "unknown"), REF)
    with pytest.raises(Error) as caught2:
        choose_platform(INDEX, parse_platform("linux/s390x"), REF)
    for message in (str(caught.value), str(caught2.value)):
        assert "it offers linux/amd64, linux/arm/v7, linux/arm64/v8; choose one with --platform" in message


# -- normalisation and order, as containerd's platforms package


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/7", "linux/arm/v7"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/aarch64", "linux/arm64/v8"),
        ("linux/arm64/v8.0", "linux/arm64/v8"),
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/x86-64/v1", "linux/amd64"),
        ("Linux/AMD64/V3", "linux/amd64/v3"),
        ("linux/i386", "linux/386"),
    ],
)
def test_platforms_are_normalised(text, normal):
    assert str(parse_platform(text)) == normal


@pytest.mark.parametrize(
    ("wanted", "order"),
    [
        ("linux/amd64", ["linux/amd64", "linux/386"]),
        ("linux/amd64/v3", ["linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386"]),
        ("linux/arm/v7", ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm/v5", ["linux/arm/v5"]),
        ("linux/arm64", ["linux/arm64/v8", "linux/arm/v8", "linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        ("linux/arm64/v8.2", ["linux/arm64/v8.2", "linux/arm64/v8.1", "linux/arm64/v8", "linux/arm/v8"]),
        ("linux/s390x", ["linux/s390x"]),
    ],
)
def test_compatible_platforms_best_first(wanted, order):
    found = [str(platform) for platform in compatible(parse_platform(wanted))]
    assert found[: len(order)] == order


def test_arm64_v9_runs_v8_up_to_five_minors_more():
    found = [str(p) for p in compatible(parse_platform("linux/arm64/v9"))]
    assert found[:3] == ["linux/arm64/v9", "linux/arm64/v8.5", "linux/arm64/v8.4"]


def entries(*platforms: str) -> dict:
    """An index whose n-th entry has digest sha256:<n…> and the n-th platform ("-" for none)."""
    manifests = []
    for n, text in enumerate(platforms):
        entry = {"digest": f"sha256:{n:064x}", "size": 1}
        if text != "-":
            os, arch, *variant = text.split("/")
            entry["platform"] = {"os": os, "architecture": arch} | ({"variant": variant[0]} if variant else {})
        manifests.append(entry)
    return {"manifests": manifests}


def chosen(index: dict, wanted: str, **kwargs) -> int:
    return int(choose_platform(index, parse_platform(wanted), REF, **kwargs)["digest"][7:], 16)


@pytest.mark.parametrize(
    ("offered", "wanted", "picked"),
    [
        (["linux/amd64/v3", "linux/amd64"], "linux/amd64", 1),  # plain amd64 is v1: v3 would not run
        (["linux/amd64/v3", "linux/amd64"], "linux/amd64/v3", 0),
        (["linux/amd64/v3", "linux/amd64"], "linux/amd64/v2", 1),
        (["linux/386", "linux/amd64"], "linux/amd64", 1),
        (["linux/386", "linux/arm64"], "linux/amd64", 0),  # 386 runs on amd64
        (["linux/arm/v6", "linux/arm/v7"], "linux/arm", 1),  # Docker Hub's order: v7 is still chosen for arm
        (["linux/arm/v5", "linux/arm/v6"], "linux/arm/v7", 1),  # no v7: the best lower variant
        (["linux/arm", "linux/arm64"], "linux/arm64", 1),
        (["linux/arm/v7", "linux/s390x"], "linux/arm64", 0),  # 32-bit arm on arm64
        (["linux/aarch64", "linux/x86_64"], "linux/amd64", 1),  # uname's spellings in an index
    ],
)
def test_the_best_compatible_entry_is_chosen(offered, wanted, picked):
    assert chosen(entries(*offered), wanted) == picked


def test_a_higher_variant_is_never_chosen():
    with pytest.raises(Error, match="no image for platform linux/arm/v6.*it offers linux/arm/v7"):
        chosen(entries("linux/arm/v7"), "linux/arm/v6")


def test_entries_without_platform_are_probed_only_when_needed():
    probed = []

    def probe(entry: dict) -> Platform:
        probed.append(entry["digest"])
        return parse_platform("linux/arm64")

    index = entries("-", "linux/amd64", "unknown/unknown")
    assert chosen(index, "linux/amd64", probe=probe) == 1
    assert probed == []  # the exact match is declared: nothing to look into
    assert chosen(index, "linux/arm64", probe=probe) == 0
    assert chosen(entries("-", "linux/arm/v7"), "linux/arm64", probe=probe) == 0  # arm64 beats arm/v7
    assert len(probed) == 2


def test_entries_that_are_not_images_are_skipped_and_probes_are_bounded():
    index = entries("-", "-")
    assert chosen(index, "linux/amd64", probe=lambda entry: None if entry["digest"].endswith("0") else AMD64) == 1
    with pytest.raises(Error, match=f"{MAX_PROBES + 1} entries without a platform, more than {MAX_PROBES}"):
        chosen(entries(*["-"] * (MAX_PROBES + 1)), "linux/amd64", probe=lambda entry: AMD64)


AMD64 = Platform("linux", "amd64")


def test_host_platform_is_linux_and_normalised():
    platform = host_platform()
    assert platform.os == "linux" and platform.arch
    assert parse_platform(str(platform)) == platform


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d"])
def test_bad_platforms_are_refused(text):
    with pytest.raises(Error, match="OS/ARCH"):
        parse_platform(text)


# -- manifests: JSON, types, artifacts, encrypted and too many layers


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b"\xff\xfe", "not JSON"),
        (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "not JSON"),  # nested beyond Python's recursion limit
        (b'{"layers":[' + b"{}," * 200_000 + b"{}]}", "more than 100000 JSON objects"),  # 140 MB parsed
        (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "schema 1"),
        (json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(), "unsupported media type"),
        (json.dumps({"schemaVersion": 2, "mediaType": ["x"]}).encode(), "mediaType is not a string"),
    ],
)
def test_bad_manifests_are_refused_clearly(body, says):
    with pytest.raises(Error, match=says):
        parse_manifest(body, "", REF)


LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D["amd64"], "size": 10}
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D["arm64"], "size": 2}


def manifest(**fields) -> dict:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": CONFIG, "layers": [LAYER]} | fields


def test_a_valid_manifest_gives_its_blobs():
    image = image_from_manifest(manifest(), D["armv7"], REF)
    assert (image.config.digest, [layer.digest for layer in image.layers]) == (D["arm64"], [D["amd64"]])


@pytest.mark.parametrize(
    ("fields", "field", "kind"),
    [
        ({"config": "x"}, "config", "a JSON object"),
        ({"config": None}, "config", "a JSON object"),
        ({"layers": {}}, "layers", "a list"),
        ({"layers": None}, "layers", "a list"),
        ({"layers": ["x"]}, "layers[0]", "a JSON object"),
        ({"layers": [LAYER | {"size": "10"}]}, "layers[0].size", "a non-negative integer"),
        ({"layers": [LAYER | {"size": True}]}, "layers[0].size", "a non-negative integer"),
        ({"layers": [LAYER | {"size": -1}]}, "layers[0].size", "a non-negative integer"),
        ({"layers": [LAYER | {"size": 1.5}]}, "layers[0].size", "a non-negative integer"),
        ({"layers": [LAYER, LAYER | {"digest": 7}]}, "layers[1].digest", "a string"),
        ({"layers": [LAYER | {"mediaType": ["x"]}]}, "layers[0].mediaType", "a string"),
        ({"layers": [LAYER | {"urls": "http://x"}]}, "layers[0].urls", "a list of strings"),
        ({"layers": [LAYER | {"urls": [1]}]}, "layers[0].urls", "a list of strings"),
        ({"config": CONFIG | {"size": None}}, "config.size", "a non-negative integer"),
        ({"artifactType": 5}, "artifactType", "a string"),
    ],
)
def test_wrong_json_types_name_the_field(fields, field, kind):
    with pytest.raises(Error) as caught:
        image_from_manifest(manifest(**fields), D["armv7"], REF)
    assert f"the manifest of {REF}: {field} is not {kind}" in str(caught.value)


@pytest.mark.parametrize(
    ("index_fields", "field"),
    [
        ({"manifests": {}}, "manifests"),
        ({"manifests": ["x"]}, "manifests[0]"),
        ({"manifests": [{"digest": D["amd64"]}]}, "manifests[0].size"),
        ({"manifests": [{"digest": D["amd64"], "size": 1, "platform": "linux"}]}, "platform of index entry"),
        ({"manifests": [{"digest": D["amd64"], "size": 1, "platform": {"architecture": 1}}]}, "architecture"),
    ],
)
def test_wrong_json_types_in_an_index_name_the_field(index_fields, field):
    with pytest.raises(Error, match=f"the manifest of {re.escape(str(REF))}: .*{re.escape(field)}.* is not"):
        choose_platform(index_fields, host_platform(), REF)


def test_malformed_digests_are_refused():
    with pytest.raises(Error, match="digest"):
        image_from_manifest(manifest(config=CONFIG | {"digest": "sha256:../../etc"}), D["amd64"], REF)


HELM = "application/vnd.cncf.helm.config.v1+json"
ORAS = "application/vnd.oras.config.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"config": CONFIG | {"mediaType": HELM}}, HELM),
        ({"config": CONFIG | {"mediaType": ORAS}}, ORAS),
        ({"config": CONFIG | {"mediaType": EMPTY}, "artifactType": "application/vnd.example+type"}, "vnd.example"),
        ({"config": CONFIG | {"mediaType": EMPTY}}, EMPTY),
        ({"artifactType": "application/vnd.dev.sigstore.bundle+json"}, "sigstore"),
    ],
)
def test_artifacts_are_not_images(fields, named):
    with pytest.raises(Error, match=f"is not a container image but an artifact of type '[^']*{re.escape(named)}"):
        image_from_manifest(manifest(**fields), D["amd64"], REF)


@pytest.mark.parametrize(
    ("media_type", "says"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", "encrypted layers"),
        ("application/vnd.oci.image.layer.v1.tar+encrypted", "encrypted layers"),
        ("application/vnd.cncf.helm.chart.content.v1.tar+gzip", "unsupported media type"),
    ],
)
def test_layers_that_cannot_be_applied_are_refused_with_the_manifest(media_type, says):
    layers = [LAYER, LAYER | {"mediaType": media_type}]
    with pytest.raises(Error, match=f"{says}.*{media_type.replace('+', '.')}"):
        image_from_manifest(manifest(layers=layers), D["amd64"], REF)


def test_more_layers_than_any_real_image_are_refused():
    image_from_manifest(manifest(layers=[LAYER] * MAX_LAYERS), D["amd64"], REF)
    with pytest.raises(Error, match=f"{MAX_LAYERS + 1} layers, more than the {MAX_LAYERS}"):
        image_from_manifest(manifest(layers=[LAYER] * (MAX_LAYERS + 1)), D["amd64"], REF)


# -- through a real registry: what the config says decides


def pull(reference: str, tmp_path, *args: str):
    return d_pull(*args, reference, str(tmp_path / "pulled"), cache=tmp_path / "cache")


def blob_gets(registry, blobs) -> int:
    """How many times the registry has served any of `blobs` (bytes) so far."""
    return sum(registry.blob_gets(sha256(blob)) for blob in blobs)


def recorded_platform(tmp_path) -> str:
    return json.loads((tmp_path / "pulled" / "image.json").read_text())["platform"]


def arch_image(arch: str, variant: str = "") -> Image:
    """busybox with /etc/arch naming the platform its config declares."""
    name = "/".join(filter(None, (arch, variant)))
    return Image(layers=[busybox_layer(), Tar().file("etc/arch", f"{name}\n".encode())], arch=arch, variant=variant)


def test_a_single_manifest_for_another_architecture_is_refused_unless_asked_for(registry, tmp_path):
    reference, image = f"{registry.host}/single/arm64:1", arch_image("arm64", "v8")
    push(registry.host, "single/arm64", "1", image)
    before = blob_gets(registry, image.layer_blobs)
    done = pull(reference, tmp_path / "default")
    assert_one_line_error(done, "is an image for linux/arm64/v8, not for linux/amd64", "--platform linux/arm64/v8")
    assert blob_gets(registry, image.layer_blobs) == before
    assert pull(reference, tmp_path / "other", "--platform", "linux/s390x").returncode == 1
    done = pull(reference, tmp_path, "--platform", "linux/aarch64")
    assert done.returncode == 0, done.stderr
    assert recorded_platform(tmp_path) == "linux/arm64/v8"


def test_the_platform_recorded_is_the_one_the_config_declares(registry, tmp_path):
    push(registry.host, "single/v2", "1", arch_image("amd64", "v1"))  # v1: amd64's own level
    done = pull(f"{registry.host}/single/v2:1", tmp_path, "--platform", "linux/amd64/v3")
    assert done.returncode == 0, done.stderr
    assert recorded_platform(tmp_path) == "linux/amd64"


@pytest.mark.parametrize(
    ("wanted", "arch"),
    [(None, "amd64"), ("linux/amd64/v3", "amd64/v3"), ("linux/arm", "arm/v7"), ("linux/arm/v8", "arm/v7")],
)
def test_an_index_ordered_as_docker_hub_gives_what_containerd_gives(registry, tmp_path, wanted, arch):
    images = [arch_image("amd64", "v3"), arch_image("amd64"), arch_image("arm", "v6"), arch_image("arm", "v7")]
    reference = f"{registry.host}/ordered:1"
    push_index(registry.host, "ordered", "1", images)
    done = pull(reference, tmp_path, *(["--platform", wanted] if wanted else []))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pulled" / "rootfs" / "etc" / "arch").read_text() == f"{arch}\n"
    assert recorded_platform(tmp_path) == f"linux/{arch}"


def test_an_index_entry_without_platform_is_matched_through_its_config(registry, tmp_path):
    arm64, amd64 = arch_image("arm64", "v8"), arch_image("amd64")
    for image in (arm64, amd64):
        push(registry.host, "bare", image.manifest_digest, image)
    bare = [descriptor(OCI_MANIFEST, image.manifest) for image in (arm64, amd64)]  # no `platform`, as ggcr's
    push_manifest(registry.host, "bare", "1", index(bare))
    before = blob_gets(registry, arm64.layer_blobs[1:])  # [0] is busybox, shared with amd64
    done = pull(f"{registry.host}/bare:1", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pulled" / "rootfs" / "etc" / "arch").read_text() == "amd64\n"
    assert blob_gets(registry, arm64.layer_blobs[1:]) == before  # only configs were read to choose
    done = pull(f"{registry.host}/bare:1", tmp_path / "s390x", "--platform", "linux/s390x")
    assert_one_line_error(done, "no image for platform linux/s390x", "it offers linux/amd64, linux/arm64/v8")


def test_an_artifact_listed_without_platform_is_passed_over(registry, tmp_path):
    """A signature stored in the index beside the image, both without `platform`: the image is chosen."""
    config, signature = b"{}", b'{"critical": {}}'
    for blob in (config, signature):
        push_blob(registry.host, "signed", blob)
    artifact = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            "config": descriptor("application/vnd.oci.empty.v1+json", config),
            "layers": [descriptor("application/vnd.dev.cosign.simplesigning.v1+json", signature)],
        }
    )
    push_manifest(registry.host, "signed", sha256(artifact), artifact)
    amd64 = arch_image("amd64")
    push(registry.host, "signed", amd64.manifest_digest, amd64)
    push_manifest(
        registry.host, "signed", "1", index([descriptor(OCI_MANIFEST, m) for m in (artifact, amd64.manifest)])
    )
    done = pull(f"{registry.host}/signed:1", tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "pulled" / "image.json").read_text())["digest"] == amd64.manifest_digest


@pytest.mark.parametrize(
    ("config_type", "artifact_type", "named"),
    [
        ("application/vnd.cncf.helm.config.v1+json", None, "helm.config"),
        ("application/vnd.oras.config.v1+json", None, "oras.config"),
        ("application/vnd.oci.empty.v1+json", "application/vnd.example.sbom+json", "vnd.example.sbom"),
    ],
)
def test_artifacts_are_refused_before_any_blob_is_fetched(registry, tmp_path, config_type, artifact_type, named):
    """As `helm push` and `oras push` shape them; PUT as they do, to a real registry."""
    config, layer = b"{}", Tar().file("chart/Chart.yaml", b"name: x\n").to_bytes()
    for blob in (config, layer):
        push_blob(registry.host, "artifact", blob)
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": [descriptor("application/vnd.cncf.helm.chart.content.v1.tar+gzip", layer)],
    } | ({"artifactType": artifact_type} if artifact_type else {})
    tag = named.replace(".", "-")
    push_manifest(registry.host, "artifact", tag, canonical_json(body))
    before = blob_gets(registry, [config, layer])
    done = pull(f"{registry.host}/artifact:{tag}", tmp_path)
    assert_one_line_error(done, "is not a container image but an artifact of type", named)
    assert blob_gets(registry, [config, layer]) == before


def test_an_encrypted_image_is_refused_before_any_layer_is_fetched(registry, tmp_path):
    image = busybox_image()
    body = json.loads(image.manifest)
    body["layers"][1]["mediaType"] += "+encrypted"
    for blob in image.blobs().values():
        push_blob(registry.host, "encrypted", blob)
    push_manifest(registry.host, "encrypted", "1", canonical_json(body))
    before = blob_gets(registry, image.blobs().values())
    done = pull(f"{registry.host}/encrypted:1", tmp_path)
    assert_one_line_error(done, "has encrypted layers", "+encrypted", "--decryption-key")
    assert not (tmp_path / "pulled" / "rootfs").exists()
    assert blob_gets(registry, image.blobs().values()) == before


def test_too_many_layers_are_refused_at_manifest_time(registry, tmp_path):
    image = replace(busybox_image(), layers=[Tar().file("x", b"1").to_bytes()] * (MAX_LAYERS + 1))
    push(registry.host, "many", "1", image)
    before = blob_gets(registry, image.blobs().values())
    done = pull(f"{registry.host}/many:1", tmp_path)
    assert_one_line_error(done, f"{MAX_LAYERS + 1} layers, more than the {MAX_LAYERS}")
    assert blob_gets(registry, image.blobs().values()) == before


def test_an_index_of_indexes_is_refused_in_one_line(registry, tmp_path):
    inner = index([arch_image("amd64").index_entry()])
    push(registry.host, "nested", arch_image("amd64").manifest_digest, arch_image("amd64"))
    push_manifest(registry.host, "nested", sha256(inner), inner)
    outer = index([descriptor(OCI_INDEX, inner) | {"platform": {"os": "linux", "architecture": "amd64"}}])
    push_manifest(registry.host, "nested", "1", outer)
    assert_one_line_error(pull(f"{registry.host}/nested:1", tmp_path), "index of indexes")


# -- the image config: capped, verified at every read, its types checked, its memory bounded


def push_config(registry, repo: str, config_blob: bytes, image: Image, size: int | None = None) -> str:
    """Pushes `image` with `config_blob` for its config (listed with `size` if given); returns the reference."""
    body = json.loads(image.manifest)
    body["config"] = descriptor(body["config"]["mediaType"], config_blob)
    body["config"]["size"] = body["config"]["size"] if size is None else size
    for blob in (config_blob, *image.layer_blobs):
        push_blob(registry.host, repo, blob)
    push_manifest(registry.host, repo, "1", canonical_json(body))
    return f"{registry.host}/{repo}:1"


def config_of(image: Image, **fields) -> bytes:
    return canonical_json(json.loads(image.config_blob) | fields)


def test_a_config_larger_than_the_cap_is_refused_before_it_is_fetched(registry, tmp_path):
    image = busybox_image()
    config_blob = config_of(image)
    reference = push_config(registry, "config/huge", config_blob, image, size=MAX_CONFIG + 1)
    before = blob_gets(registry, [config_blob, *image.layer_blobs])
    done = pull(reference, tmp_path)
    assert_one_line_error(done, f"has {MAX_CONFIG + 1} bytes, more than {MAX_CONFIG}")
    assert blob_gets(registry, [config_blob, *image.layer_blobs]) == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"config": ["sh"]}, "config is not a JSON object"),
        ({"architecture": 64}, "architecture is not a string"),
        ({"rootfs": {"type": "layers", "diff_ids": "sha256:0"}}, "rootfs.diff_ids is not a list"),
        ({"rootfs": {"type": "layers", "diff_ids": [None, None]}}, "rootfs.diff_ids[0] is not a sha256 digest"),
        ({"rootfs": {"type": "layers", "diff_ids": []}}, "lists 0 layer diff_ids for 2 layers"),
        ({"architecture": ""}, "names no architecture"),
    ],
)
def test_wrong_json_types_in_a_pulled_config_are_one_line_naming_the_field(fields, field, registry, tmp_path):
    image = busybox_image()
    config_blob = config_of(image, **fields)
    reference = push_config(registry, f"config/types-{sha256(config_blob)[7:19]}", config_blob, image)
    before = blob_gets(registry, image.layer_blobs)
    done = pull(reference, tmp_path)
    assert_one_line_error(done, field)
    assert "internal error" not in done.stderr
    assert blob_gets(registry, image.layer_blobs) == before  # found before any layer is fetched


def test_a_config_planted_in_the_cache_is_never_trusted(images, tmp_path):
    assert pull(images["busybox"], tmp_path / "first").returncode == 0
    digest = json.loads(busybox_image().manifest)["config"]["digest"]
    planted = tmp_path / "first" / "cache" / "blobs" / "sha256" / digest[7:]
    evil = json.loads(planted.read_bytes())
    evil["config"]["Cmd"] = ["sh", "-c", "echo pwned"]
    planted.write_bytes(json.dumps(evil).encode())
    done = pull(images["busybox"], tmp_path / "first", "--update")
    assert_one_line_error(done, f"the image config {digest} in the cache does not match its digest", str(planted))
    done = d_pull(images["busybox"], str(tmp_path / "second"), cache=tmp_path / "first" / "cache")
    assert_one_line_error(done, "does not match its digest")
    assert not (tmp_path / "second" / "config.json").exists()


PEAK_RSS = (
    "import sys; from dutils.pull import main; code = main(sys.argv[1:]);"
    "print(code, next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"
)


@pytest.mark.parametrize("objects", [99_000, 1_300_000])
def test_a_config_of_the_most_objects_and_bytes_stays_small_in_memory(objects, registry, tmp_path):
    """4 MiB of `{},` would take 100 MB once parsed: up to 100,000 objects are parsed, more are refused unread."""
    image = busybox_image()
    history = [{}] * objects
    config_blob = config_of(image, history=history)
    padding = MAX_CONFIG - len(config_blob) - 20
    if padding > 0:
        config_blob = config_of(image, history=history, comment="x" * padding)
    assert MAX_CONFIG - 100 < len(config_blob) <= MAX_CONFIG
    reference = push_config(registry, f"config/objects-{objects}", config_blob, image)
    argv = ["-q", "--cache", str(tmp_path / "cache"), reference, str(tmp_path / "pulled")]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True, timeout=120)
    code, peak_kib = map(int, done.stdout.split())
    assert peak_kib < 150_000, peak_kib  # KiB
    if objects < 100_000:
        assert code == 0, done.stderr
    else:
        assert code == 1 and "more than 100000 JSON objects and arrays" in done.stderr


EMPTY_IMAGE = Image(layers=[], config={"Cmd": ["/busybox", "echo", "from an empty root"]})


def test_an_image_of_no_layers_runs_with_an_empty_root(registry, tmp_path):
    """As containerd and umoci have it: the pull succeeds, DIR/rootfs is empty, and d-run runs what is bound in."""
    push(registry.host, "empty", "1", EMPTY_IMAGE)
    done = pull(f"{registry.host}/empty:1", tmp_path)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "pulled" / "rootfs").iterdir()) == []
    d_run = [BIN / "d-run", "-v", "/bin/busybox:/busybox", tmp_path / "pulled"]
    ran = subprocess.run(d_run, capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "from an empty root\n"), ran.stderr


@as_root
def test_an_image_of_no_layers_runs_for_the_ordinary_user(registry, unprivileged):
    push(registry.host, "empty", "1", EMPTY_IMAGE)
    workspace = make_workspace()
    try:
        folder, cache = workspace / "pull" / "empty", workspace / "pull" / "cache"
        done = unprivileged.tool("d-pull", "--cache", cache, f"{registry.host}/empty:1", folder)
        assert done.returncode == 0, done.stderr
        ran = unprivileged.tool("d-run", "-v", "/bin/busybox:/busybox", folder, timeout=60)
        assert (ran.returncode, ran.stdout) == (0, "from an empty root\n"), ran.stderr
    finally:
        shutil.rmtree(workspace)
