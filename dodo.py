"""Sandboxes for this repository, materialised with doit: `doit` pulls them, `doit d-run:DIR` runs one.

A working example of the public API: declare `Pull`s, put their task creators in this module's namespace.
Set D_UTILS_REGISTRY to pull from another registry (a local mirror, or a test registry on 127.0.0.1).
"""

import os
from pathlib import Path

from dutils.pipeline import Options, Pull, sandbox_tasks

REGISTRY = os.environ.get("D_UTILS_REGISTRY", "docker.io/library")
OPTIONS = Options(cache=Path("cache").absolute())  # the repository's own cache; its contents are git-ignored

SANDBOXES = [
    Pull(f"{REGISTRY}/busybox:latest", "sandboxes/busybox", OPTIONS, command=["cat", "/etc/os-release"]),
]

DOIT_CONFIG = {
    "default_tasks": ["config"],
    "dep_file": "cache/doit.json",
    "backend": "json",
    "par_type": "thread",  # pipeline tasks are created at run time and hold closures: threads, not processes
    "num_process": 4,
    "verbosity": 0,
}

globals().update(sandbox_tasks(SANDBOXES))
