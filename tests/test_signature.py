"""cosign signatures under a sigstoreSigned policy: images signed here in cosign's layout (a `.sig` manifest of
simple-signing payloads) are pulled, and every forged, missing or misplaced signature is refused before any blob of the
image's layers is asked for (counted in the registry's log); a real cosign-made signature verifies."""

import base64
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import pytest
from cli import assert_one_line_error, d_pull
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from images import OCI_MANIFEST, Image, Tar, canonical_json, descriptor, push, push_blob, push_manifest, sha256

from dutils.errors import Error
from dutils.policy import identity_accepted
from dutils.reference import parse_reference
from dutils.signature import ANNOTATION, SIMPLE_SIGNING, check_signature, load_keys

DATA = Path(__file__).parent / "data" / "cosign"
COSIGN_DIGEST = "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
COSIGN_REPOSITORY = "192.168.64.2:5000/cosign-signed-single-sample"


# -- signing as cosign does, with cryptography


def new_key(folder: Path, name: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key pair (cosign generate-key-pair's kind), its public half written to folder/name.pub."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (folder / f"{name}.pub").write_bytes(public)
    return key


def sign(
    registry: str, repo: str, digest: str, key: ec.EllipticCurvePrivateKey, identity: str, tag_of: str = "", **damage
) -> None:
    """Push a cosign signature of the manifest `digest` naming `identity`, under the `.sig` tag of `tag_of` (default:
    of `digest` itself); `damage` replaces the payload (`payload`) or fields of its layer descriptor."""
    critical = {"identity": {"docker-reference": identity}, "image": {"docker-manifest-digest": digest}}
    payload = json.dumps({"critical": critical | {"type": "cosign container image signature"}, "optional": None})
    payload = damage.pop("payload", payload.encode())
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    config = b"{}"
    push_blob(registry, repo, payload), push_blob(registry, repo, config)
    layer = descriptor(SIMPLE_SIGNING, payload) | {"annotations": {ANNOTATION: signature}} | damage
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [layer]}
    manifest["config"] = descriptor("application/vnd.oci.image.config.v1+json", config)
    push_manifest(registry, repo, (tag_of or digest).replace(":", "-") + ".sig", canonical_json(manifest))


def unique(path: Path) -> str:
    """A repository name of this test's own."""
    return sha256(str(path).encode())[7:23]


def image(text: str) -> Image:
    return Image(layers=[Tar().file("etc/which", f"{text}\n".encode())])


def write_policy(path: Path, registry: str, requirement: dict) -> Path:
    """Everything rejected but the test registry's `signed` namespace, which needs `requirement`."""
    scopes = {f"{registry}/signed": [requirement], registry: [{"type": "insecureAcceptAnything"}]}
    path.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {"docker": scopes}}))
    return path


def requirement(key: Path, identity: str = "matchRepository") -> dict:
    return {"type": "sigstoreSigned", "keyPath": str(key), "signedIdentity": {"type": identity}}


@pytest.fixture(params=["root", "ordinary user"])
def puller(request, tmp_path):
    """d-pull as root, or as the ordinary user (in a folder of theirs, keys and policy readable by them)."""
    if request.param == "root":
        return tmp_path, lambda *args: d_pull(*args, cache=tmp_path / "cache")
    user = request.getfixturevalue("unprivileged")
    folder = Path(tempfile.mkdtemp(prefix="signed-", dir=user.home))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    if user.as_root:
        entry = pwd.getpwnam("dutest")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder, lambda *args: user.tool("d-pull", "--cache", folder / "cache", *args)


