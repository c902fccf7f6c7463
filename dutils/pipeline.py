"""A pull as doit tasks: the whole pipeline in one file, and the only module that imports doit.

    auth:<dir> -> manifest:<dir> -> fetch:<digest> (one per blob, shared by all pulls)
               -> apply:<dir>/<n> (in order) -> config:<dir> [-> d-run:<dir>]

Every task's up-to-date check rests on facts on disk (a verified blob under its digest, the list of applied
layers, the record), never on doit's database alone: after a kill -9 that database holds nothing of the run.
`sandbox_tasks` is the public API: a dodo.py puts its result in its namespace to declare sandboxes.
"""

import contextlib
import json
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from doit import create_after
from doit.cmd_base import ModuleTaskLoader
from doit.dependency import JsonDB
from doit.doit_cmd import DoitMain
from doit.exceptions import TaskFailed, UnmetDependency
from doit.reporter import ZeroReporter

from . import config as image_config
from .apply import Skipped, apply_layer
from .auth import find_credentials, find_mirrors
from .cache import in_use, prune_if_due
from .errors import Error
from .fetch import fetch_blob
from .manifest import Blob, Image, Platform, host_platform, load_image, resolve_image
from .progress import Lines, Progress
from .reference import Reference, parse_reference
from .registry import BlobUnknown, Registry, RetryPolicy
from .store import (
    PullDir,
    Record,
    blob_path,
    cache_dir,
    locked,
    make_folder,
    remove_tree,
    touch,
    write_atomic,
    write_json,
)

T = TypeVar("T")
# doit captures an action's output by swapping sys.stdout/stderr, which threads running side by side can leave
# swapped for good; our actions print nothing (Progress writes to the stream it was given), so nothing is captured.
UNCAPTURED = {"capture": False}
MIRROR_RETRY = RetryPolicy(attempts=2)  # a failing mirror costs little: the origin is there


def mirror_ref(ref: Reference, mirror: str) -> Reference:
    """The same repository on a pull-through mirror (which stores Docker Hub's under library/ too)."""
    return replace(ref, registry=mirror.removeprefix("https://").removeprefix("http://").rstrip("/"))


@dataclass
class Options:
    """How to pull: everything a user can set on the command line or in a dodo.py."""

    platform: Platform = field(default_factory=host_platform)
    cache: Path = field(default_factory=cache_dir)
    insecure: bool = False  # plain HTTP; registries on loopback fall back to it when HTTPS fails
    ca_bundle: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    update: bool = False
    jobs: int = 3  # blobs downloaded at once, as Docker does
    foreign_urls: bool = False  # download non-distributable layers from the URLs their manifest lists
    mirrors: list[str] = field(default_factory=list)  # --mirror flags; else $D_UTILS_MIRRORS or mirrors.json
    timeout: float = 300.0  # seconds without progress before a transfer, and so the pull, gives up
    progress: Progress = field(default_factory=Lines)


