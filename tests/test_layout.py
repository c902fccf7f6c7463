"""Images carried as files (issue 22): OCI layouts, OCI archives and docker-archives written by skopeo, podman and
buildah and by hand in Docker 25's form, pulled as root and as the ordinary user into umoci's tree and a registry pull's
config.json; platforms, the lock file, --update and kill -9; hostile layouts and archives, each refused in one line
with nothing changed outside DIR."""

import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
from catalogue import DEVICES, assert_same_as_umoci_rootless, umoci_unpack
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
    random_files,
    sha256,
    skopeo_push,
    write_oci_layout,
)
from malicious import USER
from test_resume import applied, kill_when, partial_size
from trees import snapshot, tree_without_folder_times

from dutils.errors import Error
from dutils.fetch import PartialBlob
from dutils.layout import Layout
from dutils.oci import Blob
from dutils.progress import Progress
from dutils.reference import Source, parse_reference

REF_NAME = "org.opencontainers.image.ref.name"
SKOPEO = ["skopeo", "--insecure-policy", "copy", "--quiet"]
FILE_FORMATS = ("oci-archive", "docker-archive")
NAMED = "localhost/busybox:v1"  # as podman and buildah name their files' images


def readable_folder(prefix: str) -> Path:
    # hex, not mkdtemp's letters: podman names an image after its path, and a reference refuses a "_" at either end
    folder = Path(tempfile.gettempdir()) / f"{prefix}{secrets.token_hex(6)}"
    folder.mkdir()
    folder.chmod(0o755)
    return folder


def run(*command: object) -> str:
    done = subprocess.run([*map(str, command)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- the spellings


@pytest.mark.parametrize(
    ("text", "shown", "tag", "name"),
    [
        ("oci:/srv/images/app:v1", "oci:/srv/images/app:v1", "v1", "app"),
        ("oci-archive:/srv/app.tar", "oci-archive:/srv/app.tar", None, "app"),
        ("docker-archive:/srv/app.tar:alpine:3.20", "docker-archive:/srv/app.tar:alpine:3.20", "alpine:3.20", "app"),
        ("docker-archive:/srv/app.tar:@1", "docker-archive:/srv/app.tar:@1", "@1", "app"),
        ("/srv/app.tar", "/srv/app.tar", None, "app"),
        ("/srv/../", "/", None, "image"),
    ],
)
def test_files_are_spelled_as_skopeo_spells_them(text: str, shown: str, tag: str | None, name: str) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, Source)
    assert (str(ref), ref.tag, ref.name) == (shown, tag, name)


def test_a_relative_path_is_made_absolute_and_a_name_stays_a_registry_reference() -> None:
    assert parse_reference("./app.tar").path == os.path.abspath("app.tar")
    assert str(parse_reference("oci:app")) == f"oci:{os.path.abspath('app')}"
    assert not isinstance(parse_reference("app.tar"), Source)  # a name, as Docker reads it
    with pytest.raises(Error, match="names no file"):
        parse_reference("oci-archive:")


# -- each format as tools write it


def docker_25(docker_archive: Path, folder: Path) -> Path:
    """The image of `docker_archive` in a tar holding both layouts, as `docker save` writes from Docker 25 on: an OCI
    layout of uncompressed layers, a manifest.json naming the same blobs, the legacy layer folders links to them."""
    with tarfile.open(docker_archive) as archive:
        (listed,) = json.loads(archive.extractfile("manifest.json").read())
        config, *layers = (archive.extractfile(name).read() for name in [listed["Config"], *listed["Layers"]])
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer) for layer in layers],
        }
    )
    names = {"io.containerd.image.name": "docker.io/library/catalogue:latest", REF_NAME: "latest"}
    entry = descriptor(OCI_MANIFEST, manifest) | {"annotations": names}
    tar = Tar().file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}').file("index.json", index([entry]))
    for blob in [config, *layers, manifest]:
        tar.file(blob_member(sha256(blob)), blob)
    paths = [blob_member(sha256(layer)) for layer in layers]
    legacy = [{"Config": blob_member(sha256(config)), "RepoTags": ["catalogue:latest"], "Layers": paths}]
    tar.file("manifest.json", json.dumps(legacy).encode())
    for n, path in enumerate(paths):
        tar.symlink(f"legacy{n}/layer.tar", f"../{path}")
    path = folder / "docker-25.tar"
    path.write_bytes(tar.to_bytes())
    return path


