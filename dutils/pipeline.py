"""A pull as doit tasks: the whole pipeline in one file (doit loads with the tasks, which runner.py runs).

    dutils-manifest:DIR -> dutils-fetch:DIR/DIGEST (per blob, downloading ahead), dutils-apply:DIR (the layers in
    order) -> dutils-config:DIR [-> dutils-run:DIR];  `dutils` stands for every config task.

A folder's tasks after its manifest task are created once that ran and depend on nothing of another folder's, so
one failing sandbox stops no other; a blob two folders share is downloaded once all the same (the cache's lock per
blob). Every up-to-date check rests on facts on disk (a verified blob under its digest, the layers applied, the
record), never on doit's database alone: after a kill -9 that database holds nothing of the run.
"""

from __future__ import annotations  # requests loads with the first question to a registry, doit with the tasks

import atexit
import contextlib
import fcntl
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .auth import find_credentials
from .dodo_api import Sandbox
from .errors import Error, os_error_line, printable
from .folder import AppliedLog, LockFile, claimed, remove_folder, settled
from .locks import hold_folder
from .manifest import Blob, Image, Platform, host_platform, resolve_image
from .progress import Lines, Progress
from .reference import Reference, Source, parse_reference
from .store import PullDir, Record, blob_path, cache_dir

if TYPE_CHECKING:  # sandboxes all up to date need no registry: a dodo.py's doit run then never loads requests
    from concurrent.futures import Future

    from doit.exceptions import TaskFailed

    from .apply import Skipped
    from .registry import Registry, RetryPolicy

T = TypeVar("T")
UPDATE_VAR = "dutils-update"  # `doit dutils-update=all` (or =FOLDER): move the lock file to what the tags name now


@dataclass
class Options:
    """How to pull: everything a user can set on the command line or in a dodo.py."""

    platform: Platform = field(default_factory=host_platform)
    cache: Path = field(default_factory=cache_dir)
    insecure: bool = False  # plain HTTP; registries on loopback fall back to it when HTTPS fails
    ca_bundle: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    update: bool = False  # replace a finished folder's image, and move its lock entry
    share: bool = False  # make DIR/rootfs from the cache's store of applied trees (share.py)
    jobs: int = 3  # blobs downloaded at once, as Docker does
    foreign_urls: bool = False  # download non-distributable layers from the URLs their manifest lists
    mirrors: list[str] = field(default_factory=list)  # --mirror flags; else $D_UTILS_MIRRORS or mirrors.json
    timeout: float = 300.0  # seconds without progress before a transfer, and so the pull, gives up
    policy: str | None = None  # --policy FILE; else the containers tools' policy.json, if any
    progress: Progress = field(default_factory=Lines)


