"""What test_auth and test_registries share: pulls in environments that hide the machine's own credentials and
mirrors, registry storage pushed once and served by as many differently configured registries as a test needs, and
a count of the requests a registry saw."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bcrypt
from cli import d_pull
from images import Image, push
from registry_server import Registry

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


def pull(image: str, folder: Path, *args: str, password: str | None = None, **env: str | None):
    """d-pull `image` into `folder`, its cache beside it, HOME the folder's parent, no personal settings but `env`;
    `password` goes to standard input."""
    return d_pull(
        *args,
        image,
        str(folder),
        cache=folder.with_name(folder.name + "-cache"),
        env=isolated_env(folder.parent, **env),
        input="" if password is None else password + "\n",
    )


def assert_pulled(done, folder: Path) -> dict:
    """The pull of busybox_image() succeeded with the right files; returns its record."""
    assert done.returncode == 0, done.stderr
    assert (folder / "rootfs" / "bin" / "busybox").is_file()
    assert (folder / "rootfs" / "etc" / "added-by-layer-2").is_file()
    return json.loads((folder / "image.json").read_text())


def storage_config(storage: Path) -> dict:
    """The part of a registry configuration that serves `storage`."""
    return {"storage": {"filesystem": {"rootdirectory": str(storage)}}}


def htpasswd_config(folder: Path, users: dict[str, str]) -> dict:
    """The part of a registry configuration for HTTP Basic auth of `users` (name -> password), bcrypt-hashed as
    docker-registry requires; the file goes into `folder`."""
    hashed = (f"{name}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}" for name, pw in users.items())
    path = folder / "htpasswd"
    path.write_text("".join(line + "\n" for line in hashed))  # 4 rounds, the least bcrypt allows: a fast test
    return {"auth": {"htpasswd": {"realm": "d-utils-tests", "path": str(path)}}}


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