def test_a_signed_image_is_pulled_and_its_key_recorded(registry, puller):
    folder, pull = puller
    key = new_key(folder, "publisher")
    repo = f"signed/app-{unique(folder)}"
    digest = push(registry.host, repo, "v1", image("signed v1"))
    sign(registry.host, repo, digest, key, f"{registry.host}/{repo}")  # cosign's identity: the repository only
    policy = write_policy(folder / "policy.json", registry.host, requirement(folder / "publisher.pub"))
    done = pull("--policy", policy, f"{registry.host}/{repo}:v1", folder / "app")
    assert done.returncode == 0, done.stderr
    assert (folder / "app" / "rootfs" / "etc" / "which").read_text() == "signed v1\n"
    verified_by = json.loads((folder / "app" / "image.json").read_text())["verified_by"]
    assert verified_by.startswith(f"keyPath {folder / 'publisher.pub'} (sha256:"), verified_by
    # another key, the same image: refused before any layer is fetched
    new_key(folder, "other")
    policy = write_policy(folder / "other.json", registry.host, requirement(folder / "other.pub"))
    done = pull("--policy", policy, f"{registry.host}/{repo}:v1", folder / "again")
    assert_one_line_error(done, "refused by the policy", "does not verify with keyPath")
    assert not (folder / "again").exists()