class Pull:
    """One image into one folder, and what its tasks learn on the way."""

    def __init__(
        self,
        image: str,
        folder: str | os.PathLike[str],
        options: Options,
        lock: LockFile | None = None,
        run: list[str] | None = None,
    ) -> None:
        self.ref = parse_reference(image)
        self.folder = PullDir(folder)
        self.key = os.fspath(folder)
        self.options = options
        self.lock = lock
        self.run = run  # the d-run command line of a `dutils-run:` task
        self.registries: list[Registry] = []  # mirrors first, the image's own registry last; see `connected`
        self.mutex = threading.Lock()  # guards `registries` and `fetching`
        self.image: Image | None = None  # once the manifest task ran
        self.changed = False  # whether the config task ran, as every pull that fetched or applied anything ends with
        self.holds = contextlib.ExitStack()  # `claimed`, from the manifest task until the config task or the run ends
        self.used_cache = False
        self.log = AppliedLog(self.folder)
        self.fetching: dict[str, Future] = {}  # done once the blob is in the cache, or failed
        self.answer: str | None = None  # the manifest the registry said the reference names now (`named_now`)

    @cached_property
    def skipped(self) -> Skipped:  # what an ordinary user could not reproduce (the stages load as they are needed)
        from .apply import Skipped

        return Skipped()

    # -- registries

    def connected(self) -> list[Registry]:
        """Connect on first use: a folder complete for its locked digest costs no request at all."""
        from .mirrors import connect_mirrored

        with self.mutex:
            if not self.registries and isinstance(self.ref, Source):  # an image carried as a file
                from .layout import Layout

                self.registries = [Layout(self.ref)]
            if not self.registries:
                self.registries = connect_mirrored(
                    self.ref, self.options.mirrors, self.connect, self.options.progress.note
                )
        return self.registries

    def connect(self, ref: Reference, retry: RetryPolicy) -> Registry:
        from .registry import Registry

        options, own = self.options, ref == self.ref  # the user's login goes to the image's own registry only
        login = (options.username, options.password) if own else (None, None)
        credentials = find_credentials(ref.registry, *login, ref.repository)
        retry, notify = replace(retry, patience=options.timeout), options.progress.note
        verify = options.ca_bundle or True
        return Registry(ref, credentials, plain_http=options.insecure, verify=verify, retry=retry, notify=notify)

    def from_any_registry(self, operation: Callable[[Registry], T]) -> T:
        """Run `operation` against each mirror in turn, and against the image's own registry last."""
        from .mirrors import from_first_answering

        return from_first_answering(self.connected(), operation, self.options.progress.note)

    # -- manifest

    def settled(self) -> bool:
        """Complete for the manifest its lock pins, else the one its reference names now (`folder.settled` decides);
        or resolved already, by direct.py, which leaves the rest to the tasks (holding the folder still)."""
        if self.image:
            return True
        pinned = partial(self.lock.manifest, self.folder.root, str(self.ref)) if self.lock else self.named_now
        return not self.options.update and settled(self.folder, str(self.ref), self.options.platform, pinned)

    def named_now(self) -> str:
        """The manifest the reference names now for the platform, asked once; "" when only `resolve` can tell, as when
        the policy asks for more than to accept anything (`resolve` checks it). A registry that fails to answer is an
        error, as it is to `docker pull` and `podman pull` of an image they hold."""
        from .policy import load_policy, requirements_for

        if self.answer is None:
            found, ask = load_policy(self.options.policy), partial(named_now, wanted=self.options.platform)
            checked = {rule["type"] for rule in requirements_for(found[1], self.ref)} if found else set()
            self.answer = "" if checked - {"insecureAcceptAnything"} else self.from_any_registry(ask)
        return self.answer

    def resolve(self) -> None:
        """Hold the folder, resolve its manifest, pin it in the lock file, and record what this pull makes."""
        from .policy import check_image, load_policy

        load_policy(self.options.policy)  # a missing or broken policy says so before any registry is asked
        self.holds.enter_context(claimed(self.folder, self.options.cache))
        self.used_cache = True
        # the lock file's entry for this folder, unless an update is asked for
        entry = None if self.lock is None or self.options.update else self.lock.entry(self.folder.root, str(self.ref))
        digest = entry["digest"] if entry else self.ref.digest

        def resolve_on(registry: Registry) -> Image:
            ref, fetch = registry.ref._replace(digest=digest), partial(self.download, registry)
            return resolve_image(registry, ref, self.options.platform, fetch)

        self.image = self.from_any_registry(resolve_on)
        verified = check_image(self.options.policy, self.ref, self.image.digest, self.from_any_registry, self.download)
        if self.lock and not entry:
            pinned = {"reference": str(self.ref), "digest": self.image.resolved, "manifest": self.image.digest}
            self.lock.pin(self.folder.root, pinned | {"platform": self.image.platform})
        record = self.folder.read_record()
        new = Record(str(self.ref), self.image.digest, self.image.platform)
        if record:  # a folder following its lock file changes image as the lock says
            new = record.retarget(*new[:3], self.folder.root, replace=self.options.update or entry is not None)
            if new.digest != record.digest:  # drop the rootfs of another image; config.json and volumes/ stay
                busy = f"{self.folder.root} is in use by a running container"
                self.holds.callback(os.close, hold_folder(self.folder.root, fcntl.LOCK_EX, busy))
                self.log.start_over()
        applied = sum(self.log.is_applied(n, layer.digest) for n, layer in enumerate(self.image.layers))
        self.options.progress.expect_layers(len(self.image.layers) - applied)
        # complete only while every layer is applied: d-run refuses a rootfs that is being rebuilt
        self.folder.write_record(new._replace(complete=new.complete and self.all_applied(), verified_by=verified))

    # -- fetch

    def prefetch(self, blob: Blob, downloads: threading.BoundedSemaphore) -> None:
        """Download ahead of the apply task, which says once why a blob it needs could not be had."""
        with contextlib.suppress(Error):
            self.fetched(blob, downloads)

    def fetched(self, blob: Blob, downloads: threading.BoundedSemaphore) -> None:
        """`blob` in the cache, downloaded by whichever task asks first while the other waits: a download under
        way always progresses, so waiting for it cannot deadlock the task threads."""
        from concurrent.futures import Future  # here: a no-op fetches nothing

        with self.mutex:
            first = blob.digest not in self.fetching
            done = self.fetching.setdefault(blob.digest, Future())
        if first:
            try:
                done.set_result(self.fetch(blob, downloads))
            except BaseException as err:  # a bug's too: the task waiting for this blob must not wait for ever
                done.set_exception(err)
        done.result()

    def fetch(self, blob: Blob, downloads: threading.BoundedSemaphore) -> None:
        from .fetch import cached
        from .registry import BlobUnknown

        if cached(self.options.cache, blob.digest):
            return  # no download slot for it: a layer in the cache must not wait behind other folders' downloads
        try:
            with downloads:
                self.from_any_registry(partial(self.download, blob=blob))
        except BlobUnknown:
            if not blob.urls:
                raise
            self.fetch_foreign(blob)

    def fetch_foreign(self, blob: Blob) -> None:
        """A non-distributable layer, from where its manifest says (the registry need not serve it), verified."""
        if not self.options.foreign_urls:
            raise Error(
                f"layer {blob.digest} is non-distributable: {self.ref.registry} does not serve it, {blob.urls[0]} does",
                "pass --allow-foreign-urls to download it from there",
            )
        origin = self.connected()[-1]
        for url in blob.urls[:-1]:
            with contextlib.suppress(Error):
                self.download(origin, blob, url)
                return
        self.download(origin, blob, blob.urls[-1])

    def download(self, registry: Registry, blob: Blob, url: str | None = None) -> Path:
        from .fetch import fetch_blob

        return fetch_blob(registry, blob, self.options.cache, self.options.progress, url)

    # -- apply

    def all_applied(self) -> bool:
        return self.log.applied() == [layer.digest for layer in self.image.layers]

    def apply_all(self, downloads: threading.BoundedSemaphore) -> None:
        """Apply the layers onto DIR/rootfs in order, each as soon as its blob is in the cache."""
        self.apply_onto(self.folder.rootfs, self.log, [layer.digest for layer in self.image.layers], downloads)

    def apply_onto(self, rootfs: Path, log: AppliedLog, keys: list[str], downloads: threading.BoundedSemaphore) -> None:
        """Apply the layers not yet in `log` onto `rootfs`, noting `keys[n]` (digest or diff_id) for layer n."""
        from .apply import apply_layer

        for n, layer in enumerate(self.image.layers):
            if log.is_applied(n, keys[n]):
                continue
            self.fetched(layer, downloads)
            rootfs.mkdir(parents=True, exist_ok=True)
            blob = blob_path(self.options.cache, layer.digest)
            self.skipped += apply_layer(blob, layer.media_type, self.image.diff_ids[n], rootfs)
            log.note(n, keys[n])
            self.options.progress.layer_applied(f"applied layer {n + 1}/{len(self.image.layers)} {layer.digest[:19]}")

    # -- config

    def is_complete(self) -> bool:
        return self.folder.is_complete(self.folder.read_record())

    def write_config(self) -> None:
        """config.json last, and the record marked complete: what says the pull is finished."""
        from . import config as image_config

        self.changed = True
        self.folder.rootfs.mkdir(exist_ok=True)  # an image of no layers runs with an empty root
        if kept := image_config.write_config(self.folder, self.options.cache, self.image.config.digest):
            self.options.progress.note(f"kept your edits to {self.folder.config}: {printable(', '.join(kept))}")
        self.holds.close()  # done: the rest of the run (other folders, d-run tasks) needs neither lock