def saved_by(tool: str, layout: str, folder: Path) -> dict[str, str]:
    """The image written by podman (`save`) or buildah (`push`) in both formats, through a storage of their own
    (none of the machine's is touched)."""
    storage = [tool, "--root", folder / tool, "--runroot", folder / f"{tool}-run", "--storage-driver", "vfs"]
    run(*storage, "tag", run(*storage, "pull", "-q", f"oci:{layout}").strip(), NAMED)
    saved = {}
    for kind in FILE_FORMATS:
        path = folder / f"{tool}-{kind}.tar"
        if tool == "podman":
            run(*storage, "save", "-q", "--format", kind, "-o", path, NAMED)
        else:
            run(*storage, "push", "-q", NAMED, f"{kind}:{path}:{NAMED}")
        saved[f"{tool}-{kind}"] = f"{kind}:{path}:{NAMED}"
    run(*storage, "rmi", "-a")
    shutil.rmtree(folder / tool, ignore_errors=True)
    return saved


@dataclass(frozen=True)
class Expected:
    """What pulling `source` must give: umoci's trees of the same image, the devices an ordinary user skips, and
    config.json as a registry pull of it writes it."""

    source: str
    trees: dict[str, Path]
    devices: list[str]
    config: bytes


def pulled_config(ref: str, folder: Path) -> bytes:
    done = d_pull(ref, str(folder / "pulled"), cache=folder / "cache")
    assert done.returncode == 0, done.stderr
    return (folder / "pulled" / "config.json").read_bytes()


@pytest.fixture(scope="module")
def carried(registry, umoci: dict[str, Path]) -> Iterator[dict[str, Expected]]:
    """The catalogue image as skopeo and Docker 25 write it, busybox as podman and buildah do (their vfs storage
    cannot hold the catalogue), each in a folder every user can read, with what pulling it must give."""
    folder, unpacked, layout = (
        readable_folder("d-utils-layout-"),
        Path(tempfile.mkdtemp()),
        f"{umoci['layout']}:catalogue",
    )
    run(*SKOPEO, f"oci:{layout}", f"oci-archive:{folder}/skopeo.tar:catalogue")
    run(*SKOPEO, f"oci:{layout}", f"docker-archive:{folder}/skopeo-docker.tar:localhost/catalogue:v1")
    shutil.copytree(umoci["layout"], folder / "layout")
    skopeo_push(umoci["layout"], "catalogue", f"{registry.host}/carried/catalogue:latest", "oci")
    config = pulled_config(f"{registry.host}/carried/catalogue:latest", folder / "registry-catalogue")
    catalogue = {
        "oci": f"oci:{folder}/layout:catalogue",
        "oci-plain-path": f"{folder}/layout",
        "oci-archive": f"oci-archive:{folder}/skopeo.tar",
        "docker-archive": f"docker-archive:{folder}/skopeo-docker.tar",
        "docker-archive-plain-path": f"{folder}/skopeo-docker.tar",
        "docker-archive-named": f"docker-archive:{folder}/skopeo-docker.tar:localhost/catalogue:v1",
        "docker-25": str(docker_25(folder / "skopeo-docker.tar", folder)),
        "docker-25-as-docker-archive": f"docker-archive:{folder}/docker-25.tar:catalogue:latest",
    }
    expected = {how: Expected(source, umoci, DEVICES, config) for how, source in catalogue.items()}
    busybox = replace(busybox_image(), layers=[Tar().dir(".").to_bytes(), *busybox_image().layers])  # "." has a time
    write_oci_layout(folder / "busybox", busybox, "latest")
    trees = umoci_unpack(f"{folder}/busybox:latest", unpacked)  # not made readable by all below, as umoci made it
    push(registry.host, "carried/busybox", "latest", busybox)
    config = pulled_config(f"{registry.host}/carried/busybox:latest", folder / "registry-busybox")
    saved = saved_by("podman", f"{folder}/busybox:latest", folder) | saved_by(
        "buildah", f"{folder}/busybox:latest", folder
    )
    for how, source in saved.items():
        expected[how] = Expected(source, trees, [], config)
    run("chmod", "-R", "a+rX", folder)
    yield expected
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(unpacked, ignore_errors=True)