FORGERIES = {
    "another key": ("does not verify",),
    "unsigned": ("no signature of sha256:", "could be read"),
    "a signature moved from another image": ("names the manifest",),
    "an identity of another repository": ("identity", "is not accepted"),
    "cosign's identity under the default signedIdentity": ("identity", "is not accepted"),
    "an oversized payload": ("lists a payload of 1048576 bytes",),
    "a payload that is not JSON": ("malformed signature payload",),
    "a signature that is not base64": ("does not verify",),
}
DAMAGE = {
    "an oversized payload": {"size": 1 << 20},
    "a payload that is not JSON": {"payload": b"{not json"},
    "a signature that is not base64": {"annotations": {ANNOTATION: "not base64!"}},
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_missing_or_misplaced_signature_is_refused_before_any_layer(forgery, registry, tmp_path):
    key, thief = new_key(tmp_path, "publisher"), new_key(tmp_path, "thief")
    repo = f"signed/forged-{unique(tmp_path)}"
    victim = image(f"victim {tmp_path}")
    digest = push(registry.host, repo, "v1", victim)
    identity, kind = f"{registry.host}/{repo}", "matchRepository"
    if forgery == "another key":
        sign(registry.host, repo, digest, thief, identity)
    elif forgery == "a signature moved from another image":
        other = push(registry.host, repo, "other", image(f"other {tmp_path}"))
        sign(registry.host, repo, other, key, identity, tag_of=digest)
    elif forgery == "an identity of another repository":
        sign(registry.host, repo, digest, key, f"{registry.host}/signed/elsewhere")
    elif forgery == "cosign's identity under the default signedIdentity":
        sign(registry.host, repo, digest, key, identity)
        kind = "matchRepoDigestOrExact"
    elif forgery in DAMAGE:
        sign(registry.host, repo, digest, key, identity, **DAMAGE[forgery])
    policy = write_policy(tmp_path / "policy.json", registry.host, requirement(tmp_path / "publisher.pub", kind))
    done = d_pull("--policy", str(policy), f"{registry.host}/{repo}:v1", str(tmp_path / "app"), cache=tmp_path / "c")
    assert_one_line_error(done, "refused by the policy", *FORGERIES[forgery])
    assert not (tmp_path / "app").exists()
    assert all(registry.blob_gets(sha256(layer)) == 0 for layer in victim.layer_blobs)


def test_an_update_refused_by_the_policy_keeps_the_old_image(registry, tmp_path):
    key, repo = new_key(tmp_path, "publisher"), f"signed/update-{unique(tmp_path)}"
    sign(registry.host, repo, push(registry.host, repo, "v1", image("v1")), key, f"{registry.host}/{repo}")
    policy = str(write_policy(tmp_path / "policy.json", registry.host, requirement(tmp_path / "publisher.pub")))
    pull = partial(
        d_pull, "--policy", policy, f"{registry.host}/{repo}:v1", str(tmp_path / "app"), cache=tmp_path / "c"
    )
    assert pull().returncode == 0
    record = (tmp_path / "app" / "image.json").read_bytes()
    push(registry.host, repo, "v1", image("v2, unsigned"))
    assert_one_line_error(pull("--update"), "refused by the policy")
    assert (tmp_path / "app" / "image.json").read_bytes() == record
    assert (tmp_path / "app" / "rootfs" / "etc" / "which").read_text() == "v1\n"


def test_a_locked_pull_checks_the_signature_of_the_digest_it_pins(registry, tmp_path):
    key, repo = new_key(tmp_path, "publisher"), f"signed/locked-{unique(tmp_path)}"
    v1 = push(registry.host, repo, "v1", image("v1"))
    sign(registry.host, repo, v1, key, f"{registry.host}/{repo}")
    policy = str(write_policy(tmp_path / "policy.json", registry.host, requirement(tmp_path / "publisher.pub")))
    lock = str(tmp_path / "sandboxes.lock")
    pull = partial(d_pull, "--policy", policy, "--lock", lock, f"{registry.host}/{repo}:v1", str(tmp_path / "app"))
    assert pull(cache=tmp_path / "c").returncode == 0
    shutil.rmtree(tmp_path / "app")
    v2 = push(registry.host, repo, "v1", image("v2"))  # the tag moves on to a signed v2; the lock still pins v1
    sign(registry.host, repo, v2, key, f"{registry.host}/{repo}")
    sign(registry.host, repo, v2, key, f"{registry.host}/{repo}", tag_of=v1)  # and v1's own signature is gone
    assert_one_line_error(pull(cache=tmp_path / "c"), "refused by the policy", f"names the manifest '{v2}', not {v1}")
    assert not (tmp_path / "app").exists()


# -- a real cosign-made signature (tests/data/cosign/SOURCE.md)


def cosign_signature() -> tuple[bytes, str]:
    stored = json.loads((DATA / "signature-1").read_bytes().removeprefix(b"\0sigstore-json\n"))
    return base64.b64decode(stored["payload"]), stored["annotations"][ANNOTATION]


def test_a_real_cosign_signature_verifies(tmp_path):
    keys = load_keys({"type": "sigstoreSigned", "keyPath": str(DATA / "cosign.pub")})
    assert sha256((DATA / "manifest.json").read_bytes()) == COSIGN_DIGEST
    intended = parse_reference(f"{COSIGN_REPOSITORY}:latest")
    accepts = partial(identity_accepted, {"type": "matchRepository"}, intended)
    assert check_signature(keys, *cosign_signature(), COSIGN_DIGEST, accepts).startswith("keyPath ")
    # the same signature: under the default identity rule (cosign names no tag), for another manifest, tampered with
    default = partial(identity_accepted, {}, intended)
    payload, signature = cosign_signature()
    refusals = [
        (payload, signature, COSIGN_DIGEST, default),
        (payload, signature, "sha256:" + "0" * 64, accepts),
        (payload.replace(b"single", b"double"), signature, COSIGN_DIGEST, accepts),
    ]
    for arguments in refusals:
        with pytest.raises(Error):
            check_signature(keys, *arguments)
    (tmp_path / "cosign.pub").symlink_to(DATA / "cosign.pub")  # a dotfile manager's link: followed
    linked = load_keys({"type": "sigstoreSigned", "keyPath": str(tmp_path / "cosign.pub")})
    assert check_signature(linked, payload, signature, COSIGN_DIGEST, accepts).startswith("keyPath ")
    paths = [str(DATA / "cosign.pub"), str(tmp_path / "cosign.pub")]
    both = load_keys({"type": "sigstoreSigned", "keyPaths": paths})
    assert [source.partition(" (sha256:")[0] for source, _ in both] == [f"keyPaths {path}" for path in paths]
    with_data = {"type": "sigstoreSigned", "keyData": base64.b64encode((DATA / "cosign.pub").read_bytes()).decode()}
    assert check_signature(load_keys(with_data), payload, signature, COSIGN_DIGEST, accepts).startswith("keyData (")


@pytest.mark.integration  # a fresh interpreter importing doit and requests: over a second
def test_only_a_policy_asking_for_a_signature_loads_cryptography(tmp_path):
    (tmp_path / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    code = f"""if True:
        import sys
        import dutils.pipeline, dutils.pull, dutils.run
        from dutils.policy import check_image
        from dutils.reference import parse_reference
        assert check_image({str(tmp_path / "policy.json")!r}, parse_reference("alpine"), None, None, None) == ""
        assert "cryptography" not in sys.modules, "the no-op loaded it"
        """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
