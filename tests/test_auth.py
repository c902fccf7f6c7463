"""Credentials and authentication against real registries: where credentials are found (flags, docker and
containers auth files, credential helpers), and pulls in every auth mode — anonymous and credentialed Bearer tokens
from a token server, HTTP Basic against htpasswd — with wrong credentials refused at once and no secret shown or
written anywhere."""

import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cdn import Cdn, RedirectingFront
from certs import Authority
from cli import assert_one_line_error, d_pull
from images import busybox_image
from realworld import PERSONAL, assert_pulled, htpasswd_config, isolated_env, pull, requests_seen, seed, storage_config
from registry_server import Registry
from tokenserver import SERVICE, TokenServer

from dutils.auth import Credentials, auth_files, find_credentials
from dutils.errors import Error

USER = "alice"
PASSWORD = "pa:ss w0rd-7f3a9c"  # a colon and a space: Basic splits at the first colon only
PUBLIC, PRIVATE = "team/tools/busybox:1.0", "private/busybox:1.0"
SOURCES = ["docker-config", "registry-auth-file", "credential-helper", "creds-store"]
QUICK = 10  # seconds: a refusal costs a few requests, not a round of retries


def basic_token(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# -- where credentials come from (no network)


def write_credential_helper(folder: Path, answers: dict[str, tuple[str, str]]) -> Path:
    """An executable `docker-credential-dtest` in `folder` that answers `get` as docker's helpers do, from
    `answers` (server -> user, secret), and appends each server it is asked about to `folder`/asked."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "docker-credential-dtest"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "server = sys.stdin.read().strip()\n"
        f"with open({str(folder / 'asked')!r}, 'a') as log:\n"
        "    log.write(server + '\\n')\n"
        f"answers = {answers!r}\n"
        "if sys.argv[1:] != ['get'] or server not in answers:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "user, secret = answers[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': user, 'Secret': secret}))\n"
    )
    script.chmod(0o755)
    return folder / "asked"


def write_credentials(home: Path, source: str, registry: str) -> dict[str, str]:
    """Stores USER/PASSWORD for `registry` the way `source` keeps them; returns the environment settings needed."""
    docker_config = home / ".docker" / "config.json"
    docker_config.parent.mkdir(parents=True, exist_ok=True)
    entry = {"auths": {registry: {"auth": basic_token()}}}
    helpers = home / "bin"
    path = f"{helpers}:{os.environ['PATH']}"
    if source == "docker-config":
        docker_config.write_text(json.dumps(entry))
        return {}
    if source == "registry-auth-file":
        (home / "auth.json").write_text(json.dumps(entry))
        return {"REGISTRY_AUTH_FILE": str(home / "auth.json")}
    write_credential_helper(helpers, {registry: (USER, PASSWORD)})
    if source == "credential-helper":
        docker_config.write_text(json.dumps({"credHelpers": {registry: "dtest"}}))
    else:  # creds-store: `docker login` leaves an empty entry in auths and the secret in the store
        docker_config.write_text(json.dumps({"auths": {registry: {}}, "credsStore": "dtest"}))
    return {"PATH": path}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of our own, with none of the machine's credential settings."""
    for name in PERSONAL:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def use(settings: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("source", SOURCES)
def test_credentials_are_found_where_docker_and_podman_keep_them(source, home, monkeypatch):
    use(write_credentials(home, source, "registry.example:5000"), monkeypatch)
    assert find_credentials("registry.example:5000") == Credentials(USER, PASSWORD)
    assert find_credentials("other.example") is None


@pytest.mark.parametrize("key", ["reg.example", "https://reg.example", "http://reg.example", "https://reg.example/v1/"])
def test_auths_keys_in_each_spelling_docker_writes(key, home):
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {key: {"auth": basic_token()}}}))
    assert find_credentials("reg.example") == Credentials(USER, PASSWORD)


