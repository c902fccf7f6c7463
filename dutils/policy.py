"""The containers tools' trust policy (containers-policy.json(5)) with containers/image's semantics, enforced once the
manifest is known and before any layer is fetched; signature.py (cryptography) loads only for sigstoreSigned."""

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .errors import Error
from .manifest import Image
from .reference import Reference, parse_reference
from .store import load_json, read_small

SYSTEM_POLICY = Path("/etc/containers/policy.json")
KNOWN = {"insecureAcceptAnything", "reject", "signedBy", "signedBaseLayer", "sigstoreSigned"}


def load_policy(chosen: str | None) -> tuple[Path, dict] | None:
    """--policy FILE, else ~/.config/containers/policy.json, else /etc/containers/policy.json, checked in shape (one
    that does not parse is an error); None when there is none: accept anything, as the containers tools' default."""
    paths = [Path(chosen)] if chosen else [Path.home() / ".config/containers/policy.json", SYSTEM_POLICY]
    path = next((path for path in paths if chosen or os.path.lexists(path)), None)
    if path is None:
        return None
    try:
        policy = load_json(read_small(path))
        lists = [policy["default"], *(r for scopes in policy.get("transports", {}).values() for r in scopes.values())]
        if not all(reqs and isinstance(reqs, list) and all(r["type"] in KNOWN for r in reqs) for reqs in lists):
            raise ValueError("every scope needs a list of requirements of known types")
    except OSError as err:
        raise Error(f"cannot read the policy {path}: {err.strerror}", "name a regular file with --policy") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise Error(f"the policy {path} is not valid ({err!r})", "see containers-policy.json(5)") from None
    return path, policy


def scopes(ref: Reference) -> list[str]:
    """The `docker` scopes naming `ref`, most specific first: the reference, its repository and each namespace up to
    the host, the host's `*.domain` wildcards, the transport's own default ""."""
    name, found = f"{ref.registry}/{ref.repository}", [str(ref)]
    while "/" in name:
        found.append(name)
        name = name.rpartition("/")[0]
    host = name.partition(":")[0]
    return [*found, name, *(f"*.{host.split('.', n)[-1]}" for n in range(1, host.count(".") + 1)), ""]


def requirements_for(policy: dict, ref: Reference) -> list[dict]:
    docker = policy.get("transports", {}).get("docker", {})
    return next((docker[scope] for scope in scopes(ref) if scope in docker), policy["default"])


def check_image(chosen: str | None, ref: Reference, image: Image, on_registry: Callable, fetch: Callable) -> str:
    """Enforce every requirement of the policy's scope for `ref`; return the keys that verified the image ("" when none
    was asked for). `on_registry(operation)` runs `operation(registry)`, `fetch(registry, blob)` caches a blob."""
    found, verified = load_policy(chosen), []
    for requirement in requirements_for(found[1], ref) if found else []:
        kind = requirement["type"]
        if kind == "reject":
            raise Error(f"the policy {found[0]} rejects {ref}", "change the policy if you trust this image")
        if kind in ("signedBy", "signedBaseLayer"):
            raise Error(f"{ref}: the policy {found[0]} asks for {kind} (GPG), which d-pull does not support")
        if kind == "sigstoreSigned":
            from . import signature  # cryptography loads here only

            read = lambda digest: on_registry(partial(signature.read_signatures, digest=digest, fetch=fetch))  # noqa: E731
            accepts = partial(identity_accepted, requirement.get("signedIdentity") or {}, ref)
            verified.append(signature.verify_image(requirement, ref, image, read, accepts))
    return ", ".join(verified)


def identity_accepted(rule: dict, intended: Reference, signed: str) -> bool:
    """Whether a signature's identity may stand for `intended` (containers/image's policy_reference_match.go): cosign
    writes a repository only, which only matchRepository and exactRepository accept."""
    kind = rule.get("type", "matchRepoDigestOrExact")
    try:
        name, full = identity(signed)
        if kind == "remapIdentity":
            intended = remap(intended, rule["prefix"], rule["signedPrefix"])
        if kind in ("matchRepository", "exactRepository"):
            return name == identity(rule["dockerRepository"] if kind[0] == "e" else str(intended))[0]
        if kind in ("matchExact", "exactReference"):
            return (
                full is not None and full == identity(rule["dockerReference"] if kind[0] == "e" else str(intended))[1]
            )
        if kind in ("matchRepoDigestOrExact", "remapIdentity"):
            return full is not None and (full == str(intended) if intended.tag else name == identity(str(intended))[0])
    except (KeyError, TypeError) as err:
        raise Error(f"signedIdentity {kind} in the policy lacks {err}", "see containers-policy.json(5)") from None
    except Error:
        return False  # not a Docker reference: never accepted
    raise Error(f"unknown signedIdentity type {kind!r} in the policy", "see containers-policy.json(5)")


def identity(text: str) -> tuple[str, str | None]:
    """A Docker reference normalised: its repository, and itself unless it names a repository only (no tag, digest)."""
    ref = parse_reference(text)
    tagged = ":" in text.partition("@")[0].rpartition("/")[2]
    return f"{ref.registry}/{ref.repository}", str(ref) if tagged or ref.digest else None


def remap(intended: Reference, prefix: str, signed_prefix: str) -> Reference:
    """remapIdentity: `intended` with `prefix` (a whole host, namespace or repository) replaced by `signed_prefix`."""
    name = f"{intended.registry}/{intended.repository}"
    if name != prefix and not name.startswith(prefix + "/"):
        return intended
    return parse_reference(str(intended).replace(prefix, signed_prefix, 1))