def named_now(registry: Registry, wanted: Platform) -> str:
    """The manifest the registry's reference names now for `wanted`, as `resolve_image` chooses it; "" when only that
    can tell (index entries without a platform, whose configs it reads)."""
    from .manifest import INDEXES, check_not_artifact, choose_platform, fetch_manifest

    ref = registry.ref
    manifest, kind, digest = fetch_manifest(registry, ref, ref.digest, None)
    if kind not in INDEXES:
        return digest
    check_not_artifact(manifest, ref)
    with contextlib.suppress(LookupError):
        return choose_platform(manifest, wanted, ref, probe=not_probed)["digest"]
    return ""


def not_probed(entry: dict) -> Platform:
    raise LookupError(entry["digest"])  # choosing needs this entry's config: the pipeline's to fetch and read


def action(function: Callable, *args: object) -> Callable[[], TaskFailed | None]:
    """A doit action that fails with the Error's one line instead of a traceback; so does an OSError (a full disk
    writing image.json or config.json), as the file and the system's reason."""

    def run() -> TaskFailed | None:
        from doit.exceptions import TaskFailed

        try:
            function(*args)
        except Error as err:
            return TaskFailed(str(err))
        except OSError as err:
            return TaskFailed(os_error_line(err))
        return None

    run.__name__ = function.__name__
    return run


