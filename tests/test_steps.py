"""Build steps: doit runs a step in its sandbox only when its inputs, image, command or settings changed, in a work
folder holding its inputs and nothing else of the host. doit runs as a subprocess, as root and as the ordinary user,
against a real registry; every bwrap started is counted by a bwrap on PATH that logs, then execs the real one."""

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli import BIN
from conftest import USER
from images import Image, Tar, busybox_layer, push
from registry_server import Registry

from dutils.errors import Error
from dutils.pipeline import Sandbox
from dutils.steps import Step, check_paths, expand

REPO = Path(__file__).parents[1]
DODO = """\
from pathlib import Path
from dutils.pipeline import Options, Sandbox, sandbox_tasks
from dutils.steps import Step, step_tasks

GEN, CC = Sandbox("sandboxes/gen", "{registry}/gen:latest"), Sandbox("sandboxes/cc", "{registry}/cc:latest")
STEPS = {steps}
DOIT_CONFIG = {{"default_tasks": ["dutils", "step"], "dep_file": "doit.json", "backend": "json", "par_type": "thread"}}
globals().update(sandbox_tasks([GEN, CC], Options(cache=Path("cache").absolute())))
globals().update(step_tasks(STEPS))
"""
CHAIN = """[
    Step("generate", GEN, ["sh", "-c", "sed s/NAME/world/ template.txt > gen/hello.c"], inputs=["template.txt"],
         outputs=["gen/hello.c"]),
    Step("compile", CC, ["sh", "-c", "cat /etc/which gen/hello.c flags.txt > build/program; id -u > build/uid"],
         inputs=["gen/*.c", "gen/hello.c", "flags.txt"], outputs=["build/"]),
]"""
BWRAP = '#!/bin/sh\necho "$*" >> {log}\nexec /usr/bin/bwrap "$@"\n'


def image(name: str, n: int = 1) -> Image:
    return Image(layers=[busybox_layer(), Tar().file("etc/which", f"{name} v{n}\n".encode())])


