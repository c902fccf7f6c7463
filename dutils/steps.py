"""Build steps: doit's task `step:NAME` runs a command in a sandbox by d-run when its inputs (`file_dep`, which
orders steps too), its sandbox's pinned digest, command or settings changed, or an output (`targets`) is missing;
in a staging folder holding its inputs read-only and nothing else of the host, moved into place on success."""

import glob
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .errors import Error
from .pipeline import LockFile, Sandbox, action  # from folder and dodo_api
from .reference import parse_reference
from .store import read_small, remove_tree

WORK = "/tmp/work"  # on bwrap's fresh /tmp: no mount point made in the sandbox's folder, which steps share


@dataclass
class Step:
    """`command` run by d-run in `sandbox`, in WORK, which holds `inputs` (files or globs relative to the dodo.py,
    read-only) and must come to hold `outputs` (files, or folders when the name ends in '/')."""

    name: str
    sandbox: Sandbox
    command: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    net: bool = False  # the host's network (d-run -n)

    def targets(self) -> list[str]:
        return [os.path.normpath(output) for output in self.outputs]


def step_tasks(steps: list[Step], lock: str | os.PathLike[str] = "sandboxes.lock") -> dict[str, Callable]:
    """What a dodo.py puts in its namespace (`globals().update(...)`) beside `sandbox_tasks`, with the same lock."""
    lockfile, base = LockFile(lock), Path.cwd()  # doit loads a dodo.py in its folder

    def task_step() -> Iterator[dict]:
        """Run each build step whose inputs, image, command or settings changed; clean: remove its outputs."""
        for step in steps:
            yield step_task(step, expand(step.inputs, base), lockfile, base)

    return {"task_step": task_step}


def step_task(step: Step, inputs: list[str], lock: LockFile, base: Path) -> dict:
    try:
        check_paths(step, inputs, base)
        clean = [action(remove_tree, base / name) for name in step.targets()]  # folders too; a link, not followed
        deps = {"file_dep": inputs, "targets": step.targets(), "clean": clean}
    except Error:  # doit must not read what the step may not: its action says why, in one line
        deps = {}
    return deps | {
        "name": step.name,
        "actions": [action(run_step, step, inputs, base)],
        "task_dep": [f"dutils-config:{step.sandbox.folder}"],
        "uptodate": [(unchanged, [step, inputs, lock])],
        "io": {"capture": False},  # the step's output is printed as it ends (see pipeline.task)
    }


def expand(patterns: list[str], base: Path) -> list[str]:
    """Each glob as the files it matches now (not folders); other names as they are: another step may make them."""
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, root_dir=base, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found += [os.path.normpath(match) for match in matches if match == pattern or not (base / match).is_dir()]
    return list(dict.fromkeys(found))


def check_paths(step: Step, inputs: list[str], base: Path) -> None:
    """Refuse, in one line, a step name or path that leads out of the dodo.py folder (by '..', an absolute name or a
    link) or that d-run's -v cannot carry; an input inside an output (which would replace it); a folder as input."""
    if not re.fullmatch(r"\w[\w.-]*", step.name):
        raise Error(f"step {step.name!r}: a step's name is letters, digits, '_', '.' and '-'")
    for name in [*inputs, *step.targets()]:
        path, real = PurePosixPath(name), os.path.realpath(base / name)
        if path.is_absolute() or ".." in path.parts or ":" in name or not real.startswith(f"{base}{os.sep}"):
            raise Error(f"step {step.name}: {name} is not inside {base}", "name files below the dodo.py folder")
    for name in inputs:
        if (base / name).is_dir():
            raise Error(f"step {step.name}: the input {name} is a folder", f"name its files, or a glob: {name}/**")
        if clash := next((out for out in step.targets() if name == out or name.startswith(f"{out}/")), None):
            raise Error(f"step {step.name}: the input {name} is inside its output {clash}")


def unchanged(task: object, values: dict, step: Step, inputs: list[str], lock: LockFile) -> bool:
    """doit's `config_changed` of all but the inputs, taken as doit checks the task: `dutils-update` moves the lock."""
    folder = Path(step.sandbox.folder).absolute()  # complete: the step runs after its sandbox's config task
    try:
        pinned = lock.entry(folder, str(parse_reference(step.sandbox.image)))
        config = read_small(folder / "config.json").decode(errors="replace")  # the user's edits: Env, User...
    except (OSError, Error):  # doit would show a traceback: the step runs, and its action says what is wrong
        return False
    settings = json.dumps([pinned, config, step.command, step.env, step.net, inputs, step.outputs], sort_keys=True)
    now = hashlib.sha256(settings.encode()).hexdigest()
    task.value_savers.append(lambda: {"dutils-step": now})
    return values.get("dutils-step") == now


def run_step(step: Step, inputs: list[str], base: Path) -> None:
    """Run the step in a fresh staging folder; move its outputs into place when it succeeded, and only then."""
    check_paths(step, inputs, base)
    stage = base / f".dutils-step-{step.name}"  # beside the outputs, renamed from there into place
    remove_tree(stage)  # what a killed run left, or a link planted there (removed, never followed)
    for output in step.outputs:  # a folder output is made, a file's folder too (bwrap binds none of them)
        (stage / output if output.endswith("/") else (stage / output).parent).mkdir(parents=True, exist_ok=True)
    stage.mkdir(parents=True, exist_ok=True)
    binds = [f"{stage}:{WORK}", *(f"{base / name}:{WORK}/{name}:ro" for name in inputs)]
    settings = {"command": step.command, "volumes": binds, "env": step.env, "net": step.net, "workdir": WORK}
    try:  # no other host path, network or writable root of the sandbox's settings
        argv = replace(step.sandbox, **settings, rw=False, ports=[]).d_run_argv()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(done.stdout.decode(errors="replace"), end="", flush=True)  # as d-run passes it on
        if done.returncode:
            raise Error(f"step {step.name} failed (exit status {done.returncode})")
        if missing := [name for name in step.targets() if not os.path.lexists(stage / name)]:
            raise Error(f"step {step.name} did not make {', '.join(missing)}")
        for name in step.targets():
            check_staged(step, stage, name)
        for name in step.targets():
            remove_tree(base / name)  # a link is removed, never followed
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, base / name)
    finally:
        remove_tree(stage)


def check_staged(step: Step, stage: Path, name: str) -> None:
    """The container wrote the stage (and has ended: nothing changes it now): an output that is a symbolic link, or
    is reached through one, would move a file of the host's into the dodo.py folder. Refused in one line."""
    path = stage
    for part in PurePosixPath(name).parts:
        path = path / part
        if path.is_symlink():
            raise Error(
                f"step {step.name}: its output {name} leads through the symbolic link {path.relative_to(stage)}"
            )