def test_docker_hub_credentials_live_under_the_v1_url(home):
    (home / ".docker").mkdir()
    hub = {"https://index.docker.io/v1/": {"username": "hubuser", "password": "hubpass"}}
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": hub}))
    assert find_credentials("docker.io") == Credentials("hubuser", "hubpass")


def test_the_first_auth_file_with_an_entry_wins(home, monkeypatch):
    """containers' auth.json (runtime, then config folder), then docker's config.json; $REGISTRY_AUTH_FILE takes
    the runtime file's place."""
    files = [home / "given.json", home / "run" / "containers" / "auth.json", home / ".docker" / "config.json"]
    for n, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": {"reg.example": {"auth": basic_token(f"user{n}")}}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
    assert find_credentials("reg.example").username == "user1"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(files[0]))
    assert find_credentials("reg.example").username == "user0"
    assert find_credentials("reg.example", "flag-user", "flag-pw") == Credentials("flag-user", "flag-pw")
    files[0].write_text(json.dumps({"auths": {}}))  # no entry in the override: the runtime file is not read
    assert find_credentials("reg.example").username == "user2"


def test_auth_files_are_read_in_the_containers_tools_order(home, monkeypatch):
    """Without $XDG_RUNTIME_DIR the runtime file is /run/containers/UID/auth.json (root: /run/containers/0), as
    podman login writes it; $XDG_CONFIG_HOME and $DOCKER_CONFIG move theirs."""
    docker_default = home / ".docker" / "config.json"
    assert auth_files() == [
        Path(f"/run/containers/{os.getuid()}/auth.json"),
        home / ".config" / "containers" / "auth.json",
        docker_default,
    ]
    use(
        {"REGISTRY_AUTH_FILE": "/given.json", "XDG_RUNTIME_DIR": "/xdg-run", "XDG_CONFIG_HOME": "/xdg-config"},
        monkeypatch,
    )
    use({"DOCKER_CONFIG": "/docker"}, monkeypatch)
    assert auth_files() == [
        Path("/given.json"),  # in place of the runtime file, as the containers tools read it
        Path("/xdg-config/containers/auth.json"),
        Path("/docker/config.json"),
    ]


@pytest.mark.parametrize(
    ("repository", "user"),
    [
        ("team/app", "app-user"),
        ("team/app/sub", "app-user"),
        ("team/other", "team-user"),
        ("team-admin/app", "host-user"),  # whole path components only: reg/team is not a prefix of reg/team-admin
        ("elsewhere", "host-user"),
    ],
)
def test_keys_scoped_to_a_namespace_or_repository_match_most_specific_first(repository, user, home, monkeypatch):
    path = home / "auth.json"
    auths = {f"reg.example:5000/{key}": {"auth": basic_token(name)} for key, name in [("team", "team-user")]}
    auths |= {"reg.example:5000/team/app": {"auth": basic_token("app-user")}}
    auths |= {"reg.example:5000": {"auth": basic_token("host-user")}}
    path.write_text(json.dumps({"auths": auths}))
    use({"REGISTRY_AUTH_FILE": str(path)}, monkeypatch)
    assert find_credentials("reg.example:5000", repository=repository).username == user
    assert find_credentials("reg.example:5000").username == "host-user"  # no repository: the host's key


def test_a_scoped_key_in_an_earlier_file_beats_a_host_key_in_a_later_one(home, monkeypatch):
    """Files are read in order, each for its most specific key, as the containers tools do."""
    (home / ".config" / "containers").mkdir(parents=True)
    (home / ".config" / "containers" / "auth.json").write_text(
        json.dumps({"auths": {"reg.example/team": {"auth": basic_token("scoped")}}})
    )
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {"reg.example": {"auth": basic_token("host")}}}))
    assert find_credentials("reg.example", repository="team/app").username == "scoped"
    assert find_credentials("reg.example", repository="other/app").username == "host"


