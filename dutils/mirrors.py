"""Pull-through mirrors (a `docker-registry` in proxy mode, shared by a fleet): which ones, and asking each in turn
before the image's own registry, as containerd tries the hosts of its hosts.toml, each mirror and then the origin."""

import os
from collections.abc import Callable

from .auth import config_home, read_json_file
from .errors import Error
from .reference import HOST, Reference
from .registry import Registry, RetryPolicy, T

MIRROR_RETRY = RetryPolicy(attempts=2)  # a failing mirror costs little: the origin is there


def find_mirrors(registry: str, given: list[str]) -> list[str]:
    """Pull-through mirrors to try, in order, before `registry` itself: the --mirror flags, else $D_UTILS_MIRRORS
    ("docker.io=host:port,ghcr.io=host2"), else ~/.config/d-utils/mirrors.json ({"docker.io": ["host:port"]})."""
    if given:
        return [mirror_host(mirror) for mirror in given]
    if setting := os.environ.get("D_UTILS_MIRRORS"):
        pairs = (item.partition("=") for item in setting.split(","))
        return [mirror_host(mirror) for name, _, mirror in pairs if name.strip() == registry and mirror.strip()]
    mirrors = read_json_file(config_home() / "d-utils" / "mirrors.json").get(registry, [])
    return [mirror_host(m) for m in mirrors if isinstance(m, str)] if isinstance(mirrors, list) else []


def mirror_host(mirror: str) -> str:
    """HOST[:PORT] of a mirror as the user wrote it (a URL's scheme and slash dropped), or Error."""
    host = mirror.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    if not HOST.fullmatch(host):
        raise Error(f"mirror {mirror[:100]!r} is not a HOST[:PORT]", "fix --mirror, $D_UTILS_MIRRORS or mirrors.json")
    return host


def connect_mirrored(
    ref: Reference, given: list[str], connect: Callable[[Reference, RetryPolicy], Registry], note: Callable[[str], None]
) -> list[Registry]:
    """The mirrors that answer, in order, then the origin (asked now only when no mirror answers: fail early then)."""
    usable = []
    for host in find_mirrors(ref.registry, given):
        # the same repository on a pull-through mirror (which stores Docker Hub's under library/ too)
        mirror = connect(ref._replace(registry=host), MIRROR_RETRY)
        try:
            mirror.ping()
        except Error as err:
            note(f"not using mirror {host}: {err}")
        else:
            usable.append(mirror)
    origin = connect(ref, RetryPolicy())
    if not usable:
        origin.ping()
    return [*usable, origin]


def from_first_answering(
    registries: list[Registry], operation: Callable[[Registry], T], note: Callable[[str], None]
) -> T:
    """`operation` on each mirror in turn, on the image's own registry (the last) when every mirror failed."""
    *mirrors, origin = registries
    for mirror in mirrors:
        try:
            return operation(mirror)
        except Error as err:
            note(f"mirror {mirror.ref.registry}: {err}; asking {origin.ref.registry}")
    return operation(origin)