FORMATS = [
    "oci",
    "oci-plain-path",
    "oci-archive",
    "docker-archive",
    "docker-archive-plain-path",
    "docker-archive-named",
    "docker-25",
    "docker-25-as-docker-archive",
    *(f"{tool}-{kind}" for tool in ("podman", "buildah") for kind in FILE_FORMATS),
]


@pytest.mark.parametrize("how", FORMATS)
def test_each_format_pulled_as_root_is_umocis_tree_with_a_registry_pulls_config(
    how: str, carried: dict[str, Expected], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("umoci's tree as root has the image's owners and devices")
    image = carried[how]
    done = d_pull(image.source, str(tmp_path / "pulled"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert snapshot(tmp_path / "pulled" / "rootfs") == snapshot(image.trees["root"])
    assert (tmp_path / "pulled" / "config.json").read_bytes() == image.config
    record = json.loads((tmp_path / "pulled" / "image.json").read_bytes())
    assert (record["reference"], record["complete"]) == (str(parse_reference(image.source)), True)


@pytest.mark.parametrize("how", FORMATS)
def test_each_format_pulled_as_the_ordinary_user_is_umocis_rootless_tree(
    how: str, carried: dict[str, Expected], workspace: Path, unprivileged
) -> None:
    image, folder = carried[how], workspace / "pull" / how
    done = unprivileged.tool("d-pull", "--cache", workspace / "pull" / "cache", image.source, folder)
    assert done.returncode == 0, done.stderr
    assert_same_as_umoci_rootless(folder / "rootfs", image.trees["rootless"], image.devices)
    assert (folder / "config.json").read_bytes() == image.config


# -- platforms, the lock file, --update, kill -9


@pytest.fixture(scope="module")
def multi_layout(images: dict[str, str]) -> Iterator[Path]:
    """The standard multi-platform image (amd64, arm64/v8 and an attestation), copied by skopeo into an OCI layout."""
    folder = readable_folder("d-utils-multi-")
    run(*SKOPEO, "--all", "--src-tls-verify=false", f"docker://{images['multi']}", f"oci:{folder}/multi:latest")
    run("chmod", "-R", "a+rX", folder)
    yield folder / "multi"
    shutil.rmtree(folder)


@pytest.fixture(params=["root", "user"])
def pull(request, workspace: Path, unprivileged) -> Callable[..., subprocess.CompletedProcess]:
    """d-pull ARGS… as the tests' user (root in CI) or as the ordinary user, each with a cache of its own."""
    if request.param == "root":
        return lambda *args: d_pull(*map(str, args), cache=workspace / "root-cache")
    return lambda *args: unprivileged.tool("d-pull", "--cache", workspace / "pull" / "cache", *args)


def fresh_folder(workspace: Path) -> Path:
    """A new folder the ordinary user owns, to pull into (DIR is a child of it)."""
    folder = Path(tempfile.mkdtemp(dir=workspace / "pull"))
    shutil.chown(folder, USER, USER) if os.geteuid() == 0 else None
    return folder


HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine)


def test_a_multi_platform_layout_gives_the_hosts_platform_and_platform_another(
    pull, multi_layout: Path, workspace: Path
) -> None:
    if HOST_ARCH is None:
        pytest.skip("the image offers amd64 and arm64 only")
    folder, other = fresh_folder(workspace), {"amd64": "linux/arm64/v8", "arm64": "linux/amd64"}[HOST_ARCH]
    assert pull(f"oci:{multi_layout}", folder / "host").returncode == 0
    assert (folder / "host" / "rootfs" / "etc" / "arch").read_text() == f"{HOST_ARCH}\n"
    done = pull("--platform", other, f"oci:{multi_layout}:latest", folder / "other")
    assert done.returncode == 0, done.stderr
    assert (folder / "other" / "rootfs" / "etc" / "arch").read_text() == f"{other.split('/')[1]}\n"


def test_the_lock_pins_an_archive_and_update_takes_a_newer_one_fetching_only_its_new_blobs(
    pull, workspace: Path
) -> None:
    folder, base = fresh_folder(workspace), busybox_layer()
    archive, lock = folder / "app.tar", folder / "sandboxes.lock"
    docker_archive(Image(layers=[base, Tar().file("etc/version", b"1\n").to_bytes()]), archive)
    first = pull("--lock", lock, f"docker-archive:{archive}", folder / "app")
    assert first.returncode == 0, first.stderr
    pinned = lock.read_text()
    assert f'"reference": "docker-archive:{archive}"' in pinned
    archive.rename(folder / "away.tar")  # complete for its pin: the archive is not even opened
    again = pull("--lock", lock, f"docker-archive:{archive}", folder / "app")
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr
    (folder / "away.tar").rename(archive)
    shutil.rmtree(folder / "app")  # pulled anew, by the digest the lock pins: the manifest made again is the same
    pinned_pull = pull("--lock", lock, f"docker-archive:{archive}", folder / "app")
    assert pinned_pull.returncode == 0 and lock.read_text() == pinned, pinned_pull.stderr
    top = Tar().file("etc/version", b"2\n").to_bytes()
    docker_archive(Image(layers=[base, top]), archive)
    refused = pull(f"docker-archive:{archive}", folder / "app")
    assert_one_line_error(refused, "--update")
    updated = pull("--update", "--lock", lock, f"docker-archive:{archive}", folder / "app")
    assert updated.returncode == 0, updated.stderr
    assert (folder / "app" / "rootfs" / "etc" / "version").read_text() == "2\n"
    fetched = [line for line in updated.stderr.splitlines() if line.startswith("fetched ")]
    assert any(sha256(top)[:19] in line for line in fetched), updated.stderr
    assert not any(sha256(base)[:19] in line for line in fetched), updated.stderr  # in the cache already
    assert lock.read_text() != pinned


@pytest.mark.integration
@pytest.mark.parametrize("who", ["root", "user"])
def test_a_pull_from_an_archive_killed_9_resumes_to_the_clean_tree(who: str, workspace: Path, unprivileged) -> None:
    image = Image(layers=[busybox_layer(), random_files("big", 96, 1 << 20)], compression="none")
    env, cwd = (unprivileged.env, unprivileged.home) if who == "user" else (None, None)
    for _ in range(3):  # a loaded machine can get past a moment before it is seen: then start over, in a new folder
        folder = fresh_folder(workspace)
        argv = [
            *(unprivileged.become if who == "user" else []),
            (unprivileged.bin if who == "user" else BIN) / "d-pull",
            "-q",
            "--cache",
            folder / "cache",
            f"docker-archive:{docker_archive(image, folder / 'big.tar')}",
            folder / "app",
        ]
        cache, app = folder / "cache", folder / "app"
        moments = [lambda cache=cache: partial_size(cache) > 4 << 20, lambda app=app: applied(app) == 1]
        start = partial(subprocess.Popen, [*map(str, argv)], env=env, cwd=cwd, start_new_session=True)
        if all(kill_when(start(stderr=subprocess.DEVNULL), ready, timeout=60) for ready in moments):
            break  # killed copying the big layer, then applying it
    else:
        pytest.fail("three pulls each got past a moment (copying, applying the big layer) before it was seen")
    done = subprocess.run([*map(str, argv)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # a clean pull, through a cache of its own: copying the 96 MiB layer and applying it keep memory flat
    measured = ["/usr/bin/time", "-f", "%M", *argv[:-3], folder / "clean-cache", *argv[-2:-1], folder / "clean"]
    clean = subprocess.run([*map(str, measured)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert int(clean.stderr.split()[-1]) < 80 << 10, clean.stderr  # kB: d-pull's own ~45 MB, not the layer's 96
    assert tree_without_folder_times(folder / "app" / "rootfs") == tree_without_folder_times(
        folder / "clean" / "rootfs"
    )


# -- hostile layouts and archives


def base() -> Image:
    return busybox_image()


def oci_members(image: Image, entries: list[dict] | None = None) -> dict[str, bytes]:
    """An OCI layout's files: `image` named "latest", unless `entries` are given for index.json."""
    entries = [image.index_entry() | {"annotations": {REF_NAME: "latest"}}] if entries is None else entries
    blobs = image.blobs() | {sha256(image.manifest): image.manifest}
    layout = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index(entries)}
    return layout | {blob_member(digest): data for digest, data in blobs.items()}


def docker_members(image: Image, **changes: object) -> dict[str, bytes]:
    """A docker-archive's files (Docker 24 and before), manifest.json's fields changed as given."""
    config = f"{sha256(image.config_blob)[7:]}.json"
    layers = {f"{sha256(layer)[7:]}/layer.tar": layer for layer in image.layers}
    listed = {"Config": config, "RepoTags": ["app:latest"], "Layers": list(layers)} | changes
    return {"manifest.json": json.dumps([listed]).encode(), config: image.config_blob} | layers


def blob_member(digest: str) -> str:
    return f"blobs/sha256/{digest[7:]}"


def layer_member(image: Image) -> str:
    return blob_member(sha256(image.layer_blobs[0]))


def docker_archive(image: Image, path: Path) -> Path:
    return write_tar(path, docker_members(image))


def write_tar(path: Path, members: dict[str, bytes], more: Callable[[Tar], Tar] = lambda tar: tar) -> Path:
    tar = Tar()
    for name, data in members.items():
        tar.file(name, data)
    path.write_bytes(more(tar).to_bytes())
    path.chmod(0o644)
    return path


def without(members: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {key: value for key, value in members.items() if key != name}


def index_names_a_path(folder: Path) -> str:
    entry = base().index_entry() | {"digest": "sha256:../../../outside/secret"}
    return f"oci-archive:{write_tar(folder / 'a.tar', oci_members(base(), [entry]))}"


def config_leaves(folder: Path) -> str:
    return f"docker-archive:{write_tar(folder / 'a.tar', docker_members(base(), Config='../outside/secret'))}"


def layer_is_absolute(folder: Path) -> str:
    members = docker_members(base())
    listed = json.loads(members["manifest.json"])[0]
    listed["Layers"][0] = str(folder / "outside" / "secret")
    return str(write_tar(folder / "a.tar", members | {"manifest.json": json.dumps([listed]).encode()}))


def member_leaves(folder: Path) -> str:
    return str(write_tar(folder / "a.tar", oci_members(base()), lambda tar: tar.file("../outside/secret", b"x")))


def blobs_folder_is_a_link(folder: Path) -> str:
    for name, data in oci_members(base()).items():
        (folder / "layout" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "layout" / name).write_bytes(data)
    (folder / "layout" / "blobs").rename(folder / "outside" / "blobs")
    (folder / "layout" / "blobs").symlink_to(folder / "outside" / "blobs")
    return f"oci:{folder / 'layout'}"


def blob_is_a_link(folder: Path) -> str:
    source = blobs_folder_is_a_link(folder)
    (folder / "layout" / "blobs").unlink()
    shutil.copytree(folder / "outside" / "blobs", folder / "layout" / "blobs")
    layer = folder / "layout" / layer_member(base())
    layer.unlink()
    layer.symlink_to(folder / "outside" / layer_member(base()))
    return source


def member_is(kind: str) -> Callable[[Path], str]:
    def build(folder: Path) -> str:
        name, members = layer_member(base()), oci_members(base())
        add = {
            "symlink": lambda tar: tar.symlink(name, "../../oci-layout"),
            "hardlink": lambda tar: tar.hardlink(name, "oci-layout"),
            "device": lambda tar: tar.device(name),
            "fifo": lambda tar: tar.fifo(name),
        }[kind]
        return str(write_tar(folder / "a.tar", without(members, name), add))

    build.__name__ = f"member_is_a_{kind}"
    return build


def oversized(name: str) -> Callable[[Path], str]:
    def build(folder: Path) -> str:
        members = oci_members(base()) if name == "index.json" else docker_members(base())
        return str(write_tar(folder / "a.tar", members | {name: members[name] + b" " * (5 << 20)}))

    build.__name__ = f"oversized_{name}"
    return build


def json_bomb(folder: Path) -> str:
    bomb = b'{"manifests": [], "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return str(write_tar(folder / "a.tar", oci_members(base()) | {"index.json": bomb}))


def duplicate_member(folder: Path) -> str:
    other = index([])
    return str(write_tar(folder / "a.tar", oci_members(base()), lambda tar: tar.file("./index.json", other)))


def missing_blob(folder: Path) -> str:
    return str(write_tar(folder / "a.tar", without(oci_members(base()), layer_member(base()))))


def digest_mismatch(folder: Path) -> str:
    members = oci_members(base())
    layer = bytearray(members[layer_member(base())])
    layer[len(layer) // 2] ^= 1
    return str(write_tar(folder / "a.tar", members | {layer_member(base()): bytes(layer)}))


def nested_indexes(folder: Path) -> str:
    inner = index([base().index_entry()])
    outer = index([{"mediaType": OCI_INDEX, "digest": sha256(inner), "size": len(inner), "platform": base().platform}])
    entry = {"mediaType": OCI_INDEX, "digest": sha256(outer), "size": len(outer)}
    extra = {blob_member(sha256(data)): data for data in (inner, outer)}
    return str(write_tar(folder / "a.tar", oci_members(base(), [entry]) | extra))


def several_images(folder: Path) -> str:
    entries = [base().index_entry() | {"annotations": {REF_NAME: name}} for name in ("v1", "v2")]
    return f"oci-archive:{write_tar(folder / 'a.tar', oci_members(base(), entries))}"


def neither(folder: Path) -> str:
    return str(write_tar(folder / "a.tar", {"hello": b"not an image\n"}))


def compressed(folder: Path) -> str:
    path = docker_archive(base(), folder / "a.tar")
    subprocess.run(["gzip", "-n", str(path)], check=True)
    return str(path.with_suffix(".tar.gz"))


def a_fifo(folder: Path) -> str:
    os.mkfifo(folder / "a.tar")
    return f"docker-archive:{folder / 'a.tar'}"


def truncated_archive(folder: Path) -> str:
    """Its last member, a layer, cut in the middle: its header claims more bytes than the file holds."""
    path = docker_archive(base(), folder / "a.tar")
    data, layer = path.read_bytes(), base().layers[-1]
    path.write_bytes(data[: data.find(layer) + len(layer) // 2])
    return f"docker-archive:{path}"


def blob_shorter_than_its_descriptor(folder: Path) -> str:
    source = blobs_folder_is_a_link(folder)
    (folder / "layout" / "blobs").unlink()
    shutil.copytree(folder / "outside" / "blobs", folder / "layout" / "blobs")
    os.truncate(folder / "layout" / layer_member(base()), 1000)
    return source


def long_member_name(folder: Path) -> str:
    return str(write_tar(folder / "a.tar", oci_members(base()), lambda tar: tar.file("x" * 5000, b"x")))


def too_many_images(folder: Path) -> str:
    listed = json.loads(docker_members(base())["manifest.json"]) * 1001
    return str(write_tar(folder / "a.tar", docker_members(base()) | {"manifest.json": json.dumps(listed).encode()}))


def too_many_indexed(folder: Path) -> str:
    return f"oci-archive:{write_tar(folder / 'a.tar', oci_members(base(), [base().index_entry()] * 1001))}"


def diff_ids_of_another_count(folder: Path) -> str:
    layers = json.loads(docker_members(base())["manifest.json"])[0]["Layers"]
    return str(write_tar(folder / "a.tar", docker_members(base(), Layers=layers[:1])))


HOSTILE = [
    (index_names_a_path, "malformed digest"),
    (config_leaves, "leads out"),
    (layer_is_absolute, "leads out"),
    (member_leaves, "leads out"),
    (blobs_folder_is_a_link, "link"),
    (blob_is_a_link, "link"),
    (member_is("symlink"), "not a file"),
    (member_is("hardlink"), "not a file"),
    (member_is("device"), "not a file"),
    (member_is("fifo"), "not a file"),
    (oversized("index.json"), "more than"),
    (oversized("manifest.json"), "more than"),
    (json_bomb, "JSON objects"),
    (duplicate_member, "twice"),
    (missing_blob, "has no member"),
    (digest_mismatch, "does not match"),
    (nested_indexes, "index of indexes"),
    (several_images, "2 images: v1, v2"),
    (neither, "neither an OCI layout nor a docker-archive"),
    (compressed, "not a tar archive"),
    (a_fifo, "neither a folder nor a file"),
    (diff_ids_of_another_count, "diff_ids"),
    (truncated_archive, "ends before the"),
    (blob_shorter_than_its_descriptor, "shorter than its manifest says"),
    (long_member_name, "a name of over 4096 bytes"),
    (too_many_images, "1001 images, more than 1000"),
    (too_many_indexed, "1001 images, more than 1000"),
]


@pytest.mark.parametrize(("build", "words"), HOSTILE, ids=[build.__name__ for build, _ in HOSTILE])
def test_a_hostile_layout_or_archive_is_one_line_and_changes_nothing_outside_dir(
    build: Callable[[Path], str], words: str, pull, workspace: Path
) -> None:
    folder = readable_folder("d-utils-hostile-")
    try:
        (folder / "outside").mkdir()
        (folder / "outside" / "secret").write_bytes(b"the stand-in for a file outside DIR\n")
        source = build(folder)
        run("chmod", "-R", "a+rX", folder)
        before, target = snapshot(folder), fresh_folder(workspace) / "dir"
        done = pull(source, target)
        assert_one_line_error(done, words)
        assert snapshot(folder) == before
        assert not (target / "rootfs").exists() or not os.listdir(target / "rootfs")
    finally:
        shutil.rmtree(folder)


class CuttingProgress(Progress):
    """Counts a download's chunks, the layout's owner cutting its blob once the first has come; so many chunks are
    allowed, and no more, that a reader spinning at the file's new end fails instead of hanging."""

    def __init__(self, blob: Path) -> None:
        super().__init__()
        self.blob, self.chunks = blob, 0

    def advance(self, size: int) -> None:
        os.truncate(self.blob, 3 << 19)  # 1.5 MiB of 3, after 1 MiB was read
        self.chunks += 1
        assert self.chunks < 10, "the blob's reader spins at its end"


def test_a_layout_blob_cut_while_it_is_read_is_one_error_not_a_spin(tmp_path: Path) -> None:
    data, layout = os.urandom(3 << 20), tmp_path / "layout"
    members = oci_members(base()) | {blob_member(sha256(data)): data}
    for name, content in members.items():
        (layout / name).parent.mkdir(parents=True, exist_ok=True)
        (layout / name).write_bytes(content)
    blob = Blob(sha256(data), len(data), OCI_MANIFEST)
    progress = CuttingProgress(layout / blob_member(blob.digest))
    with PartialBlob(tmp_path / "partial", blob, progress) as sink, pytest.raises(Error) as raised:
        Layout(parse_reference(f"oci:{layout}")).download_blob(blob.digest, sink)
    assert raised.value.message == f"oci:{layout}: {blob_member(blob.digest)} ends before its {len(data)} bytes"
    assert progress.chunks == 2


def test_a_pinned_image_of_a_docker_archive_is_the_first_that_matches_the_rest_unread(tmp_path: Path) -> None:
    members = docker_members(base())
    listed = json.loads(members["manifest.json"]) + [{"Config": "broken.json", "Layers": []}] * 999
    more = {"manifest.json": json.dumps(listed).encode(), "broken.json": b"{" * 1000}
    source = parse_reference(f"docker-archive:{write_tar(tmp_path / 'a.tar', members | more)}")
    body, _ = Layout(source).get_manifest("@0")
    assert Layout(source).get_manifest(sha256(body)) == (body, OCI_MANIFEST)


DODO = """from pathlib import Path
from dutils.pipeline import Options, Sandbox, sandbox_tasks
DOIT_CONFIG = {"default_tasks": ["dutils"], "dep_file": "doit.json", "backend": "json"}
SANDBOXES = [Sandbox("box", "docker-archive:app.tar"), Sandbox("plain", "./layout")]
globals().update(sandbox_tasks(SANDBOXES, Options(cache=Path("cache").absolute())))
"""


@pytest.mark.parametrize("who", ["root", "user"])
def test_a_dodo_materialises_sandboxes_from_files_carried_beside_it(who: str, workspace: Path, unprivileged) -> None:
    folder = fresh_folder(workspace)
    docker_archive(base(), folder / "app.tar")
    write_oci_layout(folder / "layout", base(), "latest")
    (folder / "dodo.py").write_text(DODO)
    run("chmod", "-R", "a+rX", folder)
    if who == "user":
        run("chown", "-R", f"{USER}:{USER}", folder) if os.geteuid() == 0 else None
        done = unprivileged.run([unprivileged.bin / "doit"], cwd=folder, capture_output=True, text=True, timeout=180)
    else:
        done = subprocess.run([BIN / "doit"], cwd=folder, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    for box in ("box", "plain"):
        assert (folder / box / "rootfs" / "etc" / "added-by-layer-2").read_text() == "added by layer 2\n"
    assert f'"reference": "docker-archive:{folder / "app.tar"}"' in (folder / "sandboxes.lock").read_text()
