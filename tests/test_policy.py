"""containers-policy.json(5) without a registry: where the policy is found, which scope's requirements apply, which
signed identities are accepted (containers/image's policy_reference_match.go), and what is refused in one line."""

import json
import os
from pathlib import Path

import pytest

from dutils import policy
from dutils.errors import Error
from dutils.policy import check_image, identity_accepted, load_policy, requirements_for, scopes
from dutils.reference import parse_reference

ACCEPT, REJECT = [{"type": "insecureAcceptAnything"}], [{"type": "reject"}]


def signed(name: str) -> list[dict]:
    return [{"type": "sigstoreSigned", "keyPath": f"/keys/{name}.pub"}]


POLICY = {
    "default": REJECT,
    "transports": {
        "docker": {
            "registry.one.example": signed("one"),
            "registry.one.example/team/app": signed("app"),
            "registry.one.example/team/app:debug": ACCEPT,
            "registry.two.example:5000/team": signed("two-team"),
            "registry.two.example:5000/team/tool": signed("tool"),
            "*.three.example": signed("three"),
        },
        "docker-daemon": {"": ACCEPT},
    },
}


@pytest.mark.parametrize(
    "image, chosen",
    [
        ("registry.one.example/team/app:1.0", signed("app")),  # the repository's own entry
        ("registry.one.example/team/app:debug", ACCEPT),  # the reference's, more specific still
        ("registry.one.example/team/other", signed("one")),  # the other repository: its registry's
        ("registry.two.example:5000/team/tool@sha256:" + "a" * 64, signed("tool")),
        ("registry.two.example:5000/team/other", signed("two-team")),  # the namespace's
        ("registry.two.example:5000/else", REJECT),  # no scope of its own: the default
        ("mirror.three.example/x", signed("three")),  # a wildcard of the host
        ("alpine", REJECT),  # docker.io/library/alpine:latest
    ],
)
def test_the_most_specific_scope_chooses_the_requirements(image, chosen):
    assert requirements_for(POLICY, parse_reference(image)) == chosen


def test_scopes_run_from_the_reference_to_the_host_and_its_domains():
    assert scopes(parse_reference("a.b.example:5000/ns/repo:v1")) == [
        "a.b.example:5000/ns/repo:v1",
        "a.b.example:5000/ns/repo",
        "a.b.example:5000/ns",
        "a.b.example:5000",
        "*.b.example",
        "*.example",
        "",
    ]


def test_the_docker_transport_default_comes_before_the_global_default():
    docker = {"default": REJECT, "transports": {"docker": {"": ACCEPT}}}
    assert requirements_for(docker, parse_reference("quay.io/x/y")) == ACCEPT


INTENDED = parse_reference("registry.example/team/app:v1")
BY_DIGEST = parse_reference("registry.example/team/app@sha256:" + "b" * 64)
IDENTITIES = [  # signedIdentity, what is pulled, the signature's identity, accepted
    ({}, INTENDED, "registry.example/team/app:v1", True),
    ({}, INTENDED, "registry.example/team/app", False),  # cosign's repository-only identity
    ({}, INTENDED, "registry.example/team/app:v2", False),
    ({}, BY_DIGEST, "registry.example/team/app:anything", True),
    ({}, BY_DIGEST, "registry.example/team/app", False),
    ({"type": "matchExact"}, INTENDED, "registry.example/team/app:v1", True),
    ({"type": "matchExact"}, BY_DIGEST, "registry.example/team/app:v1", False),
    ({"type": "matchRepository"}, INTENDED, "registry.example/team/app", True),
    ({"type": "matchRepository"}, INTENDED, "registry.example/team/other", False),
    ({"type": "matchRepository"}, INTENDED, "not a reference", False),
    ({"type": "exactRepository", "dockerRepository": "origin.example/app"}, INTENDED, "origin.example/app", True),
    (
        {"type": "exactRepository", "dockerRepository": "origin.example/app"},
        INTENDED,
        "registry.example/team/app",
        False,
    ),
    ({"type": "exactReference", "dockerReference": "origin.example/app:1"}, INTENDED, "origin.example/app:1", True),
    ({"type": "exactReference", "dockerReference": "origin.example/app:1"}, INTENDED, "origin.example/app", False),
    (
        {"type": "remapIdentity", "prefix": "registry.example", "signedPrefix": "origin.example"},
        INTENDED,
        "origin.example/team/app:v1",
        True,
    ),  # fmt: skip
    (
        {"type": "remapIdentity", "prefix": "registry.example/te", "signedPrefix": "origin.example"},
        INTENDED,
        "origin.example/am/app:v1",
        False,
    ),  # a prefix is whole components  # fmt: skip
]