class Project:
    """A dodo.py folder with its steps, run by root or by the ordinary user; a logging bwrap first on PATH."""

    def __init__(self, top: Path, registry: Registry, user) -> None:
        self.top, self.path, self.registry, self.user = top, top / "project", registry, user
        self.log = top / "bwrap.log"
        (top / "shim").mkdir()
        (top / "shim" / "bwrap").write_text(BWRAP.format(log=self.log))
        (top / "shim" / "bwrap").chmod(0o755)
        self.path.mkdir()

    def write(self, name: str, text: str) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.own()
        return path

    def own(self) -> None:
        if self.user:
            subprocess.run(["chown", "-R", f"{USER}:{USER}", str(self.top)], check=True)

    def dodo(self, steps: str) -> None:
        self.write("dodo.py", DODO.format(registry=self.registry.host, steps=steps))

    def doit(self, *args: str) -> subprocess.CompletedProcess:
        path = f"{self.top / 'shim'}:{self.user.bin if self.user else BIN}:/usr/bin:/bin"
        if self.user:
            run = self.user.run(
                ["doit", *args], cwd=self.path, env={"PATH": path}, capture_output=True, text=True, timeout=180
            )
        else:
            env = {"PATH": path, "HOME": str(self.top)}
            run = subprocess.run(["doit", *args], cwd=self.path, env=env, capture_output=True, text=True, timeout=180)
        assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
        return run

    def started(self, word: str = "") -> int:
        """bwrap processes started so far, of every step or of those whose command line holds `word`."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(word in line for line in lines)

    def uid(self) -> int:
        return pwd.getpwnam(USER).pw_uid if self.user and self.user.as_root else os.getuid()


@pytest.fixture(params=["root", "user"])
def project(request: pytest.FixtureRequest) -> Iterator[Project]:
    user = request.getfixturevalue("unprivileged") if request.param == "user" else None
    top = Path(tempfile.mkdtemp(prefix="d-utils-steps-"))
    top.chmod(0o755)
    try:
        with Registry() as registry:
            push(registry.host, "gen", "latest", image("gen"))
            push(registry.host, "cc", "latest", image("cc"))
            yield Project(top, registry, user)
    finally:
        shutil.rmtree(top)


@pytest.mark.integration
def test_a_chain_of_two_steps_runs_only_what_its_changes_reach(project: Project):
    project.dodo(CHAIN)
    project.write("template.txt", "hello NAME\n")
    project.write("flags.txt", "-O2\n")
    first = project.doit()
    assert first.returncode == 0, first.stdout + first.stderr
    program = project.path / "build" / "program"
    assert program.read_text() == "cc v1\nhello world\n-O2\n"
    assert (project.path / "build" / "uid").read_text() == "0\n"  # the image's root, mapped from the user
    for made in [program, program.parent, project.path / "gen" / "hello.c"]:
        assert made.stat().st_uid == project.uid()
    assert (project.started("template.txt"), project.started("flags.txt")) == (1, 1)
    assert not list(project.path.glob(".dutils-step-*"))

    again = project.doit()
    assert again.returncode == 0, again.stderr
    assert project.started() == 2  # no bwrap at all

    project.write("flags.txt", "-O3\n")
    assert project.doit().returncode == 0
    assert (project.started("template.txt"), project.started("flags.txt")) == (1, 2)
    assert program.read_text().endswith("-O3\n")

    project.write("template.txt", "goodbye NAME\n")
    assert project.doit().returncode == 0
    assert (project.started("template.txt"), project.started("flags.txt")) == (2, 3)
    assert program.read_text() == "cc v1\ngoodbye world\n-O3\n"

    push(project.registry.host, "gen", "latest", image("gen", 2))
    assert project.doit().returncode == 0 and project.started() == 5  # the lock holds the image still
    moved = project.doit("dutils-update=all")
    assert moved.returncode == 0, moved.stderr
    assert (project.started("template.txt"), project.started("flags.txt")) == (3, 3)  # same hello.c: no compile
    lock = json.loads((project.path / "sandboxes.lock").read_text())["sandboxes"]
    assert lock["sandboxes/gen"]["manifest"] == image("gen", 2).manifest_digest

    cleaned = project.doit("clean", "step:compile")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (project.path / "build").exists() and (project.path / "gen" / "hello.c").exists()
    assert project.doit().returncode == 0 and program.exists()
    assert (project.started("template.txt"), project.started("flags.txt")) == (3, 4)
    assert project.doit("forget", "step:generate").returncode == 0
    assert project.doit().returncode == 0
    assert (project.started("template.txt"), project.started("flags.txt")) == (4, 4)


@pytest.mark.integration
def test_a_failing_step_leaves_no_output_and_stops_no_other_branch(project: Project):
    project.dodo("""[
    Step("bad", GEN, ["sh", "-c", "echo half > out/made; echo something went wrong; exit 3"], outputs=["out/"]),
    Step("after-bad", GEN, ["sh", "-c", "cat out/made > after"], inputs=["out/made"], outputs=["after"]),
    Step("good", CC, ["sh", "-c", "echo fine > good"], outputs=["good"]),
]""")
    for attempt in (1, 2):
        done = project.doit("--continue")
        assert done.returncode != 0
        assert "something went wrong" in done.stdout and "step bad failed (exit status 3)" in done.stdout + done.stderr
        assert not (project.path / "out").exists() and not (project.path / "after").exists()
        assert not list(project.path.glob(".dutils-step-*"))
        assert (project.path / "good").read_text() == "fine\n"
        assert (project.started("half"), project.started("fine"), project.started("after")) == (attempt, 1, 0)


@pytest.mark.integration
def test_a_step_sees_only_its_inputs_and_no_network(project: Project):
    secret, outside = project.write("secret.txt", "in the project\n"), project.top / "outside.txt"
    outside.write_text("outside the project\n")
    probe = f"cat secret.txt /tmp/work/secret.txt {outside}; find / -name '*.txt' 2>/dev/null; "
    probe += f"printf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' | nc -w 5 127.0.0.1 {project.registry.port} && echo NET-OK"
    project.dodo(f"""[
    Step("probe", GEN, ["sh", "-c", {probe!r} + "; echo done > out"], inputs=["input.txt"], outputs=["out"]),
    Step("online", GEN, ["sh", "-c", {probe!r} + "; echo done > out2"], outputs=["out2"], net=True),
]""")
    project.write("input.txt", "readable\n")
    project.own()
    for canary in (secret, outside):  # older atime than mtime: under relatime, a read updates it
        os.utime(canary, (time.time() - 3600, time.time()))
    before = {canary: canary.stat().st_atime_ns for canary in (secret, outside)}
    assert project.doit("dutils").returncode == 0
    served = len(project.registry.responses())
    done = project.doit("-n", "2", "step")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in the project" not in done.stdout and "outside the project" not in done.stdout
    found = [line for line in done.stdout.splitlines() if line.startswith("/") and line.endswith(".txt")]
    assert found.count("/tmp/work/input.txt") == 1 and len(found) == 1, found  # the probe's input; the online has none
    assert done.stdout.count("NET-OK") == 1  # the online step only
    assert len(project.registry.responses()) == served + 1
    assert {canary: canary.stat().st_atime_ns for canary in (secret, outside)} == before
    secret.read_text()  # the check can fail: a read from the host does move the atime
    assert secret.stat().st_atime_ns != before[secret]


@pytest.mark.integration
def test_four_independent_steps_in_parallel_pull_their_image_once(project: Project):
    project.dodo(
        "[" + ", ".join(f'Step("s{n}", GEN, ["sh", "-c", "echo {n} > o{n}"], outputs=["o{n}"])' for n in range(4)) + "]"
    )
    done = project.doit("-n", "3", "step")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [(project.path / f"o{n}").read_text() for n in range(4)] == [f"{n}\n" for n in range(4)]
    assert project.registry.manifest_gets() == 1 and project.started() == 4
    assert all(project.registry.blob_gets(digest) == 1 for digest in image("gen").blobs())


@pytest.mark.integration
def test_a_path_out_of_the_project_is_refused_in_one_line_and_nothing_outside_changes(project: Project):
    target = project.top / "target.txt"
    target.write_text("keep me\n")
    (project.path / "linked").symlink_to(project.top)
    project.dodo('[Step("escape", GEN, ["sh", "-c", "echo evil > linked/target.txt"], outputs=["linked/target.txt"])]')
    done = project.doit()
    assert done.returncode != 0 and "linked/target.txt is not inside" in done.stdout + done.stderr
    assert target.read_text() == "keep me\n" and project.started() == 0


@pytest.mark.integration
def test_a_step_that_turns_its_output_folder_into_a_link_moves_no_host_file(project: Project):
    secret = project.top / "secret"
    secret.mkdir()
    (secret / "key").write_text("private\n")
    project.own()
    link = f"rm -rf out && ln -s {secret} out"  # after the step, out/key would be the host's secret/key
    project.dodo(f'[Step("steal", GEN, ["sh", "-c", "{link}"], outputs=["out/key"])]')
    done = project.doit()
    assert done.returncode != 0 and "leads through the symbolic link out" in done.stdout + done.stderr
    assert (secret / "key").read_text() == "private\n"
    assert not (project.path / "out").exists()


def test_paths_leading_out_of_the_dodo_folder_are_refused(tmp_path: Path):
    base = tmp_path.resolve()
    (base / "src").mkdir()
    (base / "src" / "a.c").write_text("")
    (base / "out").symlink_to("/etc")
    (base / "in").symlink_to("/etc/passwd")
    box = Sandbox("sb", "busybox")
    assert expand(["src/*.c", "gen/x.c", "src/*", "src"], base) == ["src/a.c", "gen/x.c", "src"]
    refused = {
        "input ..": ([], ["../x"]),
        "absolute input": ([], ["/etc/passwd"]),
        "input through a link": ([], ["in"]),
        "output through a link": (["out/passwd"], []),
        "output the folder itself": (["."], []),
        "a colon, which -v reads": (["a:b"], []),
        "input inside an output": (["src/"], ["src/a.c"]),
        "a folder as input": ([], ["src"]),
    }
    for why, (outputs, inputs) in refused.items():
        with pytest.raises(Error):
            check_paths(Step("s", box, ["true"], outputs=outputs), inputs, base)
            pytest.fail(why)
    with pytest.raises(Error, match="name"):
        check_paths(Step("../s", box, ["true"]), [], base)
    check_paths(Step("s", box, ["true"], outputs=["build/", "gen/x.c"]), ["src/a.c"], base)


@pytest.mark.integration
def test_the_repositorys_own_dodo_runs_its_step(images, registry, tmp_path: Path):
    shutil.copy(REPO / "dodo.py", tmp_path / "dodo.py")
    shutil.copytree(REPO / "dutils", tmp_path / "dutils", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "D_UTILS_REGISTRY": registry.host}
    done = subprocess.run([BIN / "doit", "step"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "cache" / "module-lines.txt").read_text().splitlines()
    assert any(line.split()[-1] == "dutils/steps.py" for line in lines), lines
