"""cosign's key-based signatures (the manifest at tag `sha256-<hex>.sig`), checked as containers/image does."""

import base64
import contextlib
import hashlib
from collections.abc import Callable
from functools import partial

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import Error
from .oci import Blob, load_json_object, typed
from .registry import Registry
from .store import check_digest, load_json, read_small, read_small_followed

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"
MAX_PAYLOAD = MAX_KEY = 64 << 10  # real ones are a few hundred bytes


def verify_image(requirement: dict, digest: str, on_registry: Callable, fetch: Callable, accepts: Callable) -> str:
    """The key that verified a signature of the manifest `digest` naming it and an identity `accepts`; else one line."""
    keys, reasons = load_keys(requirement), []
    for payload, signature in on_registry(partial(read_signatures, digest=digest, fetch=fetch)):
        try:
            return check_signature(keys, payload, signature, digest, accepts)
        except Error as err:
            reasons.append(err.message)
    raise Error(f"refused by the policy: {'; '.join(reasons) or 'no signature'}", "nothing was unpacked")


def read_signatures(registry: Registry, digest: str, fetch: Callable) -> list[tuple[bytes, str]]:
    """The (payload, base64 signature) pairs stored for the manifest `digest`; payloads through the blob cache."""
    tag = digest.replace(":", "-") + ".sig"
    try:
        body, _ = registry.get_manifest(tag)
    except Error as err:
        raise Error(f"refused by the policy: no signature of {digest} could be read ({err.message})") from None
    what, found = f"the signature manifest {tag}", []
    for layer in typed(load_json_object(body, what).get("layers"), list, f"{what}: layers")[:64]:  # bounded work
        if typed(layer, dict, f"{what}: layers").get("mediaType") != SIMPLE_SIGNING:
            continue  # another attachment, as containers/image skips it
        size, annotations = typed(layer.get("size"), int, f"{what}: size"), layer.get("annotations") or {}
        if not 0 <= size <= MAX_PAYLOAD:
            raise Error(f"refused by the policy: {what} lists a payload of {size} bytes, more than {MAX_PAYLOAD}")
        blob = Blob(check_digest(layer.get("digest")), size, SIMPLE_SIGNING)
        found.append((read_small(fetch(registry, blob), MAX_PAYLOAD), typed(annotations, dict, what).get(ANNOTATION)))
    return found


def check_signature(keys: list, payload: bytes, signature: object, digest: str, accepts: Callable) -> str:
    """containers/image's order: the signature, then the payload's digest, then its identity."""
    for key in keys:  # (description, public key)
        with contextlib.suppress(InvalidSignature, ValueError, TypeError):  # not base64, or not a string at all
            key[1].verify(base64.b64decode(signature, validate=True), payload, ec.ECDSA(hashes.SHA256()))  # sigstore's
            break
    else:
        raise Error(f"a signature does not verify with {', '.join(source for source, _ in keys)}")
    try:
        c = load_json(payload)["critical"]
        kind, identity, signed = c["type"], c["identity"]["docker-reference"], c["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError) as err:
        raise Error(f"malformed signature payload ({err!r})") from None
    if kind != "cosign container image signature" or signed != digest:
        raise Error(f"a signature names the manifest {signed!r}, not {digest} (type {kind!r})")
    if not isinstance(identity, str) or not accepts(identity):
        raise Error(f"a signature's identity {identity!r} is not accepted by the policy's signedIdentity")
    return key[0]


def load_keys(requirement: dict) -> list[tuple[str, ec.EllipticCurvePublicKey]]:
    """A requirement's keys, each described for image.json with its PEM's SHA-256 (only ECDSA keys, cosign's, verify)."""
    name, *others = [name for name in requirement if name not in ("type", "signedIdentity")] or ["no key"]
    if others or name not in ("keyPath", "keyPaths", "keyData", "keyDatas"):  # Fulcio, PKI, Rekor: not checked here
        raise Error(f"sigstoreSigned with {name} is not supported", "give one of keyPath, keyPaths, keyData, keyDatas")
    keys = []
    try:
        for value in requirement[name] if name.endswith("s") else [requirement[name]]:
            pem = read_small_followed(value, MAX_KEY) if "Path" in name else base64.b64decode(value, validate=True)
            where = f"{name} {value}" if "Path" in name else name  # not a whole keyData
            keys.append((f"{where} (sha256:{hashlib.sha256(pem).hexdigest()})", load_pem_public_key(pem)))
    except (OSError, ValueError, TypeError) as err:  # binascii's and cryptography's errors are ValueErrors
        raise Error(f"the policy's {name} holds no usable public key ({err})") from None
    return keys