def test_credential_helpers_are_asked_for_the_registry_and_may_know_nothing(home, monkeypatch):
    asked = write_credential_helper(home / "bin", {"reg.example": (USER, PASSWORD)})
    monkeypatch.setenv("PATH", f"{home / 'bin'}:{os.environ['PATH']}")
    (home / ".docker").mkdir()
    config = {"credHelpers": {"reg.example": "dtest", "other.example": "dtest"}}
    (home / ".docker" / "config.json").write_text(json.dumps(config))
    assert find_credentials("reg.example") == Credentials(USER, PASSWORD)
    assert find_credentials("other.example") is None  # the helper exits 1: an anonymous pull
    assert asked.read_text().splitlines() == ["reg.example", "other.example"]


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"credsStore": "no-such-helper"}, "docker-credential-no-such-helper is not installed"),
        ({"auths": {"reg.example": {"auth": "%%%"}}}, "not base64"),
        ("{not json", "cannot read"),
        ('{"auths": ' + "[" * 100_000, "nested too deeply"),  # deeper than Python's JSON parser goes
    ],
)
def test_broken_credential_settings_are_one_line_errors(config, says, home):
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(Error) as caught:
        find_credentials("reg.example")
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_an_auth_file_that_is_no_small_regular_file_is_one_line_at_once(kind, home):
    path = home / ".docker" / "config.json"
    path.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(path)  # read at once, never waited on
    else:
        with open(path, "wb") as out:
            out.truncate(1 << 30)  # sparse: a gigabyte to read, nothing on the disk
    with pytest.raises(Error, match="cannot read"):
        find_credentials("reg.example")


def test_an_auth_file_in_a_folder_closed_to_the_user_is_none_of_theirs(unprivileged):
    """Once root has run podman, /run/containers is root's alone: the default auth file of every other user lies
    behind it. That is no file of theirs, not an error; a file the user reaches but cannot read still is one."""
    with tempfile.TemporaryDirectory(dir=unprivileged.root) as top:  # a folder the user can reach
        check_closed_and_unreadable_auth_files(unprivileged, Path(top))


def check_closed_and_unreadable_auth_files(unprivileged, tmp_path: Path) -> None:
    closed, docker = tmp_path / "closed", tmp_path / "docker"
    (closed / "containers").mkdir(parents=True)
    (closed / "containers" / "auth.json").write_text("{}")
    closed.chmod(0o700)
    docker.mkdir()
    (docker / "config.json").write_text("{}")
    (docker / "config.json").chmod(0o000)  # root's file, not the user's to read
    tmp_path.chmod(0o755)
    code = "from dutils.auth import find_credentials; print(find_credentials('reg.example'))"
    for docker_config, says in [(tmp_path / "none", "None"), (docker, "cannot read")]:
        env = {"XDG_RUNTIME_DIR": str(closed), "XDG_CONFIG_HOME": str(tmp_path), "DOCKER_CONFIG": str(docker_config)}
        done = unprivileged.run([unprivileged.bin / "python", "-c", code], env=env, capture_output=True, text=True)
        assert says in done.stdout + done.stderr


def test_credentials_never_print_their_password():
    credentials = Credentials(USER, PASSWORD)
    assert PASSWORD not in repr(credentials) and PASSWORD not in str(credentials)


# -- pulls in each auth mode, against real registries


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One push of busybox as a public and a private repository, served by every registry of this module."""
    folder = tmp_path_factory.mktemp("auth-storage")
    seed(folder, {PUBLIC: busybox_image(), PRIVATE: busybox_image()})
    return folder


@pytest.fixture(scope="module")
def tokens():
    with TokenServer(Authority(), users={USER: PASSWORD}, public={PUBLIC.split(":")[0]}) as server:
        yield server


@pytest.fixture(scope="module")
def token_registry(tokens, storage, tmp_path_factory):
    """docker-registry with `auth: token`, trusting the token server's CA."""
    config = tokens.registry_config(tmp_path_factory.mktemp("token-auth")) | storage_config(storage)
    with Registry(config) as registry:
        yield registry


