"""Image references, parsed without I/O: `alpine` is `docker.io/library/alpine:latest`."""

import contextlib
import os
import re
from collections import namedtuple

from .errors import Error
from .store import check_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
TAG = re.compile(r"[\w][\w.-]{0,127}")
TRANSPORTS = ("oci", "oci-archive", "docker-archive")  # images carried as files, as skopeo names them
HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.?)+(?::[0-9]+)?|\[[0-9a-fA-F:.]+\](?::[0-9]+)?")


class Reference(namedtuple("Reference", "registry repository tag digest", defaults=(None, None))):
    """A fully qualified reference: registry host, repository path, and a tag and/or a digest (str or None). A
    namedtuple, as are oci.Blob and manifest's: dataclasses imports inspect, a third of d-pull --lock's no-op."""

    __slots__ = ()

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def wanted(self) -> str:
        return self.digest or self.tag or "latest"

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"

    @property
    def name(self) -> str:
        """The last path component: the default folder name, as in the original tool."""
        return self.repository.rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        """Whether the registry is on loopback: localhost, 127.0.0.0/8, ::1 in any spelling (IPv4-mapped too)."""
        import ipaddress
        from urllib.parse import urlsplit  # these two: for a registry's URLs, never for d-pull --lock's no-op

        host = urlsplit(f"//{self.registry}").hostname or ""  # lowercase, without brackets or port
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            mapped = getattr(address, "ipv4_mapped", None)
            return address.is_loopback or bool(mapped and mapped.is_loopback)
        return host.rstrip(".") == "localhost"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{tag}{digest}"


def parse_reference(text: str) -> Reference:
    """Parse NAME[:TAG][@DIGEST] the way Docker does, or raise Error saying what is wrong; an image carried as a
    file (`oci:PATH`, `docker-archive:FILE`, a path…) is a Source."""
    if text.startswith(tuple(f"{transport}:" for transport in TRANSPORTS) + ("/", "./", "../")):
        return parse_source(text)
    rest, _, digest = text.partition("@")
    if digest:
        check_digest(digest)
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not HOST.fullmatch(registry):
            raise invalid(text, f"bad registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, rest
    registry = DOCKER_HUB if registry in ("index.docker.io", DOCKER_HUB_API) else registry
    head, slash, last = path.rpartition("/")  # the tag follows the last `:` of the last path component
    name, colon, tag = last.partition(":")
    path = head + slash + name
    if colon and not TAG.fullmatch(tag):
        raise invalid(text, f"bad tag {tag!r}")
    components = path.split("/")
    if not path or not all(COMPONENT.fullmatch(c) for c in components):
        raise invalid(text, "repository names are lowercase letters, digits and separators . _ - /")
    if registry == DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    return Reference(registry, path, tag or (None if digest else "latest"), digest or None)


class Source(namedtuple("Source", [*Reference._fields, "path", "transport"], defaults=(None, None, "", "")), Reference):
    """An image carried as a file, spelled as skopeo spells it: `registry` is TRANSPORT:PATH (PATH alone: a folder or
    a tar told by its contents), `repository` the file's name (the default folder's), `tag` the REF (None: the only
    image in it)."""

    __slots__ = ()

    def __str__(self) -> str:
        return self.registry + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def wanted(self) -> str:
        return self.digest or self.tag or ""


def parse_source(text: str) -> Source:
    """`oci:PATH[:REF]`, `oci-archive:FILE[:REF]`, `docker-archive:FILE[:NAME:TAG|:@N]`, or a path that starts
    with / or . (no image name does)."""
    transport, colon, rest = text.partition(":")
    path, _, ref = rest.partition(":") if colon and transport in TRANSPORTS else (text, "", "")
    transport = transport if transport in TRANSPORTS else ""
    if not path:
        raise Error(f"{text!r} names no file", f"use {transport}:PATH")
    path = os.path.abspath(path)
    name = os.path.basename(path).removesuffix(".tar") or "image"
    return Source(f"{transport}:{path}" if transport else path, name, ref or None, path=path, transport=transport)


def invalid(text: str, why: str) -> Error:
    return Error(f"invalid image reference {text!r}: {why}", "use NAME[:TAG] or NAME@sha256:DIGEST, e.g. alpine:3.20")


def checked_url(url: str, what: str, base: str = "") -> str:
    """`url` (a redirect's, relative to `base`; a token realm's; a foreign layer's), or Error naming `what`: http(s) to a host, no user-info
    (a password there would go out, and into messages), no control characters or spaces (urlsplit drops some)."""
    from urllib.parse import urljoin, urlsplit

    try:
        parts = urlsplit(url := urljoin(base, url))  # a Location may be relative to the URL it answered
        valid = parts.scheme in ("http", "https") and parts.hostname and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number, a bracketed host that is not IPv6
        valid = False
    if not valid or "@" in parts.netloc or not url.isprintable() or " " in url:
        raise Error(f"{what} is not a plain http(s) URL: {shown_url(url)}", "only http(s) to a host name is followed")
    return url


def shown_url(url: str) -> str:
    """`url` for a message: never its user-info (it may hold a password), at most 200 characters."""
    return re.sub(r"^([^/?#]*//)?[^/?#]*@", r"\1", url)[:200]
