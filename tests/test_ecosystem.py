"""Images made by other tools: buildah builds them from scratch and pushes them in every format it offers (OCI and
Docker v2s2; gzip, zstd and zstd:chunked; a multi-arch manifest list in Docker Hub's order; an encrypted image).
Pulled by d-pull as root and as the ordinary user, each must be the tree umoci unpacks from skopeo's copy of the same
image (umoci cannot read zstd: a zstd push is compared with its gzip twin, whose layers hold the same tar), and
d-run must run it. buildah runs as root, with vfs storage in a temporary folder."""

import json
import pwd
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from catalogue import umoci_unpack
from cli import BIN, assert_one_line_error, d_pull, d_run
from malicious import USER, as_root, make_workspace
from registry_server import Registry, session
from trees import snapshot, without

BUILDAH_TIMEOUT = 180
BUSYBOX = Path("/bin/busybox")
GREETING = "hello from buildah in /srv/app\n"
# How the app image reaches a registry: `buildah push` flags. Each zstd push goes to a registry of its own, where
# buildah cannot reuse the gzip blobs it pushed before (it would, silently, with the same layer content).
PUSHES = {
    "oci-gzip": ["--format", "oci"],
    "v2s2": ["--format", "v2s2"],
    "oci-zstd": ["--format", "oci", "--compression-format", "zstd"],
    "oci-zstd-chunked": ["--format", "oci", "--compression-format", "zstd:chunked"],
}
LAYER_TYPES = {
    "oci-gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "v2s2": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "oci-zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "oci-zstd-chunked": "application/vnd.oci.image.layer.v1.tar+zstd",
}
UMOCI_TWIN = {"oci-gzip": "oci-gzip", "v2s2": "v2s2", "oci-zstd": "oci-gzip", "oci-zstd-chunked": "oci-gzip"}
# The manifest list, in the order Docker Hub lists such images: arm/v6 before arm/v7.
ARCHES = [("arm", "v6"), ("arm", "v7"), ("arm64", "v8")]

pytestmark = [as_root, pytest.mark.timeout(600)]


class Buildah:
    """buildah with its storage in `folder`: nothing of the machine's own containers storage is used or changed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.argv = ["buildah", "--root", str(folder / "root"), "--runroot", str(folder / "run")]
        self.argv += ["--storage-driver", "vfs"]

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=BUILDAH_TIMEOUT, env=self.env()
        )
        assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.folder), "TMPDIR": str(self.folder)}

    def push(self, image: str, destination: str, *flags: str) -> None:
        self("push", "--quiet", "--tls-verify=false", *flags, image, f"docker://{destination}")


def write_context(folder: Path) -> Path:
    """What the app image copies in: busybox, an app folder that is also its WorkingDir, a link, a config folder."""
    files = {
        "bin/busybox": BUSYBOX.read_bytes(),
        "srv/app/greet.sh": b'echo "$GREETING in $(pwd)"\n',
        "srv/app/data/numbers.txt": b"".join(b"%d\n" % n for n in range(1000)),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
        "etc/group": b"root:x:0:\n",
        "etc/old.conf": b"removed by the second layer\n",
        "etc/conf.d/a.conf": b"a\n",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "bin/busybox").chmod(0o755)
    (folder / "bin/sh").symlink_to("busybox")
    (folder / "srv/app/latest").symlink_to("data/numbers.txt")
    return folder


def build_app(buildah: Buildah, context: Path) -> str:
    """Two layers, as a Containerfile with COPY, WORKDIR, ENTRYPOINT, then a RUN that deletes and adds would give."""
    container = buildah("from", "scratch")
    buildah("copy", container, f"{context}/", "/")
    buildah("config", "--workingdir", "/srv/app", "--entrypoint", '["/bin/busybox"]', container)
    buildah("config", "--cmd", '["sh", "greet.sh"]', "--env", "GREETING=hello from buildah", container)
    buildah("commit", "--quiet", container, "localhost/app-base")
    container = buildah("from", "localhost/app-base")
    mount = Path(buildah("mount", container))
    (mount / "etc/old.conf").unlink()  # the commit records these as whiteouts
    shutil.rmtree(mount / "etc/conf.d")
    (mount / "etc/added.conf").write_bytes(b"added by the second layer\n")
    buildah("umount", container)
    buildah("commit", "--quiet", container, "localhost/app")
    return "localhost/app"


def build_arch(buildah: Buildah, arch: str, variant: str, context: Path) -> str:
    """A one-file image whose config declares linux/ARCH/VARIANT and whose /etc/arch says so."""
    (context / "etc").mkdir(parents=True)
    (context / "etc/arch").write_text(f"{arch}/{variant}\n")
    container = buildah("from", "scratch")
    buildah("copy", container, f"{context}/", "/")
    buildah("config", "--os", "linux", "--arch", arch, "--variant", variant, container)
    name = f"localhost/only-{arch}-{variant}"
    buildah("commit", "--quiet", container, name)
    return name


@pytest.fixture(scope="module")
def workspace(unprivileged) -> Path:
    """A folder the ordinary user can reach, with a `pull` folder it owns; buildah's storage is inside."""
    workspace = make_workspace()
    yield workspace
    shutil.rmtree(workspace, ignore_errors=True)


