"""What a dodo.py declares: a `Sandbox`, a folder made from an image and the d-run command line that runs it."""

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from .manifest import parse_platform
from .progress import Named

OptionsT = TypeVar("OptionsT")  # the pull's Options (pipeline.py, a later stage)


@dataclass
class Sandbox:
    """`folder` made from `image`, and how `doit dutils-run:FOLDER` runs it: each field is the d-run flag beside it."""

    folder: str
    image: str  # a registry reference, or a file: oci:DIR[:REF], oci-archive:FILE, docker-archive:FILE, ./PATH
    command: list[str] = field(default_factory=list)  # replaces the image's Cmd (empty: the image's own)
    volumes: list[str] = field(default_factory=list)  # -v HOST:CONTAINER[:ro], or CONTAINER (anonymous)
    env: dict[str, str] = field(default_factory=dict)  # -e KEY=VALUE
    net: bool = False  # -n: the host's network
    rw: bool = False  # --rw: a writable root
    user: str | None = None  # -u NAME|UID[:GROUP|GID]
    workdir: str | None = None  # --workdir PATH
    ports: list[str] = field(default_factory=list)  # -p [HOST_IP:]HOST_PORT:CONTAINER_PORT[/udp]
    entrypoint: str | list[str] | None = None  # --entrypoint PROGRAM, or a list: its JSON form, as podman takes it
    hostname: str | None = None  # --hostname NAME
    tmpfs: list[str] = field(default_factory=list)  # --tmpfs PATH[:size=…]
    platform: str | None = None  # OS/ARCH[/VARIANT] to pull (default: the Options', this host's)
    share: bool = False  # d-pull --share: the rootfs hard-linked from the cache's store, applied once for all

    def d_run_argv(self) -> list[str]:
        flags = [word for volume in self.volumes for word in ("-v", volume)]
        flags += [word for key, value in self.env.items() for word in ("-e", f"{key}={value}")]
        flags += ["-n"] * self.net + ["--rw"] * self.rw + ["-u", self.user] * bool(self.user)
        flags += ["--workdir", self.workdir] * bool(self.workdir)
        flags += [word for port in self.ports for word in ("-p", port)]
        flags += [word for mount in self.tmpfs for word in ("--tmpfs", mount)]
        flags += ["--hostname", self.hostname] * bool(self.hostname)
        entrypoint = self.entrypoint if isinstance(self.entrypoint, str | None) else json.dumps(self.entrypoint)
        flags += ["--entrypoint", entrypoint] * (entrypoint is not None)
        return [sys.executable, "-m", "dutils.run", *flags, str(Path(self.folder).absolute()), *self.command]

    def options(self, options: OptionsT) -> OptionsT:
        platform = parse_platform(self.platform) if self.platform else options.platform
        share = self.share or options.share
        return replace(options, platform=platform, share=share, progress=Named(options.progress, self.folder))
