"""Sandboxes as code: a repository's dodo.py declares sandboxes with d-utils' public API, `doit` materialises them
pinned by sandboxes.lock, runs them with d-run's settings, and leaves no lock held. Against a real registry whose
log counts every request."""

import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from cli import BIN
from conftest import USER
from images import Image, Tar, busybox_layer, push, sha256
from registry_server import Registry

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[1]
DODO = """\
import os
from pathlib import Path
from dutils.pipeline import Options, Sandbox, sandbox_tasks

REGISTRY = os.environ["D_UTILS_REGISTRY"]
SANDBOXES = [
    Sandbox(
        "sandboxes/one",
        f"{REGISTRY}/one:latest",
        command=["sh", "-c", "cat /etc/which; echo $GREETING; wc -l < /proc/net/dev; exit $(cat /data/status)"],
        volumes=["data:/data:ro"],
        env={"GREETING": "hello from the dodo"},
        net=True,
    ),
    Sandbox("sandboxes/two", f"{REGISTRY}/two:latest"),
    Sandbox("sandboxes/three", f"{REGISTRY}/%(third)s:latest"),
]
DOIT_CONFIG = {"default_tasks": ["dutils"], "dep_file": "doit.json", "backend": "json", "par_type": "thread"}
globals().update(sandbox_tasks(SANDBOXES, Options(cache=Path("cache").absolute())))
"""


def version(name: str, n: int = 1) -> Image:
    """one and two share busybox's base layer; three has a base of its own."""
    top = Tar().file("etc/which", f"{name} v{n}\n".encode())
    return Image(layers=[Tar().file("three", b"3\n"), top] if name == "three" else [busybox_layer(), top])


class Project(NamedTuple):
    path: Path
    registry: Registry


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    with Registry() as registry:
        for name in ["one", "two", "three"]:
            push(registry.host, name, "latest", version(name))
        (tmp_path / "dodo.py").write_text(DODO % {"third": "three"})
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "status").write_text("0\n")
        yield Project(tmp_path, registry)


