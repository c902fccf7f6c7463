"""Images carried as files, for hosts no registry reaches: an OCI image layout (a folder), an OCI archive (the same
as a tar) and a `docker save` tarball, answering the pipeline as a registry does (`get_manifest`, `download_blob`),
so that every blob reaches the cache through fetch.py's verified, resumable writer, and every layer is applied and
checked as a registry's.

An archive is indexed once (member name -> where its data lies) and read in place with pread: nothing is extracted
beside the cache, nothing large held in memory. A docker-archive has no manifest: one is made from its
manifest.json, its layers the uncompressed tars under their diff_ids, so that the config's digest and the diff_ids
are what every byte is checked against."""

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator

from . import oci
from .errors import Error
from .manifest import check_descriptor
from .oci import typed
from .reference import Source, parse_reference
from .registry import MAX_MANIFEST, OCI_MANIFEST
from .store import LISTABLE, is_digest, open_regular
from .tarstream import BLOCK, TarError, TarReader

NAMES = ("org.opencontainers.image.ref.name", "io.containerd.image.name")  # an index.json entry's names
MAX_MEMBERS = 10_000  # of an archive: `docker save` of 500 layers writes about 1,500
MAX_NAME, MAX_NAMES = 4096, 4 << 20  # bytes in a member's name (PATH_MAX) and in all of them: memory bounded
MAX_IMAGES = 1_000  # in index.json or manifest.json: each may be a manifest to make, a config to read
CHUNK = 1 << 20
HINT = "this is not an image a tool wrote; do not use it"


def member_name(name: str, where: str) -> str:
    """`name` in normal form (no `./`, no `//`); refused when it could lead out of the layout or archive."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise Error(f"{where} names {name!r}, which leads out of it", HINT)
    return "/".join(parts)


class Folder:
    """An OCI layout folder: each file opened one folder at a time, never through a link, only if regular."""

    def __init__(self, path: str, where: str) -> None:
        self.fd, self.where = os.open(path, LISTABLE & ~os.O_NOFOLLOW), where  # the user's own path may be a link

    def has(self, name: str) -> bool:
        return os.path.lexists(f"/proc/self/fd/{self.fd}/{name}")

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[tuple[int, int, int]]:
        """The file's descriptor, where its data starts and its size."""
        *folders, last = name.split("/")
        fd = self.fd
        try:
            for folder in folders:
                inner = os.open(folder, LISTABLE, dir_fd=fd)
                if fd != self.fd:
                    os.close(fd)
                fd = inner
            file = open_regular(last, os.O_RDONLY, dir_fd=fd)
        except FileNotFoundError:
            raise Error(f"{self.where} has no {name}", "the layout is incomplete") from None
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL):  # EINVAL: NotRegular
                raise Error(f"cannot read {name} in {self.where}: {err.strerror}") from None
            raise Error(f"{self.where}: {name} is reached through a link or is not a regular file", HINT) from None
        finally:
            if fd != self.fd:
                os.close(fd)
        try:
            yield file, 0, os.fstat(file).st_size
        finally:
            os.close(file)


class Archive:
    """A tar read in place: its members located once, each regular one's data read with pread (thread-safe)."""

    def __init__(self, path: str, where: str) -> None:
        self.fd, self.where = open_regular(os.path.realpath(path), os.O_RDONLY), where
        self.members = index_members(self.fd, where)

    def has(self, name: str) -> bool:
        return name in self.members

    @contextlib.contextmanager
    def opened(self, name: str) -> Iterator[tuple[int, int, int]]:
        if name not in self.members:
            raise Error(f"{self.where} has no member {name}", "the archive is incomplete")
        regular, start, size = self.members[name]
        if not regular:
            raise Error(f"{self.where}: {name} is a link, a folder or a special file, not a file", HINT)
        yield self.fd, start, size


class Positioned:
    """TarReader's stream over a file descriptor, in small reads from a position that skips members' data."""

    def __init__(self, fd: int) -> None:
        self.fd, self.at = fd, 0

    def read(self, size: int) -> bytes:
        data = os.pread(self.fd, min(size, 16 * BLOCK), self.at)
        self.at += len(data)
        return data