class Pull:
    """One image into one folder, and what its tasks learn on the way."""

    def __init__(self, image: str, folder: str | os.PathLike[str], options: Options, command: list[str] | None = None):
        self.ref = parse_reference(image)
        self.folder = PullDir(folder)
        self.key = os.fspath(folder)
        self.options = options
        self.command = command  # for a `d-run:` task, as a dodo.py may declare
        self.registries: list[Registry] = []  # mirrors first, the image's own registry last
        self.image: Image | None = None
        self.skipped = Skipped()
        self.changed = False  # whether any fetch, apply or config work was done
        self.holds = contextlib.ExitStack()  # the folder's lock and a share of the cache's, for as long as we pull
        self.claimed = False
        self.made_root = False

    # -- auth

    def authenticate(self) -> None:
        self.claim_folder()
        mirrors = [
            self.connect(mirror_ref(self.ref, m), MIRROR_RETRY)
            for m in find_mirrors(self.ref.registry, self.options.mirrors)
        ]
        self.registries = [m for m in mirrors if self.usable_mirror(m)]
        origin = self.connect(self.ref, RetryPolicy())
        if not self.registries:
            origin.ping()  # fail early when the origin is the only way; a working mirror is enough otherwise
        self.registries.append(origin)

    def connect(self, ref: Reference, retry: RetryPolicy) -> Registry:
        return Registry(
            ref,
            find_credentials(ref.registry, self.options.username, self.options.password, ref.repository)
            if ref == self.ref
            else find_credentials(ref.registry, repository=ref.repository),
            plain_http=self.options.insecure,
            verify=self.options.ca_bundle or True,
            retry=replace(retry, patience=self.options.timeout),
            notify=self.options.progress.note,
        )

    def usable_mirror(self, mirror: Registry) -> bool:
        try:
            mirror.ping()
        except Error as err:
            self.options.progress.note(f"not using mirror {mirror.ref.registry}: {err}")
            return False
        return True

    def from_any_registry(self, operation: Callable[[Registry], T]) -> T:
        """Run `operation` against each mirror in turn, and against the image's own registry last."""
        for mirror in self.registries[:-1]:
            try:
                return operation(mirror)
            except Error as err:
                self.options.progress.note(f"mirror {mirror.ref.registry}: {err}; asking {self.ref.registry}")
        return operation(self.registries[-1])

    def claim_folder(self) -> None:
        """Refuse a folder d-pull did not make, then lock ours (and share the cache) until `release`."""
        if self.claimed:
            return
        root = self.folder.root
        ours = self.folder.read_record() is not None or self.folder.state.is_dir()
        if not ours and root.is_dir() and any(root.iterdir()):
            raise Error(f"{root} exists and was not made by d-pull", "choose a new folder; this one is left untouched")
        self.made_root = not root.exists()
        make_folder(self.folder.state, "folder")
        self.holds.enter_context(locked(self.folder.state / "lock", f"another d-pull is writing {root}"))
        self.holds.enter_context(in_use(self.options.cache))
        self.claimed = True

    def release(self) -> None:
        self.forget_if_unstarted()
        self.holds.close()
        self.claimed = False

    def forget_if_unstarted(self) -> None:
        """After a failure before anything was recorded (a typo, say), leave no trace of this pull."""
        if self.claimed and self.folder.read_record() is None:
            remove_tree(self.folder.state)
            if self.made_root:
                with contextlib.suppress(OSError):
                    self.folder.root.rmdir()

    # -- manifest

    def resolve(self) -> None:
        self.image = self.from_any_registry(
            lambda registry: resolve_image(
                registry,
                registry.ref,
                self.options.platform,
                self.options.cache,
                lambda blob: fetch_blob(registry, blob, self.options.cache, self.options.progress),
            )
        )
        record = self.folder.read_record()
        if record and (record.digest != self.image.digest or record.reference != str(self.ref)):
            if record.complete and not self.options.update:
                raise Error(
                    f"{self.folder.root} holds {record.reference} ({record.digest[:19]}), "
                    f"and {self.ref} is now {self.image.digest[:19]}",
                    "run with --update to replace it; your config.json edits and volumes/ are kept",
                )
            self.start_over()
            record = record._replace(reference=str(self.ref), digest=self.image.digest, platform=self.image.platform)
        record = record or Record(str(self.ref), self.image.digest, self.image.platform)
        layers = [layer.digest for layer in self.image.layers]
        applied = self.applied() if self.folder.rootfs.is_dir() else []
        self.options.progress.expect_layers(len(layers) - sum(a == b for a, b in zip(applied, layers, strict=False)))
        # complete only while every layer is applied: d-run refuses a rootfs that is being rebuilt
        self.folder.write_record(record._replace(complete=record.complete and applied == layers))

    def start_over(self) -> None:
        """Drop the rootfs of another image (or of an unfinished pull of one); config.json and volumes/ stay."""
        remove_tree(self.folder.rootfs)
        self.applied_path().unlink(missing_ok=True)

    def known_image(self) -> Image | None:
        """The image once `manifest` ran, or the one recorded by an earlier pull (for `doit list`)."""
        record = self.folder.read_record()
        if self.image is None and record:
            return load_image(self.options.cache, record.digest, record.platform, self.ref)
        return self.image

    # -- fetch

    def fetch(self, blob: Blob) -> None:
        self.changed = True
        try:
            self.from_any_registry(
                lambda registry: fetch_blob(registry, blob, self.options.cache, self.options.progress)
            )
        except BlobUnknown:
            if not blob.urls:
                raise
            self.fetch_foreign(blob)

    def fetch_foreign(self, blob: Blob) -> None:
        """A non-distributable layer (Windows base layers, licensed content): the registry need not serve it,
        the manifest says where it lives. Its digest still decides what is kept."""
        if not self.options.foreign_urls:
            raise Error(
                f"layer {blob.digest} is non-distributable: {self.ref.registry} does not serve it, {blob.urls[0]} does",
                "pass --allow-foreign-urls to download it from there",
            )
        for url in blob.urls[:-1]:
            with contextlib.suppress(Error):
                fetch_blob(self.registries[-1], blob, self.options.cache, self.options.progress, url)
                return
        fetch_blob(self.registries[-1], blob, self.options.cache, self.options.progress, blob.urls[-1])

    def cached(self, blob: Blob) -> bool:
        path = blob_path(self.options.cache, blob.digest)
        touch(path)  # used now: pruning goes by last use
        return path.exists()

    # -- apply

    def applied_path(self) -> Path:
        return self.folder.state / "applied.json"

    def applied(self) -> list[str]:
        """Digests of the layers applied so far, in order: written after each layer, so it survives a kill."""
        try:
            return json.loads(self.applied_path().read_text())
        except (FileNotFoundError, ValueError):
            return []

    def is_applied(self, n: int) -> bool:
        return self.folder.rootfs.is_dir() and self.applied()[n : n + 1] == [self.image.layers[n].digest]

    def apply(self, n: int) -> None:
        self.changed = True
        layer = self.image.layers[n]
        config = image_config.read_image_config(blob_path(self.options.cache, self.image.config.digest))
        diff_id = image_config.diff_ids(config, len(self.image.layers))[n]
        self.folder.rootfs.mkdir(parents=True, exist_ok=True)
        skipped = apply_layer(
            blob_path(self.options.cache, layer.digest), layer.media_type, diff_id, self.folder.rootfs
        )
        self.skipped = self.skipped + skipped
        write_json(self.applied_path(), self.applied()[:n] + [layer.digest])
        self.options.progress.layer_applied(f"applied layer {n + 1}/{len(self.image.layers)} {layer.digest[:19]}")

    # -- config

    def is_complete(self) -> bool:
        record = self.folder.read_record()
        return bool(record and record.complete and record.digest == self.image.digest and self.folder.config.exists())

    def write_config(self) -> None:
        """config.json last: with the record marked complete, it is what says the pull is finished."""
        self.changed = True
        self.folder.rootfs.mkdir(exist_ok=True)  # an image of no layers runs with an empty root
        record = self.folder.read_record()
        new = image_config.run_config(
            image_config.read_image_config(blob_path(self.options.cache, self.image.config.digest))
        )
        data = image_config.render(self.merged_with_user_edits(new, record))
        write_atomic(self.folder.config, data)
        self.folder.write_record(
            record._replace(
                complete=True,
                config_digest=self.image.config.digest,
                config_xxh64=image_config.fingerprint(data),
            )
        )

    def merged_with_user_edits(self, new: dict, record: Record) -> dict:
        try:
            current = self.folder.config.read_bytes()
        except FileNotFoundError:
            return new
        if image_config.fingerprint(current) == record.config_xxh64:
            return new  # not edited since we wrote it
        base_blob = blob_path(self.options.cache, record.config_digest) if record.config_digest else None
        base = (
            image_config.run_config(image_config.read_image_config(base_blob))
            if base_blob and base_blob.exists()
            else None
        )
        return image_config.merge_edits(new, base, image_config.read_user_config(self.folder.config))


