"""d-pull: download an image into DIR/rootfs and DIR/config.json, resumably (the doit pipeline, in-process)."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from .errors import Error, os_error_line, printable

TYPE_CHECKING = False  # typing's, without importing typing (d-pull --lock's no-op loads nothing it need not)
if TYPE_CHECKING:  # d-pull's modules load as needed: a settled folder needs neither requests nor doit
    from .folder import LockFile
    from .manifest import Platform

USAGE = "d-pull [OPTIONS] IMAGE [DIR]"
DESCRIPTION = """\
Download IMAGE from an OCI/Docker registry (or a file) into DIR: DIR/rootfs (the flattened image) and DIR/config.json
(the image's run configuration, yours to edit). Running the same command again resumes an interrupted pull
and fetches nothing when DIR is complete. Run the result with d-run DIR."""
EPILOG = """\
examples:
  d-pull alpine ./alpine                 docker.io/library/alpine:latest into ./alpine
  d-pull --platform linux/arm64/v8 debian:bookworm
  d-pull localhost:5000/tools/app@sha256:...
  d-pull docker-archive:app.tar ./app    an image carried as a file: also oci:DIR[:REF], oci-archive:FILE[:REF]
  d-pull --lock sandboxes.lock alpine ./alpine      pinned to the digest the lock names (or pinned now)

environment:
  D_UTILS_CACHE     blob cache folder (default $XDG_CACHE_HOME/d-utils, else ~/.cache/d-utils)
  D_UTILS_MIRRORS   pull-through mirrors, e.g. docker.io=mirror.example:5000,ghcr.io=other:5000
                    (else ~/.config/d-utils/mirrors.json: {"docker.io": ["mirror.example:5000"]})
  REGISTRY_AUTH_FILE, DOCKER_CONFIG   where credentials are looked up, as docker and podman do"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # allow_abbrev=False: `--password SECRET` must not pass for --password-stdin, and argv is visible to all
    parser = argparse.ArgumentParser(
        prog="d-pull",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        allow_abbrev=False,
        formatter_class=help_formatter,
    )
    add = parser.add_argument
    add("image", metavar="IMAGE", nargs="?", help="NAME[:TAG] or NAME@sha256:DIGEST (NAME may start with a registry"
        " host), or a file: oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:NAME:TAG|:@N], a path starting / or .")  # fmt: skip
    add("dir", metavar="DIR", nargs="?", help="folder to pull into (default: ./NAME, the image's last name component)")
    add("--platform", metavar="OS/ARCH[/VARIANT]", help="which image of a multi-platform index (default: this host's)")
    add(
        "--cache",
        metavar="FOLDER",
        help="blob cache folder (default: $D_UTILS_CACHE, else $XDG_CACHE_HOME/d-utils or ~/.cache/d-utils)",
    )
    add("--update", action="store_true",
        help="replace DIR's image when the tag now names another one (keeps config.json edits); with --lock, lock anew")  # fmt: skip
    add("--share", action="store_true",
        help="make DIR/rootfs by hard links from the cache's applied copy of the image (see README: shared folders)")  # fmt: skip
    add("--unshare", metavar="DIR",
        help="give the shared folder DIR files of its own (a copy, its --rw runs' changes in), and pull nothing")  # fmt: skip
    add("--lock", metavar="FILE",
        help="pull the digest FILE pins DIR to (a complete DIR then costs no request), else pin it there")  # fmt: skip
    add("--policy", metavar="FILE", help="trust policy, containers-policy.json(5) (default: where podman finds it)")
    add("--insecure", action="store_true", help="use plain HTTP (loopback registries fall back to it after HTTPS)")
    add("--ca-bundle", metavar="FILE", help="trust the CA certificates in FILE for the registry's TLS")
    add("--mirror", action="append", default=[], metavar="HOST[:PORT]",
        help="pull-through mirror to try before the registry (repeatable; default: $D_UTILS_MIRRORS, mirrors.json)")  # fmt: skip
    add("--allow-foreign-urls", action="store_true",
        help="download non-distributable layers from the URLs their manifest lists (digests are still checked)")  # fmt: skip
    add("--username", metavar="USER", help="log in as USER; the password is read from standard input")
    add("--password-stdin", action="store_true", help="read the password from standard input (default with --username)")  # fmt: skip
    add("-j", "--jobs", type=positive, default=3, metavar="N", help="blobs downloaded at once (default: 3)")
    add("--timeout", type=positive, default=300, metavar="SECONDS",
        help="give up after this long without progress (default: 300)")  # fmt: skip
    add("-q", "--quiet", action="store_true", help="print nothing but errors")
    add("--debug", action="store_true", help="show tracebacks and doit's own output")
    args = parser.parse_args(argv)
    if bool(args.image) == bool(args.unshare):
        parser.error("--unshare DIR pulls nothing: give no IMAGE" if args.image else "IMAGE is required")
    return args


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's, told the terminal's width: finding it itself would import shutil (with bz2 and lzma), which costs
    d-pull's no-op milliseconds (add_argument makes a formatter too)."""
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):  # no terminal: shutil's fallback
        columns = 80
    return argparse.RawTextHelpFormatter(prog, width=columns - 2)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # None: sys.argv[1:]
    try:
        if args.unshare:
            from .overlay import unshare

            unshare(args.unshare)
            return 0
        return pull(args)
    except Error as err:
        print(f"d-pull: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # outside doit's tasks (the folder made without doit, --unshare): as pipeline.action says it
        print(f"d-pull: error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nd-pull: interrupted; run the same command again to resume", file=sys.stderr, flush=True)
        os._exit(130)  # download threads may be blocked in a read: leave without waiting for them
    # a bug outside doit's tasks (a tag's check, direct.py): one line unless --debug, as runner.py says a task's
    except Exception as err:
        if args.debug:
            raise
        what = printable(f"{type(err).__name__}: {err}")
        print(f"d-pull: error: internal error: {what} (run with --debug for details)", file=sys.stderr)
        return 1


def pull(args: argparse.Namespace) -> int:
    from .folder import LockFile, settled
    from .manifest import host_platform, parse_platform
    from .reference import parse_reference
    from .store import PullDir

    ref = parse_reference(args.image)
    folder = args.dir or ref.name  # a str, as d-run's (PullDir's str kind): pathlib costs the no-op milliseconds
    password, lock = read_password(args), LockFile(args.lock) if args.lock else None
    platform = parse_platform(args.platform) if args.platform else host_platform()
    pinned = lock and partial(lock.manifest, PullDir(folder, str).root, str(ref))
    if not args.update and pinned and settled(PullDir(folder, str), str(ref), platform, pinned):
        status = f"up to date: {ref}"  # decided before requests and doit load (and pipeline.py)
    elif not (status := run_pipeline(args, folder, platform, password, lock)):
        return 1
    if not args.quiet:
        print(f"{status} ({PullDir(folder, str).read_record().digest}) in {folder}", file=sys.stderr)
    return 0


def run_pipeline(
    args: argparse.Namespace, folder: str, platform: Platform, password: str | None, lock: LockFile | None
) -> str:
    """Pull by the doit pipeline; what was done, or "" when it failed (said on stderr)."""
    from . import pipeline  # doit loads with the tasks, not for a settled folder (requests to ask about a tag)
    from .progress import progress_for
    from .store import cache_dir

    progress = progress_for(sys.stderr, args.quiet)
    same = ("insecure", "ca_bundle", "update", "share", "jobs", "timeout", "policy", "username")  # as the flags say
    options = pipeline.Options(
        **{name: getattr(args, name) for name in same},
        cache=cache_dir(args.cache),
        mirrors=args.mirror,
        foreign_urls=args.allow_foreign_urls,
        progress=progress,
        password=password,
        platform=platform,
    )
    task = pipeline.Pull(args.image, folder, options, lock)
    try:
        if task.settled():  # a tag's no-op: decided by what the registry says it names now
            return f"up to date: {task.ref}"
        from .direct import share_directly  # from the store's complete tree, without doit

        if args.share and share_directly(task):
            return f"pulled {task.ref}"
        from .runner import run_pulls

        failures = run_pulls([task], debug=args.debug)
    finally:
        progress.close()
    for message in failures:
        print(f"d-pull: error: {message}", file=sys.stderr)
    if task.skipped.total() and not failures:
        print(f"d-pull: warning: {task.skipped.describe()}", file=sys.stderr)
    return "" if failures else f"pulled {task.ref}" if task.changed else f"up to date: {task.ref}"


def read_password(args: argparse.Namespace) -> str | None:
    """The password comes from standard input only: argv is visible to every user of the machine."""
    if not (args.username or args.password_stdin):
        return None
    if not args.username:
        raise Error("--password-stdin needs --username")
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"password for {args.username}: ")
    return sys.stdin.readline().rstrip("\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(1)