@pytest.fixture(scope="module")
def basic_registry(storage, tmp_path_factory):
    """docker-registry with `auth: htpasswd` (bcrypt, as it requires)."""
    config = htpasswd_config(tmp_path_factory.mktemp("htpasswd"), {USER: PASSWORD}) | storage_config(storage)
    with Registry(config) as registry:
        yield registry


@pytest.fixture
def registries(token_registry, basic_registry) -> dict[str, Registry]:
    return {"token": token_registry, "basic": basic_registry}


def assert_keeps_secrets(done, folder: Path, tokens: TokenServer) -> None:
    """Neither the password, nor its Basic encoding, nor any token issued appears in the output or any file
    under the pull's folder or its cache."""
    secrets = [PASSWORD, basic_token(), *tokens.tokens]
    output = done.stdout + done.stderr
    assert not [s for s in secrets if s in output], output
    cache = folder.with_name(folder.name + "-cache")
    files = [p for top in (folder, cache) if top.exists() for p in top.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], path


@pytest.mark.integration
def test_anonymous_token_flow_like_docker_hub(token_registry, tokens, tmp_path):
    """401 + WWW-Authenticate: Bearer realm/service/scope -> an anonymous token -> the pull; one token serves it all."""
    before = len(tokens.requests)
    done = pull(f"{token_registry.host}/{PUBLIC}", tmp_path / "bb")
    assert_pulled(done, tmp_path / "bb")
    asked = tokens.requests[before:]
    assert [(r.account, r.service, r.status) for r in asked] == [(None, SERVICE, 200)]
    assert asked[0].scopes == ("repository:team/tools/busybox:pull",)
    assert_keeps_secrets(done, tmp_path / "bb", tokens)


@pytest.mark.integration
@pytest.mark.parametrize("answer_key", ["token", "access_token"])
def test_token_with_credentials_read_from_stdin(answer_key, token_registry, tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "answer_key", answer_key)  # Docker's token servers, and OAuth2-style ones
    anonymous = pull(f"{token_registry.host}/{PRIVATE}", tmp_path / "anonymous")
    assert_one_line_error(anonymous, "access denied", "private/busybox")
    before = len(tokens.requests)
    done = pull(f"{token_registry.host}/{PRIVATE}", tmp_path / "bb", "--username", USER, password=PASSWORD)
    assert_pulled(done, tmp_path / "bb")
    assert [(r.account, r.status) for r in tokens.requests[before:]] == [(USER, 200)]
    assert_keeps_secrets(done, tmp_path / "bb", tokens)


@pytest.mark.integration
def test_basic_auth_with_credentials_read_from_stdin(basic_registry, tokens, tmp_path):
    done = pull(
        f"{basic_registry.host}/{PRIVATE}", tmp_path / "bb", "--username", USER, "--password-stdin", password=PASSWORD
    )
    assert_pulled(done, tmp_path / "bb")
    assert_keeps_secrets(done, tmp_path / "bb", tokens)
    assert_one_line_error(
        pull(f"{basic_registry.host}/{PRIVATE}", tmp_path / "anonymous"), "requires a login", "--username"
    )


@pytest.mark.integration
def test_a_token_that_expires_mid_pull_is_renewed_and_the_pull_goes_on(token_registry, tokens, tmp_path):
    with Cdn(busybox_image().blobs()) as cdn, RedirectingFront(token_registry.url, cdn) as front:
        front.expire_authorization()
        before = len(tokens.requests)
        done = pull(f"{front.host}/{PRIVATE}", tmp_path / "bb", "--username", USER, password=PASSWORD)
    assert_pulled(done, tmp_path / "bb")
    assert [(r.account, r.status) for r in tokens.requests[before:]] == [(USER, 200)] * 2
    assert "retrying" not in done.stderr
    assert_keeps_secrets(done, tmp_path / "bb", tokens)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["token", "basic"])