@pytest.fixture(scope="module")
def buildah(workspace: Path) -> Buildah:
    if not shutil.which("buildah"):
        pytest.fail("buildah is not installed: run install.sh")
    (workspace / "buildah").mkdir()
    return Buildah(workspace / "buildah")


@pytest.fixture(scope="module")
def app(buildah: Buildah, workspace: Path) -> str:
    return build_app(buildah, write_context(workspace / "context"))


@pytest.fixture(scope="module")
def pushed(app: str, buildah: Buildah, registry: Registry) -> dict[str, str]:
    """Each way of PUSHES -> the reference buildah pushed the app image to."""
    with Registry() as zstd, Registry() as chunked:
        hosts = {"oci-gzip": registry.host, "v2s2": registry.host, "oci-zstd": zstd.host}
        hosts["oci-zstd-chunked"] = chunked.host
        refs = {how: f"{hosts[how]}/eco/app:{how}" for how in PUSHES}
        for how, flags in PUSHES.items():
            buildah.push(app, refs[how], *flags)
        yield refs


@pytest.fixture(scope="module")
def umoci(pushed: dict[str, str], workspace: Path) -> dict[str, dict[str, Path]]:
    """umoci's unpacking (as root and --rootless) of skopeo's copy of the gzip pushes."""
    trees = {}
    for how in set(UMOCI_TWIN.values()):
        folder = workspace / f"umoci-{how}"
        folder.mkdir()
        copy = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"]
        subprocess.run([*copy, f"docker://{pushed[how]}", f"oci:{folder}/layout:app"], check=True, timeout=120)
        trees[how] = umoci_unpack(f"{folder}/layout:app", folder)
    return trees