def action(function: Callable, *args: object) -> Callable[[], TaskFailed | None]:
    """A doit action that fails with the Error's one line instead of a traceback."""

    def run() -> TaskFailed | None:
        try:
            function(*args)
        except Error as err:
            return TaskFailed(str(err))
        return None

    run.__name__ = function.__name__
    return run


def sandbox_tasks(pulls: list[Pull]) -> dict[str, Callable]:
    """The task creators for these pulls, to put in a doit namespace (a dodo.py's globals, or d-pull's loader)."""

    downloads = threading.BoundedSemaphore(max(pull.options.jobs for pull in pulls))

    def fetch_one(pull: Pull, blob: Blob) -> None:
        with downloads:
            pull.fetch(blob)

    def task_auth() -> Iterator[dict]:
        """Find credentials; authenticate when the registry asks."""
        for pull in pulls:
            yield {"name": pull.key, "actions": [action(pull.authenticate)], "io": UNCAPTURED}

    def task_manifest() -> Iterator[dict]:
        """Resolve the reference to one manifest for the platform."""
        for pull in pulls:
            yield {
                "name": pull.key,
                "actions": [action(pull.resolve)],
                "task_dep": [f"auth:{pull.key}"],
                "io": UNCAPTURED,
            }

    @create_after(executed="manifest")
    def task_fetch() -> Iterator[dict]:
        """Download a blob into the cache, verified."""
        seen: set[str] = set()
        for pull in pulls:
            image = pull.known_image()
            for blob in (image.config, *image.layers) if image else ():
                if blob.digest not in seen:
                    seen.add(blob.digest)
                    yield {
                        "name": blob.digest,
                        "actions": [action(fetch_one, pull, blob)],
                        "io": UNCAPTURED,
                        "uptodate": [lambda pull=pull, blob=blob: pull.cached(blob)],
                    }

    @create_after(executed="manifest")
    def task_apply() -> Iterator[dict]:
        """Apply a layer onto DIR/rootfs, in order."""
        for pull in pulls:
            image = pull.known_image()
            for n, layer in enumerate(image.layers if image else ()):
                yield {
                    "name": f"{pull.key}/{n}",
                    "actions": [action(pull.apply, n)],
                    "io": UNCAPTURED,
                    "task_dep": [f"fetch:{layer.digest}", f"fetch:{image.config.digest}"]
                    + ([f"apply:{pull.key}/{n - 1}"] if n else []),
                    "uptodate": [lambda pull=pull, n=n: pull.is_applied(n)],
                }

    def task_config() -> Iterator[dict]:
        """Write DIR/config.json, keeping the user's edits; marks the pull complete."""
        for pull in pulls:
            yield {
                "name": pull.key,
                "actions": [action(pull.write_config)],
                "io": UNCAPTURED,
                "task_dep": ["fetch", "apply"],
                "uptodate": [pull.is_complete],
            }

    def task_run() -> Iterator[dict]:
        """Run the sandbox's command with d-run."""
        for pull in (p for p in pulls if p.command):
            d_run = [sys.executable, "-m", "dutils.run", pull.key, *pull.command]
            yield {
                "name": pull.key,
                "actions": [shlex.join(d_run)],
                "task_dep": [f"config:{pull.key}"],
                "uptodate": [False],
                "verbosity": 2,
            }

    creators = {"task_auth": task_auth, "task_manifest": task_manifest, "task_fetch": task_fetch}
    creators |= {"task_apply": task_apply, "task_config": task_config}
    if any(p.command for p in pulls):
        creators["task_d-run"] = task_run  # `run` is doit's own command
    return creators