@pytest.mark.parametrize("source", SOURCES)
def test_stored_credentials_are_used(source, kind, registries, tokens, tmp_path):
    registry = registries[kind]
    settings = write_credentials(tmp_path, source, registry.host)
    done = pull(f"{registry.host}/{PRIVATE}", tmp_path / "bb", **settings)
    assert_pulled(done, tmp_path / "bb")
    assert_keeps_secrets(done, tmp_path / "bb", tokens)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["token", "basic"])
@pytest.mark.parametrize(("key", "allowed"), [("private", True), ("private/busybox", True), ("team", False)])
def test_a_key_scoped_to_the_repository_is_used_and_one_for_another_namespace_is_not(
    key, allowed, kind, registries, tokens, tmp_path
):
    """As podman login --authfile writes it for `host/namespace`: in ${XDG_RUNTIME_DIR}/containers/auth.json."""
    registry = registries[kind]
    runtime = tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    (runtime / "containers" / "auth.json").write_text(
        json.dumps({"auths": {f"{registry.host}/{key}": {"auth": basic_token()}}})
    )
    done = pull(f"{registry.host}/{PRIVATE}", tmp_path / "bb", XDG_RUNTIME_DIR=str(runtime))
    if allowed:
        assert_pulled(done, tmp_path / "bb")
    else:
        assert_one_line_error(done, "requires a login" if kind == "basic" else "access denied")
    assert_keeps_secrets(done, tmp_path / "bb", tokens)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["token", "basic"])
def test_wrong_credentials_are_refused_at_once_and_kept_secret(kind, registries, tokens, tmp_path):
    registry = registries[kind]
    token_requests, registry_requests = len(tokens.requests), requests_seen(registry)
    started = time.monotonic()
    wrong = "not-" + PASSWORD
    done = pull(f"{registry.host}/{PRIVATE}", tmp_path / "bb", "--debug", "--username", USER, password=wrong)
    assert time.monotonic() - started < QUICK
    assert_one_line_error(done, "access denied", "check")
    assert "retrying" not in done.stderr and wrong not in done.stdout + done.stderr
    assert_keeps_secrets(done, tmp_path / "bb", tokens)
    # token: /v2/ answers 401, the token server refuses the credentials; basic: /v2/ without, then with them
    assert requests_seen(registry) - registry_requests == {"token": 1, "basic": 2}[kind]
    refused = [(r.account, r.status) for r in tokens.requests[token_requests:]]
    assert refused == ([(USER, 401)] if kind == "token" else [])
    assert not (tmp_path / "bb").exists()


@pytest.mark.integration
def test_the_password_is_never_an_argument(basic_registry, tmp_path):
    """`--password SECRET IMAGE` must be a usage error, not a pull of an image named SECRET."""
    done = d_pull(
        "--username",
        USER,
        "--password",
        "s3cret",
        f"{basic_registry.host}/{PRIVATE}",
        cache=tmp_path / "cache",
        env=isolated_env(tmp_path),
        input="",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr


@pytest.mark.parametrize(
    "name", ["x/../../somewhere/evil", "/bin/sh", "../evil", "-h", "a..b", "ev\x00il", "e\nv", "", 7]
)
def test_a_credential_helper_name_that_is_not_a_program_name_is_refused(name, home):
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps({"credHelpers": {"reg.example": name}}))
    with pytest.raises(Error, match="is not a program name") as caught:
        find_credentials("reg.example")
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)


def test_an_auth_file_that_is_a_symbolic_link_is_followed(home):
    (home / "dotfiles").mkdir()
    entry = {"auths": {"reg.example": {"username": USER, "password": PASSWORD}}}
    (home / "dotfiles" / "docker.json").write_text(json.dumps(entry))
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").symlink_to(home / "dotfiles" / "docker.json")
    assert find_credentials("reg.example") == Credentials(USER, PASSWORD)
