"""cosign's key-based signatures as containers/image checks a sigstoreSigned requirement: a manifest at the tag
`sha256-<hex>.sig` whose layers are simple-signing payloads, each signed in its annotation. Loads cryptography."""

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .config import load_json_object, typed
from .errors import Error
from .manifest import Blob, Image
from .reference import Reference
from .registry import Registry
from .store import check_digest, load_json, read_small

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"
MAX_PAYLOAD = MAX_KEY = 64 << 10  # real ones are a few hundred bytes
MAX_SIGNATURES = 64


def read_signatures(
    registry: Registry, digest: str, fetch: Callable[[Registry, Blob], Path]
) -> list[tuple[bytes, str]]:
    """The (payload, base64 signature) pairs stored for the manifest `digest`; payloads through the blob cache."""
    tag = digest.replace(":", "-") + ".sig"
    try:
        body, _ = registry.get_manifest(tag)
    except Error as err:
        raise Error(f"refused by the policy: no signature of {digest} could be read ({err.message})") from None
    what = f"the signature manifest {tag}"
    layers = typed(load_json_object(body, what).get("layers"), list, f"{what}: layers")
    if len(layers) > MAX_SIGNATURES:
        raise Error(f"{what} has {len(layers)} layers, more than {MAX_SIGNATURES}")
    found = []
    for layer in layers:
        if typed(layer, dict, f"{what}: layers").get("mediaType") != SIMPLE_SIGNING:
            continue  # another attachment, as containers/image skips it
        size = typed(layer.get("size"), int, f"{what}: size")
        if not 0 <= size <= MAX_PAYLOAD:
            raise Error(f"{what} lists a payload of {size} bytes, more than {MAX_PAYLOAD}")
        signature = typed(
            typed(layer.get("annotations"), dict, f"{what}: annotations").get(ANNOTATION), str, ANNOTATION
        )
        blob = Blob(check_digest(layer.get("digest")), size, SIMPLE_SIGNING)
        found.append((read_small(fetch(registry, blob), MAX_PAYLOAD), signature))  # verified by size and digest
    return found


def verify_image(requirement: dict, ref: Reference, image: Image, read: Callable, accepts: Callable) -> str:
    """The key that verified a signature of the image's manifest naming it and an identity `accepts`, else one line."""
    keys, reasons = load_keys(requirement), []
    for payload, signature in read(image.digest):
        try:
            return check_signature(keys, payload, signature, image.digest, accepts)
        except Error as err:
            reasons.append(err.message)
    raise Error(f"{ref}: refused by the policy: {'; '.join(reasons) or 'no signature'}", "nothing was unpacked")


def check_signature(keys: list, payload: bytes, signature: str, digest: str, accepts: Callable[[str], bool]) -> str:
    """containers/image's order: the signature, then the payload's digest, then its identity."""
    key = next((key for key in keys if verifies(key[1], signature, payload)), None)
    if key is None:
        raise Error(f"a signature does not verify with {', '.join(source for source, _ in keys)}")
    try:
        critical, _ = fields(load_json(payload), "critical", "optional")
        kind, image, identity = fields(critical, "type", "image", "identity")
        (signed,), (reference,) = fields(image, "docker-manifest-digest"), fields(identity, "docker-reference")
        if kind != "cosign container image signature":
            raise ValueError(f"type {kind!r}")
    except ValueError as err:
        raise Error(f"malformed signature payload ({err})") from None
    if signed != digest:
        raise Error(f"a signature names the manifest {signed!r}, not {digest}")
    if not isinstance(reference, str) or not accepts(reference):
        raise Error(f"a signature's identity {reference!r} is not accepted by the policy's signedIdentity")
    return key[0]


def fields(value: object, *names: str) -> list:
    if not isinstance(value, dict) or set(value) != set(names):
        raise ValueError(f"expected exactly the fields {', '.join(names)}")
    return [value[name] for name in names]


def verifies(key: ec.EllipticCurvePublicKey, signature: str, payload: bytes) -> bool:
    """sigstore's ECDSA verifier, with its fixed SHA-256."""
    try:
        key.verify(base64.b64decode(signature, validate=True), payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):  # not base64 either
        return False
    return True


def load_keys(requirement: dict) -> list[tuple[str, ec.EllipticCurvePublicKey]]:
    """The ECDSA keys (cosign's) of a sigstoreSigned requirement, each described for image.json by the SHA-256 of its
    DER form; Fulcio, PKI and Rekor are refused: d-pull does not check them."""
    name, *others = [name for name in requirement if name not in ("type", "signedIdentity")] or ["no key"]
    if others or name not in ("keyPath", "keyPaths", "keyData", "keyDatas"):
        raise Error(f"sigstoreSigned with {name} is not supported", "give one of keyPath, keyPaths, keyData, keyDatas")
    try:
        values = requirement[name] if name.endswith("s") else [requirement[name]]
        pems = [read_small(v, MAX_KEY) if "Path" in name else base64.b64decode(v, validate=True) for v in values]
        keys = [serialization.load_pem_public_key(pem) for pem in pems]
    except OSError as err:
        raise Error(f"cannot read the key {err.filename}: {err.strerror}", "the policy names it") from None
    except (ValueError, TypeError) as err:  # binascii's and cryptography's errors are ValueErrors
        raise Error(f"the policy's {name} holds no usable public key ({err})") from None
    if not keys or not all(isinstance(key, ec.EllipticCurvePublicKey) for key in keys):
        raise Error(f"the policy's {name} holds no ECDSA public key (what cosign generate-key-pair makes)")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    where = [f"{name} {value}" if "Path" in name else name for value in values]  # not a whole keyData
    return [(f"{w} (sha256:{hashlib.sha256(k.public_bytes(*spki)).hexdigest()})", k) for w, k in zip(where, keys)]  # noqa: B905