def index_members(fd: int, where: str) -> dict[str, tuple[bool, int, int]]:
    """name -> (whether a plain regular file, where its data starts, its size), for every member of the tar."""
    stream, members, names, end = Positioned(fd), {}, 0, os.fstat(fd).st_size
    reader = TarReader(stream)
    try:
        while (entry := reader.next_entry()) is not None:
            ahead, unread = reader.detach_data()
            start = stream.at - ahead
            names += (length := len(os.fsencode(entry.name)))
            if length > MAX_NAME or names > MAX_NAMES:
                raise Error(f"{where} has a name of over {MAX_NAME} bytes, or {MAX_NAMES >> 20} MiB of names", HINT)
            name = member_name(entry.name, where)
            if start + entry.stored > end:
                raise Error(f"{where} ends before the {entry.stored} bytes of {name}", HINT)
            if name in members or len(members) >= MAX_MEMBERS:
                raise Error(f"{where} holds {name} twice, or more than {MAX_MEMBERS} members", HINT)
            members[name] = (entry.isreg() and entry.sparse is None, start, entry.stored)
            stream.at = start + unread  # past the data unread: members are located here, read when needed
    except TarError as err:
        raise Error(f"{where} is not a tar archive ({err})", "an uncompressed tar is read: gunzip it first") from None
    return members


def open_files(path: str, where: str) -> Folder | Archive:
    try:
        kind = os.stat(path).st_mode
        if stat.S_ISDIR(kind):
            return Folder(path, where)
        if stat.S_ISREG(kind):
            return Archive(path, where)
    except OSError as err:
        raise Error(f"cannot read {where}: {err.strerror}") from None
    raise Error(f"{where} is neither a folder nor a file")


