"""Build steps: a command run in a sandbox by d-run, only when its inputs, image, command or settings changed.

A step is a doit task (`step:NAME`). Its inputs are doit's `file_dep` (small files: doit's MD5 is fine, and a step
reading another's output runs after it), its outputs `targets`, and the rest (the sandbox's pinned digest, read
when doit checks the task, since `dutils-update` moves it during the run; the command, environment and settings)
one fingerprint compared with the last successful run's. The step runs in a fresh staging folder bound writable
at WORK, its inputs bound read-only on top at their relative paths, nothing else of the host; its outputs are
moved into place only when it succeeded, so a failed step leaves none that doit could take as done.
"""

import contextlib
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .errors import Error
from .pipeline import LockFile, Sandbox, action
from .reference import parse_reference
from .store import read_small, remove_tree

WORK = "/tmp/work"  # on bwrap's fresh /tmp: no mount point made in the sandbox's folder, which steps share
STAGING = ".dutils-steps"  # beside dodo.py: outputs are renamed from there into place
NAME = re.compile(r"\w[\w.-]*")


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


class Unchanged:
    """doit's `config_changed` for a value taken when doit checks the task, not when it loads the dodo.py."""

    KEY = "dutils-step"

    def __init__(self, fingerprint: Callable[[], str]) -> None:
        self.fingerprint = fingerprint

    def configure_task(self, task) -> None:
        task.value_savers.append(lambda: {self.KEY: self.fingerprint()})

    def __call__(self, task, values: dict) -> bool:
        return values.get(self.KEY) == self.fingerprint()


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
        deps = {"file_dep": inputs, "targets": step.targets()}
    except Error:  # doit must not read what the step may not: its action says why, in one line
        deps = {}
    return deps | {
        "name": step.name,
        "actions": [action(run_step, step, inputs, base)],
        "task_dep": [f"dutils-config:{step.sandbox.folder}"],
        "uptodate": [Unchanged(lambda: fingerprint(step, inputs, lock))],
        "clean": [action(remove_outputs, step, inputs, base)],
        "io": {"capture": False},  # the step's output is printed as it ends (see pipeline.task)
    }


def expand(patterns: list[str], base: Path) -> list[str]:
    """Each glob as the files it matches now (folders left out); other names as they are: a step may make them."""
    found = []
    for pattern in patterns:
        if not any(char in pattern for char in "*?["):
            found.append(os.path.normpath(pattern))
            continue
        matches = sorted(glob.glob(pattern, root_dir=base, recursive=True))
        found += [os.path.normpath(match) for match in matches if not (base / match).is_dir()]
    return list(dict.fromkeys(found))


def check_paths(step: Step, inputs: list[str], base: Path) -> None:
    """Refuse, in one line, a step name or path that leads out of the dodo.py folder (by '..', an absolute name or a
    link) or that d-run's -v cannot carry; an input inside an output (which would replace it); a folder as input."""
    if not NAME.fullmatch(step.name):
        raise Error(f"step {step.name!r}: a step's name is letters, digits, '_', '.' and '-'")
    outputs = step.targets()
    for name in [*inputs, *outputs]:
        path, real = PurePosixPath(name), os.path.realpath(base / name)
        if path.is_absolute() or ".." in path.parts or ":" in name or not real.startswith(f"{base}{os.sep}"):
            raise Error(f"step {step.name}: {name} is not inside {base}", "name files below the dodo.py folder")
    for name in inputs:
        if (base / name).is_dir():
            raise Error(f"step {step.name}: the input {name} is a folder", f"name its files, or a glob: {name}/**")
        if clash := next((out for out in outputs if name == out or name.startswith(f"{out}/")), None):
            raise Error(f"step {step.name}: the input {name} is inside its output {clash}")


def fingerprint(step: Step, inputs: list[str], lock: LockFile) -> str:
    """What the step's result depends on besides its inputs' contents."""
    folder = Path(step.sandbox.folder).absolute()
    try:
        config = hashlib.sha256(read_small(folder / "config.json")).hexdigest()  # the user's edits: Env, User...
        pinned = lock.entry(folder, str(parse_reference(step.sandbox.image)))
    except (OSError, Error):  # run it, and let d-run or the action say what is wrong
        config = pinned = None
    settings = [pinned, config, step.command, step.env, step.net, inputs, step.outputs]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def run_step(step: Step, inputs: list[str], base: Path) -> None:
    """Run the step in a fresh staging folder; move its outputs into place when it succeeded, and only then."""
    check_paths(step, inputs, base)
    stage = base / STAGING / step.name
    remove_tree(stage)  # what a killed run left
    for output in step.outputs:  # a folder output is made, a file's folder too (bwrap binds none of them)
        (stage / output if output.endswith("/") else (stage / output).parent).mkdir(parents=True, exist_ok=True)
    stage.mkdir(parents=True, exist_ok=True)
    binds = [f"{stage}:{WORK}", *(f"{base / name}:{WORK}/{name}:ro" for name in inputs)]
    settings = {"command": step.command, "volumes": binds, "env": step.env, "net": step.net, "workdir": WORK}
    try:
        argv = replace(step.sandbox, **settings, rw=False).d_run_argv()  # nothing else of the sandbox's settings
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sys.stdout.write(done.stdout.decode(errors="replace"))
        sys.stdout.flush()
        if done.returncode:
            raise Error(f"step {step.name} failed (exit status {done.returncode})")
        if missing := [name for name in step.targets() if not os.path.lexists(stage / name)]:
            raise Error(f"step {step.name} did not make {', '.join(missing)}")
        for name in step.targets():
            remove_tree(base / name)  # a link is removed, never followed
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, base / name)
    finally:
        remove_tree(stage)
        with contextlib.suppress(OSError):
            stage.parent.rmdir()


def remove_outputs(step: Step, inputs: list[str], base: Path) -> None:
    """`doit clean`: the step's outputs, which may be folders."""
    check_paths(step, inputs, base)
    for name in step.targets():
        remove_tree(base / name)