@pytest.mark.parametrize("rule, intended, identity, accepted", IDENTITIES)
def test_signed_identities_are_matched_as_containers_image_does(rule, intended, identity, accepted):
    assert identity_accepted(rule, intended, identity) is accepted


@pytest.mark.parametrize("rule", [{"type": "exactRepository"}, {"type": "matchSomething"}, "matchRepository"])
def test_a_broken_signed_identity_is_an_error(rule):
    with pytest.raises(Error, match="signedIdentity"):
        identity_accepted(rule, INTENDED, "registry.example/team/app:v1")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"transports": {}}',  # no default
        '{"default": []}',
        '{"default": [{"type": "trustMe"}]}',
        '{"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {"x.example": {}}}}',
    ],
)
def test_a_policy_that_does_not_parse_is_an_error_never_accept_anything(text, tmp_path):
    (tmp_path / "policy.json").write_text(text)
    with pytest.raises(Error, match="is not usable"):
        load_policy(str(tmp_path / "policy.json"))


def test_the_policy_is_found_where_the_containers_tools_look(tmp_path, monkeypatch):
    home, system = tmp_path / "home", tmp_path / "etc" / "policy.json"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(policy, "SYSTEM_POLICY", system)
    assert load_policy(None) is None  # none anywhere: accept anything
    system.parent.mkdir()
    system.write_text(json.dumps({"default": REJECT}))
    assert load_policy(None) == (system, {"default": REJECT})
    user = home / ".config" / "containers" / "policy.json"
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps({"default": ACCEPT}))
    assert load_policy(None) == (user, {"default": ACCEPT})
    with pytest.raises(Error, match="is not usable"):
        load_policy(str(tmp_path / "missing.json"))  # --policy names a file that must exist
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Error, match="is not usable"):
        load_policy(str(tmp_path / "fifo"))  # read only as a regular file, never waited on
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    with pytest.raises(Error, match="is not usable"):
        load_policy(str(tmp_path / "link"))  # nor through a link


def test_the_users_policy_may_be_a_link_as_dotfile_managers_make(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    user, kept = tmp_path / "home" / ".config" / "containers" / "policy.json", tmp_path / "dotfiles" / "policy.json"
    kept.parent.mkdir()
    kept.write_text(json.dumps({"default": REJECT}))
    user.parent.mkdir(parents=True)
    user.symlink_to(kept)
    assert load_policy(None) == (user, {"default": REJECT})
    assert load_policy(str(user)) == (user, {"default": REJECT})


def write(tmp_path: Path, requirements: list[dict]) -> str:
    (tmp_path / "policy.json").write_text(json.dumps({"default": requirements}))
    return str(tmp_path / "policy.json")


@pytest.mark.parametrize(
    "requirements, words",
    [
        (REJECT, "rejects docker.io/library/alpine:latest"),
        ([{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k.gpg"}], "signedBy (GPG), which d-pull does not"),
        ([*ACCEPT, *REJECT], "rejects"),  # every requirement must be met
    ],
)
def test_rejecting_and_unsupported_requirements_are_one_line_refusals(requirements, words, tmp_path):
    with pytest.raises(Error, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_image(write(tmp_path, requirements), parse_reference("alpine"), None, None, None)


@pytest.mark.parametrize(
    "requirement, words",
    [
        ({"keyPath": "/nonexistent.pub"}, "keyPath holds no usable public key .* '/nonexistent.pub'"),
        ({"keyData": "bm90IGEga2V5"}, "holds no usable public key"),
        ({"keyPath": "/k.pub", "keyData": "eA=="}, "is not supported"),
        ({"fulcio": {}, "rekorPublicKeyPath": "/r.pub"}, "is not supported"),
        ({}, "no key is not supported"),
    ],
)
def test_a_sigstore_requirement_d_pull_cannot_check_is_refused(requirement, words, tmp_path):
    path = write(tmp_path, [{"type": "sigstoreSigned", **requirement}])
    with pytest.raises(Error, match=words):
        check_image(path, parse_reference("alpine"), None, None, None)


@pytest.mark.parametrize("text", [None, "{not json"])
def test_a_missing_or_broken_policy_is_said_before_any_registry_is_asked(text, tmp_path, capsys):
    """Port 1 of loopback answers nobody: had d-pull asked it first, the error would be about the connection."""
    from dutils.pull import main

    if text is not None:
        (tmp_path / "policy.json").write_text(text)
    argv = ["--policy", str(tmp_path / "policy.json"), "--timeout", "1", "127.0.0.1:1/img", str(tmp_path / "box")]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert f"the policy {tmp_path / 'policy.json'} is not usable" in error and "127.0.0.1:1" not in error
