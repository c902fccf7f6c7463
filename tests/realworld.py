"""What test_auth and test_registries share: environments that hide the machine's own credentials and mirrors,
registry storage pushed once and served by as many differently configured registries as a test needs, and a
count of the requests a registry saw."""

from __future__ import annotations

import json
import os
from pathlib import Path

from images import Image, push
from registry import Registry

# Where d-pull looks for credentials and mirrors: a test sets the ones it means, in a home of its own.
PERSONAL = ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "D_UTILS_MIRRORS")


def isolated_env(home: Path, **settings: str | None) -> dict[str, str]:
    """This process's environment with HOME=`home`, none of PERSONAL, and `settings` (None removes a variable)."""
    env = {name: value for name, value in os.environ.items() if name not in PERSONAL} | {"HOME": str(home)}
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def storage_config(storage: Path) -> dict:
    """The part of a registry configuration that serves `storage`."""
    return {"storage": {"filesystem": {"rootdirectory": str(storage)}}}


def seed(storage: Path, images: dict[str, Image]) -> dict[str, str]:
    """Pushes each "repository:tag" -> image into `storage` through a plain registry that is stopped afterwards;
    returns "repository:tag" -> manifest digest."""
    with Registry(storage_config(storage)) as registry:
        return {name: push(registry.host, *name.split(":"), image) for name, image in images.items()}


def requests_seen(registry: Registry) -> int:
    """How many requests the registry logged, answered or refused (each logs its request id)."""
    ids = set()
    for line in registry.settled_log().splitlines():
        if line.startswith("{"):
            ids.add(json.loads(line).get("http.request.id"))
    return len(ids - {None})