class Reporter(ZeroReporter):
    """A doit reporter that prints nothing (Progress speaks to the user) and keeps each failure as one line."""

    def __init__(self, debug: bool) -> None:
        super().__init__(sys.stderr, {})
        self.debug = debug

    def add_failure(self, task, fail) -> None:
        if isinstance(fail, UnmetDependency):
            return  # a consequence of a failure that is reported already
        if isinstance(fail, TaskFailed) or self.debug:
            self.failures.append(fail.get_msg().strip() if self.debug else fail.message)
        else:  # an exception escaped an action: a bug, shown briefly unless --debug
            last = "".join(fail.traceback).strip().splitlines()[-1:] or [fail.message]
            self.failures.append(f"internal error in task {task.name}: {last[0]} (run with --debug for details)")

    def runtime_error(self, message: str) -> None:
        self.failures.append(message)

    def cleanup_error(self, fail) -> None:
        self.failures.append(fail.get_msg())


class MemoryDB(JsonDB):
    """doit's database, kept in memory: every up-to-date check here rests on facts on disk, so there is
    nothing worth saving, and no half-written database after a full disk or a kill."""

    def __init__(self, name: str, codec: object, *, module_name: str | None = None) -> None:
        self.name, self.codec, self._db = name, codec, {}

    def dump(self) -> None:
        pass


def run_pulls(pulls: list[Pull], debug: bool) -> list[str]:
    """Run the pipeline in this process; return the failures, one line each (none means every pull finished)."""
    for pull in pulls:
        make_folder(pull.options.cache, "cache folder (--cache or $D_UTILS_CACHE)")
        pull.claim_folder()  # before doit writes its database into the folder
    reporter = Reporter(debug)
    namespace: dict[str, object] = dict(sandbox_tasks(pulls))
    namespace["DOIT_CONFIG"] = {
        "dep_file": "unused",
        "backend": "memory",
        "reporter": reporter,
        "verbosity": 0,
        "num_process": max(pull.options.jobs for pull in pulls) + 1,  # and one applying layers meanwhile
        "par_type": "thread",  # delayed tasks hold closures, which the process runner cannot pickle
        "default_tasks": ["config"],
    }
    try:
        plugins = {"BACKEND": {"memory": f"{__name__}:MemoryDB"}}
        # config_filenames=(): a doit.cfg or pyproject.toml in the current folder must not change a pull
        code = DoitMain(ModuleTaskLoader(namespace), config_filenames=(), extra_config=plugins).run(["run"])
    finally:
        for pull in pulls:
            pull.release()
    for cache in {pull.options.cache for pull in pulls}:
        prune_if_due(cache)
    if code and not reporter.failures:
        reporter.failures.append(f"the pull stopped with doit status {code} (run with --debug for details)")
    return reporter.failures