class Layout:
    """A Source opened, answering the pipeline as a Registry does."""

    def __init__(self, ref: Source) -> None:
        self.ref, self.where = ref, ref.registry
        self.files = open_files(ref.path, self.where)
        self.blob_names: dict[str, str] = {}  # digest -> member, of a docker-archive's made manifests
        self.configs: dict[str, tuple[bytes, list]] = {}  # a docker-archive's config member -> it and its diff_ids
        self.docker = ref.transport == "docker-archive" or not (ref.transport or self.files.has("index.json"))
        if self.docker and not (ref.transport or self.files.has("manifest.json")):
            raise Error(f"{self.where} is neither an OCI layout nor a docker-archive (no index.json, no manifest.json)")
        self.images = self.docker_images() if self.docker else self.oci_images()
        if len(self.images) > MAX_IMAGES:
            raise Error(f"{self.where} holds {len(self.images)} images, more than {MAX_IMAGES}", HINT)

    # -- what the pipeline asks

    def get_manifest(self, wanted: str) -> tuple[bytes, str]:
        """The manifest a REF, `@N` or digest names ("": the only image); fetch_manifest verifies and parses it."""
        if is_digest(wanted):  # a lock file's pin, or an entry of an index
            if not self.docker:
                return self.blob(wanted, MAX_MANIFEST), ""
            for body in map(self.docker_manifest, self.entries()):  # made one at a time: the first that matches
                if "sha256:" + hashlib.sha256(body).hexdigest() == wanted:
                    return body, OCI_MANIFEST
            raise Error(f"{self.where} holds no image {wanted}", "pull it without the lock file's pin, with --update")
        entry = self.choose(wanted)
        if self.docker:
            return self.docker_manifest(entry), OCI_MANIFEST
        body = self.blob(entry["digest"], MAX_MANIFEST)
        if len(body) != entry["size"]:
            raise Error(f"{self.where}: manifest {entry['digest']} is not of the {entry['size']} bytes index.json says")
        return body, entry.get("mediaType", "")

    def download_blob(self, digest: str, sink, url: str | None = None) -> None:
        """Into `sink` (a PartialBlob, which checks size and digest) from its `have` bytes on."""
        name = self.blob_names.get(digest, digest) if self.docker else blob_name(digest)
        with self.files.opened(name) as (fd, start, size):
            while sink.missing and sink.have < size:
                if not (chunk := os.pread(fd, min(CHUNK, size - sink.have), start + sink.have)):  # cut since opened
                    raise Error(f"{self.where}: {name} ends before its {size} bytes", HINT)
                sink.write(chunk)
        if sink.missing:
            raise Error(f"{self.where}: blob {digest} is shorter than its manifest says", HINT)

    # -- reading

    def read(self, name: str, cap: int) -> bytes:
        with self.files.opened(name) as (fd, start, size):
            if size > cap:
                raise Error(f"{self.where}: {name} has {size} bytes, more than {cap}", HINT)
            return os.pread(fd, size, start)

    def blob(self, digest: str, cap: int) -> bytes:
        data = self.read(blob_name(digest), cap)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise Error(f"{self.where}: blob {digest} does not match its digest", HINT)
        return data

    def read_json(self, name: str, kind: type) -> object:
        # in an object, so that a list (docker's manifest.json) is bounded as load_json_object bounds objects
        wrapped = oci.load_json_object(b'{"json":%s}' % self.read(name, MAX_MANIFEST), f"{self.where}: {name}")
        return typed(wrapped["json"], kind, f"{self.where}: {name}")

    # -- the images it holds, each with its names

    def oci_images(self) -> list[tuple[list[str], dict]]:
        where = f"{self.where}: index.json: manifests"
        entries = typed(self.read_json("index.json", dict).get("manifests"), list, where)
        described = [check_descriptor(entry, f"{where}[{n}]") for n, entry in enumerate(entries)]
        return [(names_of(entry, where), entry) for entry in described]

    def docker_images(self) -> list[tuple[list[str], dict]]:
        where = f"{self.where}: manifest.json"
        images = [typed(entry, dict, f"{where}[{n}]") for n, entry in enumerate(self.read_json("manifest.json", list))]
        tags = [typed(image.get("RepoTags") or [], list, f"{where}: RepoTags") for image in images]
        return [([str(tag) for tag in names], image) for names, image in zip(tags, images, strict=True)]

    def entries(self) -> list[dict]:
        return [entry for _, entry in self.images]

    def choose(self, wanted: str) -> dict:
        """The image `wanted` names: a name it is given, `@N` (the n-th), or "" when it holds one only."""
        if wanted[:1] == "@" and wanted[1:].isdigit() and int(wanted[1:]) < len(self.images):
            return self.images[int(wanted[1:])][1]
        found = [entry for names, entry in self.images if any(same_image(wanted, name) for name in names)]
        if found or (not wanted and len(self.images) == 1):
            return (found or self.entries())[0]
        offered = [names[0] if names else f"@{n}" for n, (names, _) in enumerate(self.images)]
        what = f"no image {wanted}" if wanted else f"{len(self.images)} images"
        listing = ", ".join(offered[:20]) + (", …" if len(offered) > 20 else "")
        raise Error(f"{self.where} holds {what}: {listing or 'none'}", f"name one: {self.ref.registry}:NAME")

    def docker_manifest(self, image: dict) -> bytes:
        """An OCI manifest for a docker-archive's image: its config, and its layer tars under their diff_ids."""
        where = f"{self.where}: manifest.json"
        config_name = member_name(typed(image.get("Config"), str, f"{where}: Config"), where)
        layers = [member_name(typed(name, str, where), where) for name in typed(image.get("Layers"), list, where)]
        if config_name not in self.configs:  # read and parsed once, however many images share it
            config = self.read(config_name, oci.MAX_CONFIG)
            rootfs = typed(oci.load_json_object(config, f"{where}: {config_name}").get("rootfs"), dict, config_name)
            self.configs[config_name] = config, typed(rootfs.get("diff_ids"), list, f"{config_name}: rootfs.diff_ids")
        config, ids = self.configs[config_name]
        if len(ids) != len(layers):
            raise Error(f"{where} lists {len(layers)} layers and their config {len(ids)} diff_ids", HINT)
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        descriptors = []
        for diff_id, name in zip(ids, layers, strict=True):
            with self.files.opened(name) as (_, _, size):
                descriptors.append({"mediaType": oci.OCI, "digest": diff_id, "size": size})
            self.blob_names[str(diff_id)] = name
        self.blob_names[digest] = config_name
        config_descriptor = {"mediaType": oci.IMAGE_CONFIGS[1], "digest": digest, "size": len(config)}
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor, "layers": descriptors}
        return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def names_of(entry: dict, where: str) -> list[str]:
    annotations = typed(entry.get("annotations") or {}, dict, f"{where}: annotations")
    return [annotations[key] for key in NAMES if isinstance(annotations.get(key), str)]


def same_image(wanted: str, name: str) -> bool:
    """Whether REF `wanted` names the image called `name`: as written (skopeo's tag) or as a reference (podman's and
    Docker's full names, `alpine:latest` for docker.io/library/alpine:latest)."""
    if wanted == name:
        return True
    with contextlib.suppress(Error):
        return bool(wanted) and parse_reference(wanted) == parse_reference(name)
    return False