def manifest_of(reference: str) -> dict:
    host, _, rest = reference.partition("/")
    repository, _, tag = rest.rpartition(":")
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    with session() as http:
        answer = http.get(f"http://{host}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}, timeout=30)
        answer.raise_for_status()
    return answer.json()


def tree(rootfs: Path) -> tuple[dict, set]:
    """The snapshot of `rootfs` but for the time of the root itself, which buildah's layers do not list."""
    entries, links = snapshot(rootfs)
    return entries | {".": replace(entries["."], mtime_ns=None)}, links


def test_buildah_pushed_the_formats_it_names(pushed: dict[str, str]) -> None:
    for how, reference in pushed.items():
        layers = manifest_of(reference)["layers"]
        assert [layer["mediaType"] for layer in layers] == [LAYER_TYPES[how]] * 2, how
    chunked = manifest_of(pushed["oci-zstd-chunked"])["layers"][0]
    assert "io.containers.zstd-chunked.manifest-checksum" in chunked["annotations"]


@pytest.mark.parametrize("how", PUSHES)
def test_a_buildah_image_pulled_as_root_is_umocis_tree_and_runs(how: str, pushed, umoci, tmp_path: Path) -> None:
    folder = tmp_path / "app"
    done = d_pull(pushed[how], str(folder), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert tree(folder / "rootfs") == tree(umoci[UMOCI_TWIN[how]]["root"])  # owners and mtimes included
    assert not (folder / "rootfs/etc/old.conf").exists() and (folder / "rootfs/etc/added.conf").is_file()
    assert json.loads((folder / "image.json").read_text())["platform"] == "linux/amd64"
    ran = d_run(folder)
    assert (ran.returncode, ran.stdout) == (0, GREETING), ran.stderr


@pytest.mark.parametrize("how", PUSHES)
def test_a_buildah_image_pulled_as_the_ordinary_user_is_umocis_rootless_tree_and_runs(
    how: str, pushed, umoci, workspace: Path, unprivileged
) -> None:
    folder = workspace / "pull" / how
    done = unprivileged.tool("d-pull", "--cache", workspace / "pull" / "cache", pushed[how], folder)
    assert done.returncode == 0, done.stderr
    ours, theirs = tree(folder / "rootfs"), tree(umoci[UMOCI_TWIN[how]]["rootless"])
    assert without(ours, owner=None) == without(theirs, owner=None)
    user = pwd.getpwnam(USER)
    assert {entry.owner for entry in ours[0].values()} == {(user.pw_uid, user.pw_gid)}  # umoci's stay root's
    ran = unprivileged.tool("d-run", folder, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, GREETING), ran.stderr


@pytest.fixture(scope="module")
def arch_images(buildah: Buildah, workspace: Path) -> dict[str, str]:
    return {
        f"{arch}/{variant}": build_arch(buildah, arch, variant, workspace / arch / variant) for arch, variant in ARCHES
    }


@pytest.fixture(scope="module", params=["v2s2", "oci"])
def manifest_list(request, app: str, arch_images: dict[str, str], buildah: Buildah, registry: Registry) -> str:
    """amd64 (the app), arm/v6, arm/v7, arm64/v8, listed in that order by `buildah manifest`, pushed with --all."""
    name = f"localhost/eco-list-{request.param}"
    buildah("manifest", "create", name)
    for image in [app, *arch_images.values()]:
        buildah("manifest", "add", name, image)
    reference = f"{registry.host}/eco/list:{request.param}"
    buildah("manifest", "push", "--quiet", "--all", "--tls-verify=false", "--format", request.param, name,
            f"docker://{reference}")  # fmt: skip
    return reference


@pytest.mark.parametrize(
    ("wanted", "arch"),
    [("linux/arm", "arm/v7"), ("linux/arm/v7", "arm/v7"), ("linux/arm/v6", "arm/v6"), ("linux/aarch64", "arm64/v8")],
)
def test_a_buildah_manifest_list_gives_what_containerd_gives(wanted, arch, manifest_list: str, tmp_path) -> None:
    folder = tmp_path / "pulled"
    done = d_pull("--platform", wanted, manifest_list, str(folder), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert (folder / "rootfs/etc/arch").read_text() == f"{arch}\n"
    assert json.loads((folder / "image.json").read_text())["platform"] == f"linux/{arch}"


def test_a_buildah_manifest_list_gives_this_host_its_image(manifest_list: str, workspace: Path, unprivileged) -> None:
    folder = workspace / "pull" / f"list-{manifest_list.rpartition(':')[2]}"
    done = unprivileged.tool("d-pull", "--cache", workspace / "pull" / "cache", manifest_list, folder)
    assert done.returncode == 0, done.stderr
    ran = unprivileged.tool("d-run", folder, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, GREETING), ran.stderr
    offers = d_pull("--platform", "linux/arm/v5", manifest_list, str(folder) + "-v5", cache=workspace / "cache")
    assert_one_line_error(offers, "no image for platform linux/arm/v5", "linux/amd64, linux/arm/v6, linux/arm/v7")


def test_a_buildah_image_for_another_platform_is_refused_unless_asked_for(
    arch_images: dict[str, str], buildah: Buildah, registry: Registry, tmp_path: Path
) -> None:
    reference = f"{registry.host}/eco/arm:v6"
    buildah.push(arch_images["arm/v6"], reference, "--format", "oci")
    refused = d_pull(reference, str(tmp_path / "default"), cache=tmp_path / "cache")
    assert_one_line_error(refused, "is an image for linux/arm/v6, not for linux/amd64", "--platform linux/arm/v6")
    assert not (tmp_path / "default").exists()
    done = d_pull("--platform", "linux/arm/v6", reference, str(tmp_path / "arm"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "arm" / "image.json").read_text())["platform"] == "linux/arm/v6"


def test_a_buildah_encrypted_image_is_refused_before_any_layer_is_fetched(
    app: str, buildah: Buildah, workspace: Path, tmp_path: Path
) -> None:
    key = workspace / "buildah" / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True, timeout=60)
    public = key.with_name("public.pem")
    subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(public)], check=True, capture_output=True)
    with Registry() as registry:
        reference = f"{registry.host}/eco/secret:1"
        buildah.push(app, reference, "--format", "oci", "--encryption-key", f"jwe:{public}")
        assert all(layer["mediaType"].endswith("+encrypted") for layer in manifest_of(reference)["layers"])
        done = d_pull(reference, str(tmp_path / "secret"), cache=tmp_path / "cache")
        assert_one_line_error(done, "has encrypted layers", "+gzip+encrypted", "--decryption-key")
        layers = [layer["digest"] for layer in manifest_of(reference)["layers"]]
        assert sum(registry.blob_gets(digest) for digest in layers) == 0
    assert not (tmp_path / "secret").exists()


