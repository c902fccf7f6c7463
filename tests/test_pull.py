"""d-pull end to end against a real docker-registry: what a user sees, from first pull to errors."""

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from cli import BIN, assert_one_line_error, d_pull, d_run
from images import Image, Tar, busybox_layer, push, push_index
from malicious import make_workspace
from registry_server import Registry, free_port

from dutils.store import PullDir


@pytest.fixture(scope="module")
def pulled(images, tmp_path_factory) -> Path:
    """The standard busybox image, pulled once for the tests that only read it."""
    base = tmp_path_factory.mktemp("pulled")
    done = d_pull(images["busybox"], str(base / "bb"), cache=base / "cache")
    assert done.returncode == 0, done.stderr
    return base / "bb"


def test_pull_makes_a_plain_folder(pulled, images):
    assert (pulled / "rootfs" / "bin" / "busybox").is_file()
    config = json.loads((pulled / "config.json").read_text())
    assert config["Cmd"] == ["sh"] and config["net"] is False and config["rw"] is False
    record = json.loads((pulled / "image.json").read_text())
    assert record["reference"] == images["busybox"] and record["complete"] is True
    assert record["digest"].startswith("sha256:")


def test_pulled_image_runs(pulled):
    hi = d_run(pulled, "echo", "hi")
    assert (hi.returncode, hi.stdout) == (0, "hi\n"), hi.stderr
    assert d_run(pulled, "sh", "-c", "exit 7").returncode == 7


def test_config_reaches_the_container(pulled):
    env = d_run(pulled, "env").stdout.splitlines()
    assert "GREETING=hello" in env
    assert d_run(pulled, "pwd").stdout == "/home/app\n"


