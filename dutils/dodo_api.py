"""What a dodo.py declares: a `Sandbox`, a folder made from an image and the d-run command line that runs it."""

import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sandbox:
    """`folder` made from `image`, and how `doit dutils-run:FOLDER` runs it: each field is the d-run flag beside it."""

    folder: str
    image: str
    command: list[str] = field(default_factory=list)  # replaces the image's Cmd (empty: the image's own)
    volumes: list[str] = field(default_factory=list)  # -v HOST:CONTAINER[:ro], or CONTAINER (anonymous)
    env: dict[str, str] = field(default_factory=dict)  # -e KEY=VALUE
    net: bool = False  # -n: the host's network
    rw: bool = False  # -w: a writable root
    user: str | None = None  # -u NAME|UID[:GROUP|GID]
    workdir: str | None = None  # --workdir PATH

    def d_run_argv(self) -> list[str]:
        """The d-run command line of these settings."""
        flags = [word for volume in self.volumes for word in ("-v", volume)]
        flags += [word for key, value in self.env.items() for word in ("-e", f"{key}={value}")]
        flags += ["-n"] * self.net + ["-w"] * self.rw + ["-u", self.user] * bool(self.user)
        flags += ["--workdir", self.workdir] * bool(self.workdir)
        return [sys.executable, "-m", "dutils.run", *flags, str(Path(self.folder).absolute()), *self.command]