def task(function: Callable, *args: object, **fields: object) -> dict:
    """The doit task of `function(*args)`, described by its docstring (`doit list`)."""
    # doit captures an action's output by swapping sys.stdout/stderr, which threads running side by side can leave
    # swapped for good; our actions print nothing (Progress writes to the stream it was given), so nothing is captured.
    return {"actions": [action(function, *args)], "io": {"capture": False}, "doc": function.__doc__, **fields}


def pull_tasks(pulls: list[Pull]) -> dict[str, Callable]:
    """The task creators for these pulls, to put in a doit namespace (a dodo.py's globals, or d-pull's loader)."""
    downloads = threading.BoundedSemaphore(max(pull.options.jobs for pull in pulls))

    def task_manifest() -> Iterator[dict]:
        """Resolve the folder's locked digest (else its tag) to one manifest for the platform; clean: remove it."""
        for pull in pulls:
            yield task(pull.resolve, name=pull.key, uptodate=[pull.settled], clean=[action(remove_folder, pull.folder)])

    def task_dutils() -> dict:
        """Materialise every sandbox."""
        return {"actions": None, "task_dep": [f"dutils-config:{pull.key}" for pull in pulls]}

    trees: dict[str, str] = {}  # the store's trees that a folder's tasks build, by the folder
    folders = {f"task_dutils-folder:{pull.key}": folder_tasks(pull, downloads, trees) for pull in pulls}
    return {"task_dutils-manifest": task_manifest, "task_dutils": task_dutils, **folders}


