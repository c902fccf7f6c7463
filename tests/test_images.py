"""Whole images through a real registry and d-pull: the layer catalogue, pushed by our helpers and by skopeo in
every media type and compression, pulled as root and as the ordinary user and compared with umoci's unpacking;
Docker foreign layers; and a Debian minbase image built by debootstrap that d-run can use."""

import json
import pwd
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from catalogue import DEVICES, assert_same_as_umoci_rootless, catalogue_image, unpack_with_umoci
from cli import assert_one_line_error, d_pull
from images import MEDIA_TYPES, Image, Tar, canonical_json, push, push_blob, push_manifest, skopeo_push
from malicious import USER, as_root, make_workspace
from registry import Registry, session
from trees import snapshot

# -- the catalogue, end to end

# How the catalogue image reaches the registry: our push in each media type and compression, or skopeo's copy of
# the OCI layout umoci unpacks ("oci" keeps the manifest, "v2s2" converts it to Docker's). Every one is compared
# with umoci's unpacking of the gzip layout: umoci 0.4.7 cannot read zstd, and the layers' content is the same.
MEDIAS, COMPRESSIONS = ("oci", "docker"), ("gzip", "none", "zstd")
PUSHES = [
    *(f"push-{media}-{compression}" for media in MEDIAS for compression in COMPRESSIONS),
    "skopeo-oci",
    "skopeo-v2s2",
]


@pytest.fixture(scope="module")
def workspace(unprivileged) -> Path:
    """A folder the ordinary user can reach, with a `pull` folder it owns."""
    workspace = make_workspace()
    yield workspace
    shutil.rmtree(workspace)


@pytest.fixture(scope="module")
def umoci(workspace: Path) -> dict[str, Path]:
    return unpack_with_umoci(workspace)


@pytest.fixture(scope="module")
def catalogue_refs(registry: Registry, umoci: dict[str, Path]) -> dict[str, str]:
    """Each way of PUSHES -> the reference it pushed the catalogue image to."""
    refs = {name: f"{registry.host}/catalogue:{name}" for name in PUSHES}
    for media in MEDIAS:
        for compression in COMPRESSIONS:
            image = replace(catalogue_image(), media=media, compression=compression)
            push(registry.host, "catalogue", f"push-{media}-{compression}", image)
    for manifest_format in ("oci", "v2s2"):
        skopeo_push(umoci["layout"], "catalogue", refs[f"skopeo-{manifest_format}"], manifest_format)
    return refs


def layer_types(registry: Registry, ref: str) -> set[str]:
    """The layer media types of the manifest the registry serves for `ref`."""
    with session() as http:
        tag = ref.rsplit(":", 1)[1]
        accept = {"Accept": ", ".join(MEDIA_TYPES[media]["manifest"] for media in MEDIA_TYPES)}
        answer = http.get(f"{registry.url}/v2/catalogue/manifests/{tag}", headers=accept, timeout=30)
        answer.raise_for_status()
    return {layer["mediaType"] for layer in answer.json()["layers"]}


@as_root
@pytest.mark.parametrize("how", PUSHES)
def test_catalogue_pulled_as_root_is_umocis_tree(how: str, catalogue_refs, umoci, tmp_path: Path) -> None:
    done = d_pull(catalogue_refs[how], str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # root reproduces devices and owners
    assert snapshot(tmp_path / "pulled" / "rootfs") == snapshot(umoci["root"])  # owners and mtimes included


@as_root
@pytest.mark.parametrize("how", PUSHES)
def test_catalogue_pulled_as_the_ordinary_user_is_umocis_rootless_tree(
    how: str, catalogue_refs, umoci, workspace: Path, unprivileged
) -> None:
    folder = workspace / "pull" / how
    done = unprivileged.run(
        [unprivileged.bin / "d-pull", "--cache", workspace / "pull" / "cache", catalogue_refs[how], folder],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"d-pull: warning: as an ordinary user: {len(DEVICES)} device nodes skipped, 2 entries"
        " owned by other users in the image now belong to you"
    ]
    assert_same_as_umoci_rootless(folder / "rootfs", umoci["rootless"])
    user = pwd.getpwnam(USER)
    assert {entry.owner for entry in snapshot(folder / "rootfs")[0].values()} == {(user.pw_uid, user.pw_gid)}


@as_root
def test_each_push_stores_the_layer_types_it_names(registry: Registry, catalogue_refs) -> None:
    expected = {
        f"push-{media}-{compression}": MEDIA_TYPES[media][compression]
        for media in MEDIAS
        for compression in COMPRESSIONS
    }
    expected |= {"skopeo-oci": MEDIA_TYPES["oci"]["gzip"], "skopeo-v2s2": MEDIA_TYPES["docker"]["gzip"]}
    assert {how: layer_types(registry, ref) for how, ref in catalogue_refs.items()} == {
        how: {expected[how]} for how in PUSHES
    }


# -- Docker foreign and OCI non-distributable layers: `urls` name where else the blob may be found

FOREIGN = {
    ("docker", "none"): "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ("oci", "none"): "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}
NOWHERE = "http://127.0.0.1:9/blobs/"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def url_registry() -> Registry:
    """A registry that accepts layers with `urls` (docker-registry refuses them unless told which to allow)."""
    with Registry({"validation": {"manifests": {"urls": {"allow": ["^https?://"]}}}}) as started:
        yield started


def push_foreign(registry: str, repo: str, image: Image, layer_type: str, missing: int | None = None) -> str:
    """Pushes `image` with every layer typed `layer_type` and given `urls`, without the blob of layer `missing`;
    returns the reference."""
    manifest = json.loads(image.manifest)
    for layer in manifest["layers"]:
        layer |= {"mediaType": layer_type, "urls": [NOWHERE + layer["digest"]]}
    push_blob(registry, repo, image.config_blob)
    for number, blob in enumerate(image.layer_blobs):
        if number != missing:
            push_blob(registry, repo, blob)
    push_manifest(registry, repo, "latest", canonical_json(manifest))
    return f"{registry}/{repo}:latest"


@as_root
@pytest.mark.parametrize(("media", "compression"), list(FOREIGN))
def test_foreign_layers_the_registry_holds_are_pulled_from_it(
    media: str, compression: str, url_registry: Registry, umoci, tmp_path: Path
) -> None:
    image = replace(catalogue_image(), media=media, compression=compression)
    ref = push_foreign(url_registry.host, f"foreign-{media}-{compression}", image, FOREIGN[media, compression])
    done = d_pull(ref, str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert snapshot(tmp_path / "pulled" / "rootfs") == snapshot(umoci["root"])


def test_a_foreign_layer_missing_from_the_registry_is_a_one_line_error(url_registry: Registry, tmp_path: Path) -> None:
    image = Image([Tar().file("a", b"a"), Tar().file("b", b"b")], media="docker")
    ref = push_foreign(url_registry.host, "foreign-missing", image, FOREIGN["docker", "gzip"], missing=1)
    done = d_pull(ref, str(tmp_path / "pulled"), cache=tmp_path / "cache")
    missing = json.loads(image.manifest)["layers"][1]["digest"]
    assert_one_line_error(done, missing)
    assert json.loads((tmp_path / "pulled" / "image.json").read_text())["complete"] is False