def doit(workdir: Path, registry: Registry, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir), "D_UTILS_REGISTRY": registry.host}
    return subprocess.run([BIN / "doit", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=180)


def requests_served(registry: Registry) -> int:
    return len(registry.responses())


def which(project: Path, name: str) -> str:
    return (project / "sandboxes" / name / "rootfs" / "etc" / "which").read_text()


def test_three_sandboxes_materialise_with_a_shared_layer_fetched_once_then_cost_no_request(project: Project):
    project, registry = project
    first = doit(project, registry, "-n", "3")
    assert first.returncode == 0, first.stderr
    assert [which(project, name) for name in ["one", "two"]] == ["one v1\n", "two v1\n"]
    assert (project / "sandboxes" / "three" / "rootfs" / "three").read_text() == "3\n"
    progress = first.stderr.splitlines()  # interleaved, so each line names its sandbox
    assert progress and all(
        line.startswith(tuple(f"sandboxes/{n}: " for n in ["one", "two", "three"])) for line in progress
    )
    base = sha256(version("one").layer_blobs[0])
    assert registry.blob_gets(base) == 1  # shared by one and two, downloaded once
    assert registry.manifest_gets() == 3  # one a sandbox: the lock records the digest of what the tag answered
    lock = json.loads((project / "sandboxes.lock").read_text())["sandboxes"]
    assert sorted(lock) == ["sandboxes/one", "sandboxes/three", "sandboxes/two"]
    for name, entry in lock.items():
        image = version(name.split("/")[1])
        assert entry["digest"] == entry["manifest"] == image.manifest_digest
        assert entry["reference"] == f"{registry.host}/{name.split('/')[1]}:latest"
    assert (project / "sandboxes.lock").read_text() == json.dumps({"sandboxes": lock}, indent=2, sort_keys=True) + "\n"

    served = requests_served(registry)
    again = doit(project, registry, "-n", "3")
    assert again.returncode == 0, again.stderr
    assert requests_served(registry) == served  # not even a ping
    ran = [line for line in again.stdout.splitlines() if not line.startswith("-- ")]
    assert ran == [], again.stdout  # every task up to date
    assert {"-- dutils-manifest:sandboxes/one", "-- dutils-config:sandboxes/three"} <= set(again.stdout.splitlines())
    with (project / "dodo.py").open("a") as dodo:  # as doit ends: did d-utils' own code load requests?
        dodo.write(
            'import atexit, sys\natexit.register(lambda: print("loaded", {"requests", "urllib3"} & {*sys.modules}))\n'
        )
    assert doit(project, registry).stdout.splitlines()[-1] == "loaded set()"  # all up to date: no registry asked


def test_a_moved_tag_changes_a_locked_sandbox_only_when_the_lock_is_updated(project: Project):
    project, registry = project
    assert doit(project, registry).returncode == 0
    config = project / "sandboxes" / "two" / "config.json"
    edited = json.loads(config.read_text()) | {"net": True, "Env": ["MINE=1"]}
    config.write_text(json.dumps(edited))
    locked = (project / "sandboxes.lock").read_text()
    push(registry.host, "two", "latest", version("two", 2))

    served = requests_served(registry)
    assert doit(project, registry).returncode == 0
    assert which(project, "two") == "two v1\n" and requests_served(registry) == served
    assert (project / "sandboxes.lock").read_text() == locked

    blobs_before = registry.blob_gets()
    updated = doit(project, registry, "dutils-update=sandboxes/two")
    assert updated.returncode == 0, updated.stderr
    assert which(project, "two") == "two v2\n" and which(project, "one") == "one v1\n"
    assert registry.blob_gets() - blobs_before == 2  # the new top layer and config; the base is cached
    lock = json.loads((project / "sandboxes.lock").read_text())["sandboxes"]
    assert lock["sandboxes/two"]["manifest"] == version("two", 2).manifest_digest
    assert lock["sandboxes/one"]["manifest"] == version("one").manifest_digest
    kept = json.loads(config.read_text())
    assert kept["net"] is True and kept["Env"] == ["MINE=1"]  # the user's edits survive, as with d-pull --update


def test_a_missing_image_fails_alone_and_the_run_leaves_no_lock_held(project: Project):
    project, registry = project
    (project / "dodo.py").write_text(DODO % {"third": "missing"})
    stale = project / "cache" / "blobs" / "sha256" / ("0" * 64)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"unused for 31 days")
    os.utime(stale, (time.time() - 31 * 86400,) * 2)
    done = doit(project, registry, "--continue", "-n", "3")
    assert done.returncode != 0
    assert "missing" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    assert [which(project, name) for name in ["one", "two"]] == ["one v1\n", "two v1\n"]
    assert not (project / "sandboxes" / "three").exists()  # a failed first pull leaves nothing behind
    assert not stale.exists()  # pruned as the run ended, as after a d-pull
    for lock in [project / "cache" / "lock", *project.glob("sandboxes/*/.d-pull/lock")]:
        with open(lock, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone still held it
    pruned = subprocess.run([BIN / "d-cache", "--cache", str(project / "cache"), "prune", "--all"], timeout=10)
    assert pruned.returncode == 0
    assert "sandboxes/three" not in json.loads((project / "sandboxes.lock").read_text())["sandboxes"]


def test_the_run_task_passes_volume_env_and_net_and_its_exit_status_is_the_result(project: Project):
    project, registry = project
    ran = doit(project, registry, "dutils-run:sandboxes/one")
    assert ran.returncode == 0, ran.stderr
    host_interfaces = len(Path("/proc/net/dev").read_text().splitlines())
    assert ran.stdout.splitlines()[-3:] == ["one v1", "hello from the dodo", str(host_interfaces)]
    (project / "data" / "status").write_text("3\n")
    failed = doit(project, registry, "dutils-run:sandboxes/one")
    assert failed.returncode != 0 and "one v1" in failed.stdout


def test_clean_removes_only_that_sandboxs_folder(project: Project):
    project, registry = project
    assert doit(project, registry).returncode == 0
    blobs = sorted((project / "cache" / "blobs" / "sha256").iterdir())
    cleaned = doit(project, registry, "clean", "dutils-manifest:sandboxes/two")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (project / "sandboxes" / "two").exists()
    assert which(project, "one") == "one v1\n" and sorted((project / "cache" / "blobs" / "sha256").iterdir()) == blobs


def test_the_repositorys_own_dodo_materialises_and_runs_its_sandbox(images, registry, tmp_path: Path):
    shutil.copy(REPO / "dodo.py", tmp_path / "dodo.py")  # a repository of the user's: the cache is its own
    listed = doit(tmp_path, registry, "list")
    assert listed.returncode == 0 and "dutils-manifest" in listed.stdout, listed.stderr
    assert doit(tmp_path, registry).returncode == 0
    ran = doit(tmp_path, registry, "dutils-run:sandboxes/busybox")
    assert ran.returncode == 0, ran.stderr
    assert "busybox" in ran.stdout.lower()


def test_an_ordinary_user_materialises_locks_and_runs_a_sandbox(images, unprivileged):
    dodo = (
        "from pathlib import Path\nfrom dutils.pipeline import Options, Sandbox, sandbox_tasks\n"
        f"SANDBOXES = [Sandbox('sb', '{images['busybox']}', command=['sh', '-c', 'id -u; exit 4'])]\n"
        "DOIT_CONFIG = {'default_tasks': ['dutils'], 'dep_file': 'doit.json', 'backend': 'json'}\n"
        "globals().update(sandbox_tasks(SANDBOXES, Options(cache=Path('cache').absolute())))\n"
    )
    project = Path(tempfile.mkdtemp(prefix="d-utils-dodo-"))
    try:
        project.chmod(0o755)
        (project / "dodo.py").write_text(dodo)
        shutil.chown(project, USER, USER)
        shutil.chown(project / "dodo.py", USER, USER)

        def user_doit(*args: str) -> subprocess.CompletedProcess:
            return unprivileged.run(["doit", *args], cwd=project, capture_output=True, text=True, timeout=180)

        done = user_doit()
        assert done.returncode == 0, done.stderr
        assert (project / "sb" / "rootfs" / "bin" / "busybox").is_file() and (project / "sandboxes.lock").is_file()
        assert (project / "sb" / "rootfs").stat().st_uid == pwd.getpwnam(USER).pw_uid
        ran = user_doit("dutils-run:sb")
        assert ran.returncode != 0 and "0" in ran.stdout.splitlines()  # root inside; exit 4 fails the task
        assert "returned 4" in ran.stdout
    finally:
        shutil.rmtree(project)


def test_ctrl_c_under_doit_is_one_line_and_a_rerun_resumes(tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers: the manifest task waits
        (tmp_path / "dodo.py").write_text(
            "from pathlib import Path\nfrom dutils.pipeline import Options, Sandbox, sandbox_tasks\n"
            f"SANDBOXES = [Sandbox('sb', '127.0.0.1:{silent.getsockname()[1]}/app:1')]\n"
            "DOIT_CONFIG = {'default_tasks': ['dutils'], 'dep_file': 'doit.json', 'backend': 'json'}\n"
            "globals().update(sandbox_tasks(SANDBOXES, Options(cache=Path('cache').absolute())))\n"
        )
        doit = subprocess.Popen(
            [BIN / "doit"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
        )
        silent.settimeout(60)
        silent.accept()[0].close()  # the task is asking the registry: interrupt it there
        doit.send_signal(signal.SIGINT)
        _, stderr = doit.communicate(timeout=60)
    assert doit.returncode != 0
    assert "Traceback" not in stderr and stderr.strip() == "interrupted; run the same doit command again to resume"


def test_every_task_has_a_description_in_doit_list(tmp_path: Path):
    (tmp_path / "dodo.py").write_text(
        "from pathlib import Path\nfrom dutils.pipeline import Options, Sandbox, sandbox_tasks\n"
        "SANDBOXES = [Sandbox('sb', '127.0.0.1:9/app:1', command=['true'])]\n"
        "globals().update(sandbox_tasks(SANDBOXES, Options(cache=Path('cache').absolute())))\n"
    )
    listed = subprocess.run([BIN / "doit", "list", "--all"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and len(lines) == 5, listed
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines), lines  # a name and its description
    assert not (tmp_path / "sb").exists()  # listing pulls nothing
