"""A Docker-style token server for tests: `GET /token?service=…&scope=…`, with Basic credentials or without.

It signs ES256 JWTs with a certificate from a test CA and names that certificate in the token's `x5c` header, so a
docker-registry whose `auth: token` trusts the CA (`rootcertbundle`) accepts them:

    with TokenServer(authority, users={"alice": "pw"}, public={"busybox"}) as tokens:
        with Registry(tokens.registry_config(folder)) as registry: ...

Anonymous requests get `pull` on the `public` repositories only; known users get `pull` on every repository; a
request with wrong credentials is refused with 401, as Docker Hub's server does.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from certs import Authority
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from httpd import Handler, LoopbackServer

SERVICE = "d-utils-test-registry"
ISSUER = "d-utils-test-token-server"
LIFETIME = 300  # seconds


@dataclass(frozen=True)
class TokenRequest:
    """What one request to the token server asked for and got."""

    account: str | None  # the user name of the Basic credentials, None when anonymous
    service: str | None
    scopes: tuple[str, ...]
    status: int


class TokenHandler(Handler):
    def do_GET(self) -> None:
        server: TokenServer = self.owner
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
        account, known = self.credentials(server.users)
        status = 404 if url.path != "/token" else 200 if known else 401
        with server.lock:
            server.requests.append(TokenRequest(account, (query.get("service") or [None])[0], tuple(scopes), status))
        if status != 200:
            self.answer(status, b'{"details":"incorrect username or password"}', {"Content-Type": "application/json"})
            return
        token = server.sign(account, server.grant(account, scopes))
        with server.lock:
            server.tokens.append(token)
        body = json.dumps({server.answer_key: token, "expires_in": LIFETIME}).encode()
        self.answer(200, body, {"Content-Type": "application/json"})

    def credentials(self, users: dict[str, str]) -> tuple[str | None, bool]:
        """(user name, whether the request may go on): anonymous requests may, wrong credentials may not."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None, True
        scheme, _, encoded = header.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        return user, scheme.lower() == "basic" and users.get(user) == password


class TokenServer(LoopbackServer):
    handler = TokenHandler

    def __init__(
        self, authority: Authority, users: dict[str, str] | None = None, public: set[str] = frozenset()
    ) -> None:
        self.authority = authority
        self.signer = authority.issue("d-utils test token signer")
        self.users = users or {}
        self.public = public
        self.requests: list[TokenRequest] = []
        self.tokens: list[str] = []
        self.answer_key = "token"  # "access_token" answers as an OAuth2 server does
        super().__init__()

    def registry_config(self, folder: Path) -> dict:
        """The part of a docker-registry configuration that makes it trust this server's tokens."""
        bundle = folder / "token-ca.crt"
        bundle.write_bytes(self.authority.root.cert_pem)
        realm = f"{self.url}/token"
        return {
            "auth": {"token": {"realm": realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(bundle)}}
        }

    def grant(self, account: str | None, scopes: list[str]) -> list[dict]:
        """The token's `access` claim: pull on what `account` may read, nothing else."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and "pull" in actions.split(",") and (account or name in self.public):
                access.append({"type": "repository", "name": name, "actions": ["pull"]})
        return access

    def sign(self, account: str | None, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.signer.cert_der).decode()]}
        claims = {
            "iss": ISSUER,
            "sub": account or "",
            "aud": SERVICE,
            "exp": now + LIFETIME,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.signer.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"  # JOSE: r || s


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
