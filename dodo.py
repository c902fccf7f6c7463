"""Sandboxes for this repository, declared with d-utils' public API (README, "Sandboxes in your own repository, with doit").

`doit` materialises them pinned by sandboxes.lock, `doit dutils-update=all` moves the lock to what the tags name
now, `doit dutils-run:sandboxes/busybox` runs one, `doit step` runs the build steps whose inputs, image or command
changed (README, "Build steps"). Set D_UTILS_REGISTRY to pull from another registry (a local
mirror, or a test registry on 127.0.0.1).
"""

import os
from pathlib import Path

from dutils.pipeline import Options, Sandbox, sandbox_tasks
from dutils.steps import Step, step_tasks

HERE = Path(__file__).parent
REGISTRY = os.environ.get("D_UTILS_REGISTRY", "docker.io/library")
SANDBOXES = [
    Sandbox("sandboxes/busybox", f"{REGISTRY}/busybox:latest", command=["cat", "/etc/os-release"]),
]
STEPS = [  # each module's length, against the 450-line limit
    Step(
        "module-lines",
        SANDBOXES[0],
        ["sh", "-c", "wc -l dutils/*.py | sort -n > cache/module-lines.txt"],
        inputs=["dutils/*.py"],
        outputs=["cache/module-lines.txt"],
    ),
]
DOIT_CONFIG = {
    "default_tasks": ["dutils"],
    "dep_file": "cache/doit.json",  # the cache/ folder's contents are git-ignored
    "backend": "json",
    "par_type": "thread",  # pipeline tasks are created at run time and hold closures: threads, not processes
    "num_process": 4,
    "verbosity": 0,
}

globals().update(sandbox_tasks(SANDBOXES, Options(cache=HERE / "cache" / "d-utils"), lock=HERE / "sandboxes.lock"))
globals().update(step_tasks(STEPS, lock=HERE / "sandboxes.lock"))