def folder_tasks(pull: Pull, downloads: threading.BoundedSemaphore, trees: dict) -> Callable[[], Iterator[dict]]:
    from doit import create_after

    key = pull.key

    @create_after(executed=f"dutils-manifest:{key}", creates=[f"dutils-config:{key}", f"dutils-run:{key}"])
    def create() -> Iterator[dict]:
        """Finish the folder after its manifest: fetch its blobs, apply its layers, write config.json (and run it)."""
        image, deps = pull.image, [f"dutils-manifest:{key}"]  # no image: the manifest task was up to date
        if image and not pull.is_complete():
            from .fetch import cached
            from .share import is_shared

            blobs = {f"dutils-fetch:{key}/{blob.digest}": blob for blob in (image.config, *image.layers)}  # once each
            for name, blob in blobs.items():
                in_cache = partial(cached, pull.options.cache, blob.digest)
                yield task(pull.prefetch, blob, downloads, basename=name, task_dep=deps, uptodate=[in_cache])
            # one task applies the layers in order: a chain of a task per layer costs doit memory in the square of
            # their number (each task keeps the list of all it depends on, through the chain)
            apply = f"dutils-apply:{key}"
            if image.layers and (pull.options.share or is_shared(pull.folder)):  # --update keeps a folder shared
                yield from tree_tasks(pull, downloads, trees, deps)
            else:
                yield task(pull.apply_all, downloads, basename=apply, task_dep=deps, uptodate=[pull.all_applied])
            deps = [*blobs, apply]  # doit runs only what the targets depend on
        yield task(pull.write_config, basename=f"dutils-config:{key}", task_dep=deps, uptodate=[pull.is_complete])
        if pull.run:  # d-run's exit status is the task's result
            run = {"basename": f"dutils-run:{key}", "actions": [pull.run], "uptodate": [False], "verbosity": 2}
            run["doc"] = f"Run the sandbox: d-run {printable(shlex.join(pull.run[3:]))}"
            yield run | {"task_dep": [f"dutils-config:{key}"]}

    return create


def tree_tasks(pull: Pull, downloads: threading.BoundedSemaphore, trees: dict, deps: list[str]) -> Iterator[dict]:
    """The folder's rootfs made from the store's tree of its image, built by one task however many folders use it
    (its lock keeps other processes from building it at once)."""
    from .share import StoreTree

    tree = StoreTree(pull.options.cache, pull.image.diff_ids, [layer.digest for layer in pull.image.layers])
    name, note, key = f"dutils-tree:{tree.name}", pull.options.progress.note, f"dutils-apply:{pull.key}"
    if trees.setdefault(tree.name, pull.key) == pull.key:
        yield task(tree.build, note, pull.apply_onto, downloads, basename=name, task_dep=deps, uptodate=[tree.complete])
    yield task(
        tree.make_rootfs,
        pull.folder,
        pull.log,
        note,
        basename=key,
        task_dep=[*deps, name],
        uptodate=[pull.all_applied],
    )


def sandbox_tasks(
    sandboxes: list[Sandbox], options: Options | None = None, lock: str | os.PathLike[str] = "sandboxes.lock"
) -> dict[str, Callable]:
    """What a dodo.py puts in its namespace (`globals().update(...)`) to declare `sandboxes` pinned by `lock`; the
    README's "Sandboxes in your own repository" says which doit commands then do what."""
    from doit import get_var

    options = options or Options()
    lockfile, update = LockFile(lock), get_var(UPDATE_VAR)
    pulls = [Pull(s.image, s.folder, s.options(options), lockfile, s.d_run_argv()) for s in sandboxes]
    if update not in (None, "all", *(pull.key for pull in pulls)):
        raise Error(f"{UPDATE_VAR}={update}: no such sandbox", f"name one of {', '.join(p.key for p in pulls)}, or all")
    for pull in pulls:
        pull.options.update = update in ("all", pull.key)
    atexit.register(finish, pulls)  # doit has no end-of-run hook a dodo.py can use; teardowns run per thread
    sys.excepthook = partial(quiet_interrupt, sys.excepthook)  # doit lets Ctrl-C escape as a traceback
    return pull_tasks(pulls)


def quiet_interrupt(shown: Callable, kind: type[BaseException], *details: object) -> None:
    """Ctrl-C under doit: one line, as d-pull says it, instead of the traceback doit lets escape (a rerun resumes)."""
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted; run the same doit command again to resume", file=sys.stderr, flush=True)
    else:
        shown(kind, *details)


def finish(pulls: list[Pull]) -> None:
    from .cache import prune_if_due

    used = {pull.options.cache for pull in pulls if pull.used_cache}
    for pull in pulls:
        pull.holds.close()
    for cache in used:
        prune_if_due(cache)
