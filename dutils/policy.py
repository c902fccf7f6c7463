"""The containers tools' trust policy (containers-policy.json(5)), with containers/image's semantics."""

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .errors import Error
from .reference import Reference, parse_reference
from .store import load_json, read_small_followed

SYSTEM_POLICY = Path("/etc/containers/policy.json")
KNOWN = {"insecureAcceptAnything", "reject", "signedBy", "signedBaseLayer", "sigstoreSigned"}


def load_policy(chosen: str | None) -> tuple[Path, dict] | None:
    """--policy FILE, else ~/.config/containers/policy.json, else /etc/containers/policy.json (none: accept anything)."""
    paths = [Path(chosen)] if chosen else [Path.home() / ".config/containers/policy.json", SYSTEM_POLICY]
    path = next((path for path in paths if chosen or os.path.lexists(path)), None)
    if path is None:
        return None
    try:  # one that does not parse is an error, never "accept anything"
        policy = load_json(read_small_followed(path))  # a dotfile manager's link too
        lists = [policy["default"], *(r for scopes in policy.get("transports", {}).values() for r in scopes.values())]
        if not all(reqs and isinstance(reqs, list) and all(r["type"] in KNOWN for r in reqs) for reqs in lists):
            raise ValueError("every scope needs a list of requirements of known types")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # OSError: missing, a FIFO, too large
        raise Error(f"the policy {path} is not usable ({getattr(err, 'strerror', None) or repr(err)})") from None
    return path, policy


def scopes(ref: Reference) -> list[str]:
    """The `docker` scopes naming `ref`, most specific first (down to the host, its `*.domain`s, then "")."""
    parts, host = f"{ref.registry}/{ref.repository}".split("/"), ref.registry.partition(":")[0].split(".")
    names = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return [str(ref), *names, *("*." + ".".join(host[n:]) for n in range(1, len(host))), ""]


def requirements_for(policy: dict, ref: Reference) -> list[dict]:
    docker = policy.get("transports", {}).get("docker", {})
    return next((docker[scope] for scope in scopes(ref) if scope in docker), policy["default"])


def check_image(chosen: str | None, ref: Reference, digest: str, on_registry: Callable, fetch: Callable) -> str:
    """Enforce the policy on manifest `digest` of `ref`: the keys that verified it ("" when none was asked for)."""
    found, verified = load_policy(chosen), []
    for requirement in requirements_for(found[1], ref) if found else []:
        if (kind := requirement["type"]) == "reject":
            raise Error(f"the policy {found[0]} rejects {ref}", "change the policy if you trust this image")
        if kind in ("signedBy", "signedBaseLayer"):
            raise Error(f"{ref}: the policy {found[0]} asks for {kind} (GPG), which d-pull does not support")
        if kind == "sigstoreSigned":
            from .signature import verify_image  # cryptography loads here only

            accepts = partial(identity_accepted, requirement.get("signedIdentity") or {}, ref)
            verified.append(verify_image(requirement, digest, on_registry, fetch, accepts))
    return ", ".join(verified)


def identity_accepted(rule: dict, intended: Reference, signed: str) -> bool:
    """Whether a signature's identity may stand for `intended`, as in containers/image's policy_reference_match.go."""
    try:
        kind, (name, full) = rule.get("type", "matchRepoDigestOrExact"), identity(signed)
        if kind == "remapIdentity" and (identity(str(intended))[0] + "/").startswith(rule["prefix"] + "/"):
            intended = parse_reference(str(intended).replace(rule["prefix"], rule["signedPrefix"], 1))
        given = {"exactRepository": "dockerRepository", "exactReference": "dockerReference"}.get(kind)
        wanted_name, wanted = identity(rule[given] if given else str(intended))  # the rule's, else the pulled one
        if kind in ("matchRepository", "exactRepository"):  # the only ones to accept cosign's repository-only identity
            return name == wanted_name
        if kind in ("matchExact", "exactReference"):
            return full is not None and full == wanted
        if kind in ("matchRepoDigestOrExact", "remapIdentity"):
            return full is not None and (full == str(intended) if intended.tag else name == wanted_name)
    except (KeyError, TypeError, AttributeError) as err:
        raise Error(f"the policy's signedIdentity {rule!r} is not valid ({err!r})", "see its man page") from None
    except Error:
        return False  # not a Docker reference: never accepted
    raise Error(f"the policy's signedIdentity {rule!r} is not valid (unknown type)", "see its man page")


def identity(text: str) -> tuple[str, str | None]:
    """A Docker reference normalised: its repository, and itself unless it names a repository only (no tag, digest)."""
    ref = parse_reference(text)
    tagged = ":" in text.partition("@")[0].rpartition("/")[2]
    return f"{ref.registry}/{ref.repository}", str(ref) if tagged or ref.digest else None