def test_default_folder_is_the_image_name(images, tmp_path):
    done = subprocess.run(
        [BIN / "d-pull", "-q", "--cache", str(tmp_path / "cache"), images["busybox-plain"]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet
    assert (tmp_path / images["busybox-plain"].rsplit("/", 1)[1].split(":")[0] / "rootfs" / "bin" / "sh").exists()


def test_second_pull_fetches_nothing_and_says_so(images, registry, tmp_path):
    cache = tmp_path / "cache"
    assert d_pull(images["busybox"], str(tmp_path / "bb"), cache=cache).returncode == 0
    served = registry.blob_gets()
    again = d_pull(images["busybox"], str(tmp_path / "bb"), cache=cache)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
    assert registry.blob_gets() == served


def test_cache_is_shared_between_folders(images, registry, tmp_path):
    cache = tmp_path / "cache"
    assert d_pull(images["busybox"], str(tmp_path / "one"), cache=cache).returncode == 0
    served = registry.blob_gets()
    assert d_pull(images["busybox"], str(tmp_path / "two"), cache=cache).returncode == 0
    assert registry.blob_gets() == served
    assert (tmp_path / "two" / "rootfs" / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()


@pytest.mark.parametrize("name", ["busybox-docker", "busybox-oci", "busybox-plain"])
def test_images_pushed_by_skopeo_and_plain_layers_pull_alike(name, images, pulled, tmp_path):
    done = d_pull(images[name], str(tmp_path / "x"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert d_run(tmp_path / "x", "cat", "/etc/os-release").stdout == (pulled / "rootfs/etc/os-release").read_text()


def test_whiteouts_of_the_upper_layer_hide_files(pulled):
    rootfs = pulled / "rootfs"
    assert not any(p.name.startswith(".wh.") for p in rootfs.rglob("*"))
    assert not (rootfs / "etc" / "removed-by-layer-2").exists()
    assert (rootfs / "etc" / "added-by-layer-2").exists()


@pytest.mark.parametrize(("platform", "arch"), [(None, "amd64"), ("linux/arm64/v8", "arm64"), ("linux/amd64", "amd64")])
def test_index_is_narrowed_to_a_platform(platform, arch, images, tmp_path):
    args = [images["multi"], str(tmp_path / "m")] + (["--platform", platform] if platform else [])
    done = d_pull(*args, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "rootfs" / "etc" / "arch").read_text().strip() == arch
    assert json.loads((tmp_path / "m" / "image.json").read_text())["platform"].startswith(f"linux/{arch}")


def test_platform_not_offered_lists_the_offers(images, tmp_path):
    done = d_pull(images["multi"], str(tmp_path / "m"), "--platform", "linux/s390x", cache=tmp_path / "cache")
    assert_one_line_error(done, "linux/amd64", "linux/arm64/v8")
    assert not (tmp_path / "m").exists()


def test_pull_by_digest_is_verified(images, registry, tmp_path):
    pulled = d_pull(images["busybox"], str(tmp_path / "a"), cache=tmp_path / "cache")
    assert pulled.returncode == 0
    digest = json.loads((tmp_path / "a" / "image.json").read_text())["digest"]
    by_digest = images["busybox"].rsplit(":", 1)[0] + "@" + digest
    assert d_pull(by_digest, str(tmp_path / "b"), cache=tmp_path / "cache").returncode == 0
    wrong = by_digest[:-8] + "00000000"
    assert_one_line_error(d_pull(wrong, str(tmp_path / "c"), cache=tmp_path / "cache"), "unknown manifest")


def test_unknown_image_tag_and_registry_are_one_line_errors(images, registry, tmp_path):
    cache = tmp_path / "cache"
    assert_one_line_error(d_pull(f"{registry.host}/no-such-image", str(tmp_path / "a"), cache=cache), "unknown image")
    tag = images["busybox"].rsplit(":", 1)[0] + ":no-such-tag"
    assert_one_line_error(d_pull(tag, str(tmp_path / "b"), cache=cache), "unknown manifest", "no-such-tag")
    assert_one_line_error(d_pull("127.0.0.1:9/x", str(tmp_path / "c"), cache=cache), "127.0.0.1:9", "refused")
    assert_one_line_error(d_pull("Not/Valid", str(tmp_path / "d"), cache=cache), "invalid image reference")
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing left behind by a failed start


def test_a_folder_not_made_by_d_pull_is_never_touched(images, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = sorted(os.listdir(mine))
    assert_one_line_error(d_pull(images["busybox"], str(mine), cache=tmp_path / "cache"), "not made by d-pull")
    assert sorted(os.listdir(mine)) == before and (mine / "notes.txt").read_text() == "precious"


def test_help_describes_every_argument():
    text = subprocess.run([BIN / "d-pull", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ["IMAGE", "DIR", "--platform", "--cache", "--update", "--insecure", "--ca-bundle", "--username"]:
        assert word in text
    for word in ["--password-stdin", "--jobs", "--quiet", "--debug", "D_UTILS_CACHE"]:
        assert word in text


def test_a_lock_file_pins_the_folder_and_update_moves_it(registry, tmp_path):
    versions = [Image(layers=[busybox_layer(), Tar().file("etc/v", f"{n}\n".encode())]) for n in (1, 2)]
    push(registry.host, "locked-app", "latest", versions[0])
    ref, lock, folder = f"{registry.host}/locked-app:latest", tmp_path / "sandboxes.lock", tmp_path / "app"

    def pull(*flags: str) -> dict:
        done = d_pull("--lock", str(lock), *flags, ref, str(folder), cache=tmp_path / "cache")
        assert done.returncode == 0, done.stderr
        return json.loads(lock.read_text())["sandboxes"]["app"]

    assert pull() == {
        "reference": ref,
        "digest": versions[0].manifest_digest,
        "manifest": versions[0].manifest_digest,
        "platform": "linux/amd64",
    }
    push(registry.host, "locked-app", "latest", versions[1])  # the tag moves
    served = len(registry.responses())
    assert pull()["manifest"] == versions[0].manifest_digest
    assert len(registry.responses()) == served  # complete and locked: not one request
    assert (folder / "rootfs" / "etc" / "v").read_text() == "1\n"
    assert pull("--update")["manifest"] == versions[1].manifest_digest
    assert (folder / "rootfs" / "etc" / "v").read_text() == "2\n"


def test_a_damaged_lock_file_is_a_one_line_error(images, tmp_path):
    (tmp_path / "sandboxes.lock").write_text('{"sandboxes": {"bb": {"digest": "sha256:../../etc"}}}')
    done = d_pull("--lock", str(tmp_path / "sandboxes.lock"), images["busybox"], str(tmp_path / "bb"), cache=tmp_path)
    assert_one_line_error(done, "sandboxes.lock is damaged", "restore it")
    assert not (tmp_path / "bb").exists()


@pytest.mark.parametrize("who", ["root", "user"])
@pytest.mark.parametrize("prune", [False, True], ids=["cache-kept", "after-prune-all"])
def test_update_merges_env_per_variable_and_keeps_the_users_edits(who, prune, registry, request, tmp_path):
    def image(n: int) -> Image:
        config = {"Cmd": ["sh"], "Env": ["PATH=/bin", f"VERSION={n}", f"ONLY_IN_{n}=yes"], "Hostname": f"build{n}"}
        return Image(layers=[busybox_layer(), Tar().file("etc/v", f"{n}\n".encode())], config=config)

    if who == "user":  # the ordinary user's own tools, in a folder of theirs
        user, place = request.getfixturevalue("unprivileged"), make_workspace()
        request.addfinalizer(lambda: shutil.rmtree(place))
        place, tool = place / "pull", user.tool
    else:
        place = tmp_path

        def tool(name: str, *args: object) -> subprocess.CompletedProcess:
            return subprocess.run([BIN / name, *map(str, args)], capture_output=True, text=True, timeout=120)

    name = f"moving-{who}-{int(prune)}"
    push(registry.host, name, "latest", image(1))
    ref, folder, cache = f"{registry.host}/{name}:latest", place / "app", place / "cache"
    assert tool("d-pull", "--cache", cache, ref, folder).returncode == 0
    config = json.loads((folder / "config.json").read_text())
    assert (
        "Hostname" not in config
    )  # the image's (buildah writes its build container's id there) is not the container's
    assert json.loads((folder / ".d-pull" / "base.json").read_text()) == config  # in DIR, not only in the cache
    config["Env"].append("MINE=kept")
    (folder / "config.json").write_text(json.dumps(config | {"Hostname": "mybox"}))

    push(registry.host, name, "latest", image(2))  # the tag moves
    if prune:  # the old image's config is gone from the cache: the update must not change
        assert tool("d-cache", "--cache", cache, "prune", "--all").returncode == 0
        assert not any((cache / "blobs" / "sha256").iterdir())
    updated = tool("d-pull", "--cache", cache, "--update", ref, folder)
    assert updated.returncode == 0, updated.stderr
    config = json.loads((folder / "config.json").read_text())
    assert config["Env"] == ["PATH=/bin", "VERSION=2", "ONLY_IN_2=yes", "MINE=kept"]
    assert config["Hostname"] == "mybox"
    assert f"kept your edits to {folder}/config.json: Env MINE, Hostname\n" in updated.stderr
    ran = tool("d-run", folder, "sh", "-c", "echo $VERSION $MINE $ONLY_IN_1")
    assert ran.stdout == "2 kept\n", ran.stderr


# d-pull's main in a fresh interpreter, the modules it loaded printed as its last line of output
WITH_MODULES = "import sys; from dutils.pull import main; code = main(); print(sorted(sys.modules)); sys.exit(code)"
HEAVY = {"requests", "urllib3", "doit"}
# what else would cost the --lock no-op milliseconds (pathlib is not here: an editable install's site loads it)
SLOW_TO_LOAD = {"dataclasses", "inspect", "typing", "hashlib", "json", "shutil", "threading"}


def pulling_as(who: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, Callable]:
    """Where `who` pulls, its python, and how to run a command as it."""
    if who == "root":
        return tmp_path, BIN / "python", subprocess.run
    user, place = request.getfixturevalue("unprivileged"), make_workspace()
    request.addfinalizer(lambda: shutil.rmtree(place))
    # credential folders of its own: what other tests leave in the user's (or /run/containers, which root's
    # podman makes 0700) is not what this test is about
    env = dict.fromkeys(["XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"], str(place / "pull"))
    return place / "pull", user.bin / "python", partial(user.run, env=env)


def pull_with_modules(python: Path, run: Callable, *argv: object) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = run([python, "-c", WITH_MODULES, *argv], capture_output=True, text=True, timeout=120)
    return done, set(json.loads(done.stdout.replace("'", '"') or "[]"))


@pytest.mark.parametrize("who", ["root", "user"])
def test_a_locked_complete_folder_is_decided_before_requests_or_doit_load(who, registry, request, tmp_path):
    versions = [Image(layers=[busybox_layer(), Tar().file("etc/v", f"{n}\n".encode())]) for n in (1, 2)]
    name = f"settled-{who}"
    push(registry.host, name, "latest", versions[0])
    place, python, run = pulling_as(who, request, tmp_path)
    ref, lock, folder, cache = (
        f"{registry.host}/{name}:latest",
        place / "sandboxes.lock",
        place / "app",
        place / "cache",
    )

    def pull(*flags: str) -> tuple[subprocess.CompletedProcess, set[str]]:
        return pull_with_modules(python, run, "--cache", cache, "--lock", lock, *flags, ref, folder)

    done, loaded = pull()
    assert done.returncode == 0 and loaded >= HEAVY, done.stderr  # the first pull: the whole pipeline
    served = len(registry.responses())
    done, loaded = pull()
    assert done.returncode == 0, done.stderr
    assert not (HEAVY | SLOW_TO_LOAD) & loaded
    assert done.stderr == f"up to date: {ref} ({versions[0].manifest_digest}) in {folder}\n"
    assert len(registry.responses()) == served
    done, loaded = pull("--update")  # always the full path, which asks the registry
    assert done.returncode == 0 and loaded >= HEAVY and len(registry.responses()) > served, done.stderr

    push(registry.host, name, "latest", versions[1])
    pinned = json.loads(lock.read_text())
    pinned["sandboxes"]["app"] |= {"digest": versions[1].manifest_digest, "manifest": versions[1].manifest_digest}
    lock.write_text(json.dumps(pinned))  # a lock that names another image than the folder's: the full path
    done, loaded = pull()
    assert done.returncode == 0 and loaded >= HEAVY, done.stderr
    assert (folder / "rootfs" / "etc" / "v").read_text() == "2\n"

    folder.chmod(0o770)  # a folder others may have changed is not settled: the full path refuses it in one line
    done, loaded = pull()
    assert_one_line_error(done, "refusing", "writable by other users")


@pytest.mark.parametrize("who", ["root", "user"])
def test_a_tags_no_op_asks_the_registry_and_loads_no_doit(who, registry, request, tmp_path):
    amd64, arm64 = ([Image(layers=[busybox_layer(), Tar().file("etc/v", f"{n}\n".encode())], arch=arch, variant=variant)
                     for n in (1, 2)] for arch, variant in [("amd64", ""), ("arm64", "v8")])  # fmt: skip
    name = f"tag-no-op-{who}"
    push_index(registry.host, name, "latest", [amd64[0], arm64[0]])
    place, python, run = pulling_as(who, request, tmp_path)
    ref, folder, cache = f"{registry.host}/{name}:latest", place / "app", place / "cache"
    pull = partial(pull_with_modules, python, run, "--cache", cache, "--platform", "linux/amd64")
    done, loaded = pull(ref, folder)
    assert done.returncode == 0 and loaded >= HEAVY, done.stderr  # the first pull: the whole pipeline

    for _ in range(2):  # the second time, the index moved, but not the entry for this platform
        served = len(registry.responses())
        done, loaded = pull(ref, folder)
        assert done.returncode == 0 and "requests" in loaded, done.stderr
        assert not {"doit", "dutils.runner", "dutils.apply", "dutils.share"} & loaded  # no stage it need not run
        assert not {"concurrent.futures", "subprocess"} & loaded  # nor what only a download or a helper needs
        assert done.stderr == f"up to date: {ref} ({amd64[0].manifest_digest}) in {folder}\n"
        asked = [entry["http.request.uri"] for entry in registry.responses()[served:]]
        assert f"/v2/{name}/manifests/latest" in asked and not any("/blobs/" in uri for uri in asked)
        push_index(registry.host, name, "latest", [amd64[0], arm64[1]])

    done, loaded = pull("--platform", "linux/arm64", ref, folder)  # another platform's image: the full path says so
    assert_one_line_error(done, "is now", arm64[1].manifest_digest[:19])
    assert "doit" in loaded
    push_index(registry.host, name, "latest", [amd64[1], arm64[1]])  # this platform's image moved: the full path
    done, loaded = pull(ref, folder)
    assert_one_line_error(done, "is now", amd64[1].manifest_digest[:19])
    assert "doit" in loaded
    done, loaded = pull("--update", ref, folder)
    assert done.returncode == 0, done.stderr
    assert (folder / "rootfs" / "etc" / "v").read_text() == "2\n"
    done, loaded = pull(ref, folder)
    assert done.returncode == 0 and "doit" not in loaded, done.stderr
    assert done.stderr == f"up to date: {ref} ({amd64[1].manifest_digest}) in {folder}\n"


def test_a_tags_no_op_asks_a_mirror_first_as_the_pull_does(registry, tmp_path):
    push(registry.host, "tag-no-op-mirror", "latest", Image(layers=[busybox_layer()]))
    ref, folder, cache = f"{registry.host}/tag-no-op-mirror:latest", tmp_path / "app", tmp_path / "cache"
    with Registry({"proxy": {"remoteurl": registry.url}}) as mirror:
        assert d_pull("--mirror", mirror.host, ref, str(folder), cache=cache).returncode == 0
        asked = mirror.manifest_gets()
        done = d_pull("--mirror", mirror.host, ref, str(folder), cache=cache)
        assert done.returncode == 0 and done.stderr.startswith(f"up to date: {ref} "), done.stderr
        assert mirror.manifest_gets() == asked + 1


def test_a_tags_no_op_hides_no_failure_the_full_path_would_show(registry, tmp_path):
    """As docker and podman pull: a registry that does not answer, or a policy that rejects, is an error."""
    push(registry.host, "tag-no-op-fails", "latest", Image(layers=[busybox_layer()]))
    ref, folder, cache = f"{registry.host}/tag-no-op-fails:latest", tmp_path / "app", tmp_path / "cache"
    assert d_pull(ref, str(folder), cache=cache).returncode == 0
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "reject"}]}))
    assert_one_line_error(d_pull("--policy", str(policy), ref, str(folder), cache=cache), "rejects")

    gone = f"127.0.0.1:{free_port()}/tag-no-op-fails:latest"  # nothing listens there
    PullDir(folder).write_record(PullDir(folder).read_record()._replace(reference=gone))
    assert_one_line_error(d_pull("--timeout", "2", gone, str(folder), cache=cache), "giving up")


def test_a_locked_folder_with_a_damaged_record_is_one_line_from_the_full_path(tmp_path):
    folder, lock = tmp_path / "app", tmp_path / "sandboxes.lock"
    (folder / "rootfs").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    manifest = f"sha256:{2:064x}"
    record = {"reference": "localhost:5000/app:1", "digest": manifest, "platform": 5, "complete": True}
    (folder / "image.json").write_text(json.dumps(record))
    lock.write_text(json.dumps({"sandboxes": {"app": record | {"manifest": manifest}}}))
    done = d_pull("--lock", str(lock), "localhost:5000/app:1", str(folder), cache=tmp_path / "cache")
    assert_one_line_error(done, "damaged pull record", "must be strings")


def test_a_bug_outside_the_tasks_is_one_line_unless_debug(monkeypatch, capsys):
    """No input is known to reach a bug in a tag's check or direct.py; one is put in its place, as a bug would be:
    d-pull says it in one line, as runner.py says one in a task, and --debug shows the traceback."""
    import dutils.pull

    def buggy(args):
        raise RuntimeError("a\nb")

    monkeypatch.setattr(dutils.pull, "pull", buggy)
    assert dutils.pull.main(["example.org/image:tag", "folder"]) == 1
    said = capsys.readouterr().err
    assert said == "d-pull: error: internal error: RuntimeError: a\\x0ab (run with --debug for details)\n"
    with pytest.raises(RuntimeError):
        dutils.pull.main(["--debug", "example.org/image:tag", "folder"])