@pytest.fixture(scope="module")
def missing_workdir(buildah: Buildah, workspace: Path, registry: Registry) -> str:
    """An image as `WORKDIR /srv/work` with no later step writing there gives it: buildah records the folder in
    the config only, and no layer holds it."""
    context = workspace / "context-workdir"
    (context / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, context / "bin/busybox")
    container = buildah("from", "scratch")
    buildah("copy", container, f"{context}/", "/")
    buildah("config", "--workingdir", "/srv/work", "--entrypoint", '["/bin/busybox"]', container)
    buildah("commit", "--quiet", container, "localhost/workdir")
    reference = f"{registry.host}/eco/workdir:latest"
    buildah.push("localhost/workdir", reference, "--format", "oci")
    return reference


@pytest.mark.parametrize("who", ["root", "ordinary user"])
def test_a_buildah_image_whose_workdir_no_layer_holds_runs_there_with_a_read_only_root(
    who: str, missing_workdir: str, workspace: Path, unprivileged
) -> None:
    folder = workspace / "pull" / f"workdir-{who.replace(' ', '-')}"
    run = unprivileged.run if who == "ordinary user" else subprocess.run
    prefix = unprivileged.bin if who == "ordinary user" else BIN
    pulled = run([prefix / "d-pull", "--cache", folder.parent / f"cache-{who}", missing_workdir, folder],
                 capture_output=True, text=True, timeout=120)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert not (folder / "rootfs/srv").exists()  # as buildah pushed it: the folder is in no layer
    script = "pwd; touch /srv/work/x 2>/dev/null && echo writable || echo read-only"
    ran = run([prefix / "d-run", folder, "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "/srv/work\nread-only\n"), ran.stderr
    assert (folder / "rootfs/srv/work").is_dir() and not any((folder / "rootfs/srv/work").iterdir())
