"""Credentials (flags, docker/containers auth files, credential helpers): d-utils' only source of them; no network."""

import base64
import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Error
from .reference import DOCKER_HUB
from .store import load_json, read_small_followed

HELPER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")  # a program name: no path, no option, no control character


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)  # never printed: repr shows the user name only


def find_credentials(
    registry: str, username: str | None = None, password: str | None = None, repository: str = ""
) -> Credentials | None:
    """The credentials given on the command line, else the first auth file's for `repository` on `registry`."""
    if username is not None:
        return Credentials(username, password or "")
    found = (credentials_from_config(read_json_file(path), registry, repository, path) for path in auth_files())
    return next(filter(None, found), None)


def auth_files() -> list[Path]:
    """Where podman/skopeo, then docker keep credentials, in the order the containers tools read them: the
    primary file, which $REGISTRY_AUTH_FILE replaces (containers-auth.json(5)), then the read-only ones."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    primary = f"{runtime}/containers/auth.json" if runtime else f"/run/containers/{os.getuid()}/auth.json"
    return [
        Path(os.environ.get("REGISTRY_AUTH_FILE") or primary),
        config_home() / "containers" / "auth.json",
        Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json",
    ]


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def read_json_file(path: Path) -> dict:
    try:
        config = load_json(read_small_followed(path))  # dotfile managers make these links: follow them
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # a FIFO, a device, a file over the cap; JSON that is not
        if isinstance(err, PermissionError) and not os.access(path.parent, os.X_OK):
            return {}  # in a folder closed to us (/run/containers once root has run podman): none of ours
        raise Error(f"cannot read {path}: {getattr(err, 'strerror', None) or err}", "fix or remove the file") from None
    return config if isinstance(config, dict) else {}


def lookup_keys(host: str, repository: str = "") -> list[str]:
    """The keys under which tools record credentials for a repository, most specific first: `host/team/app`,
    `host/team`, then the host in each spelling docker has written (containers-auth.json(5))."""
    parts = repository.split("/") if repository else []
    scoped = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    if host == DOCKER_HUB:
        return scoped + ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    return scoped + [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]


def credentials_from_config(config: dict, registry: str, repository: str, path: Path) -> Credentials | None:
    """A registry's own credential helper (they know hosts only, as in the containers tools), else its most specific
    non-empty `auths` entry (`docker login` with a store leaves an empty one: "ask the store"), else `credsStore`."""
    hosts = lookup_keys(registry)
    helpers = config.get("credHelpers") or {}
    if key := next((key for key in hosts if key in helpers), None):
        return run_credential_helper(helpers[key], key)
    auths = config.get("auths") or {}
    found = (decode_auth_entry(auths.get(key), path) for key in lookup_keys(registry, repository))
    if credentials := next(filter(None, found), None):
        return credentials
    return run_credential_helper(config["credsStore"], hosts[0]) if config.get("credsStore") else None


def decode_auth_entry(entry: object, path: Path) -> Credentials | None:
    if not isinstance(entry, dict) or not (entry.get("username") or entry.get("auth")):
        return None
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    # validate: b64decode would otherwise drop stray characters and decode garbage to nothing
    with contextlib.suppress(TypeError, ValueError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        username, colon, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        if colon:
            return Credentials(username, password)
    raise Error(f"{path}: an 'auth' entry is not base64 of user:password", "log in again")


def run_credential_helper(helper: str, server: str) -> Credentials | None:
    """Ask `docker-credential-HELPER get`, the protocol docker uses; no answer means an anonymous pull."""
    if not isinstance(helper, str) or not HELPER.fullmatch(helper) or ".." in helper:
        raise Error(f"credential helper {str(helper)[:100]!r} is not a program name", "fix your docker config")
    import subprocess  # here: most pulls (and every no-op without a helper) start no program

    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise Error(f"credential helper {program} is not installed", "install it or edit your docker config") from None
    except subprocess.TimeoutExpired:
        raise Error(f"credential helper {program} did not answer within 60 s") from None
    if done.returncode != 0:
        return None
    try:
        answer = load_json(done.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise Error(f"credential helper {program} gave an answer that is not Username/Secret JSON") from None
    return Credentials(username, secret) if username or secret else None  # some helpers answer "" for none
