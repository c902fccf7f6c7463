"""Pull benchmark: d-pull against skopeo + umoci and charliecloud's ch-image, on one local TLS registry.

    python3 bench/bench_pull.py [--sizes 16,64,256] [--layers 4] [--repeat 3]

Builds one gzip image per size (MiB of file data: large half-compressible files plus many small ones),
pushes each with skopeo to a throwaway docker-registry, then pulls every image with each tool from cold
(fresh cache, fresh destination) `--repeat` times, checks each result's content, and prints the median wall
time and peak RSS of each tool with the ratios d-pull/other. d-pull's peak RSS per size shows whether its
memory stays flat as images grow. Needs: docker-registry, skopeo, umoci, openssl, time, charliecloud-builders,
charliecloud-runtime.
Everything it starts or writes is removed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from dutils.errors import Error
from dutils.store import write_json

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the project's image builders live with the tests
from images import Image, Tar, canonical_json, write_oci_layout  # noqa: E402

MiB = 1 << 20
BIG_FILE = 32 * MiB  # large payloads are split into files of at most this size
SMALL_FILES = 500  # per layer
SMALL_SIZE = 1024
MARKER = "etc/bench-marker"  # written by every layer: the result must hold the last layer's content
REGISTRY_START = 15.0  # seconds
RUN_TIMEOUT = 600.0  # one pull, seconds
NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
CA_OPTIONS = ["-days", "1", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]
SIGN_OPTIONS = ["-CAcreateserial", "-days", "1"]
SKOPEO_COPY = ["skopeo", "copy", "--quiet", "--insecure-policy"]  # the policy would only say "accept anything"
TIME = "/usr/bin/time"  # GNU time, for peak RSS
REQUIRED = {  # command -> Debian package
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "openssl": "openssl",
    "ch-image": "charliecloud-builders",
    "ch-run": "charliecloud-runtime",  # ch-image refuses to start without it
    TIME: "time",
}


class HistoryImage(Image):
    """An image whose config has a `history`, as every real image has: ch-image refuses a config without one."""

    @functools.cached_property
    def config_blob(self) -> bytes:
        config = json.loads(super().config_blob)
        config["history"] = [{"created_by": f"bench layer {n}"} for n in range(len(self.layers))]
        return canonical_json(config)


@dataclass(frozen=True)
class Expected:
    """What every tool's rootfs must hold, so that a failed pull can never pass as a fast one."""

    files: int
    marker: bytes
    big_path: str
    big_sha256: str


@dataclass(frozen=True)
class BenchImage:
    ref: str
    size_mib: int
    blob_mib: float
    expected: Expected


@dataclass(frozen=True)
class Sample:
    seconds: float
    rss_kib: int


@dataclass(frozen=True)
class Tool:
    """A puller: the commands that pull `ref` into the work folder, run in order, and where its rootfs ends up."""

    name: str
    commands: Callable[[str, Path], list[list[str]]]
    rootfs: Callable[[Path], Path]
    env: dict[str, str]


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path
    cert_dir: Path  # the CA alone: skopeo refuses a --cert-dir that holds *.key files


# -- set-up: certificates, registry, images


def require_commands() -> None:
    missing = [package for command, package in REQUIRED.items() if not shutil.which(command)]
    if missing:
        raise Error(f"missing tools: {', '.join(missing)}", f"apt-get install -y {' '.join(sorted(set(missing)))}")


def registry_host() -> tuple[str, str]:
    """The machine's own name and its address. d-pull speaks plain HTTP to localhost and 127.0.0.0/8 names, and
    ch-image only HTTPS: addressing the registry by host name gives all three tools the same TLS connection."""
    name = socket.gethostname()
    try:
        return name, socket.gethostbyname(name)
    except OSError as err:
        raise Error(f"this machine's name {name!r} does not resolve: {err}", "add it to /etc/hosts") from err


def make_certs(folder: Path, host: str, address: str) -> Certs:
    """A throwaway CA and a server certificate for `host` and `address`, valid for one day."""
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    cert, key, csr = folder / "server.crt", folder / "server.key", folder / "server.csr"
    openssl("req", "-x509", *NEW_KEY, *CA_OPTIONS, "-subj", "/CN=d-utils bench CA", "-keyout", ca_key, "-out", ca)
    openssl("req", "-new", *NEW_KEY, "-subj", f"/CN={host}", "-keyout", key, "-out", csr)
    extensions = folder / "server.ext"
    extensions.write_text(
        f"subjectAltName=DNS:{host},IP:{address}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, *SIGN_OPTIONS, "-extfile", extensions, "-out", cert
    )
    cert_dir = folder / "skopeo-certs"
    cert_dir.mkdir()
    shutil.copy(ca, cert_dir / "ca.crt")
    return Certs(ca, cert, key, cert_dir)


def openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise Error(f"openssl {args[0]} failed: {done.stderr.strip()}")


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def start_registry(folder: Path, host: str, address: str, certs: Certs) -> tuple[subprocess.Popen, str]:
    """docker-registry with TLS and storage in `folder`; returns the process and its host:port once it answers."""
    port = free_port(address)
    config = {  # JSON is YAML
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(folder / "storage")}},
        "http": {"addr": f"{address}:{port}", "tls": {"certificate": str(certs.cert), "key": str(certs.key)}},
    }
    write_json(folder / "config.yml", config)
    log = (folder / "registry.log").open("wb")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(folder / "config.yml")], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    try:
        wait_for_registry(process, f"https://{host}:{port}/v2/", certs.ca, folder / "registry.log")
    except BaseException:
        stop(process)
        raise
    return process, f"{host}:{port}"


def wait_for_registry(process: subprocess.Popen, url: str, ca: Path, log: Path) -> None:
    deadline = time.monotonic() + REGISTRY_START
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Error(f"docker-registry exited: {log.read_text().strip()[-500:]}")
        try:
            if requests.get(url, verify=str(ca), timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise Error(f"docker-registry did not answer at {url} within {REGISTRY_START:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def build_image(size_mib: int, layers: int) -> tuple[Image, Expected]:
    """`size_mib` MiB of data over `layers` gzip layers: per layer, large files of hex text (random bytes,
    so gzip halves them at best, like binaries) and SMALL_FILES small ones; every layer rewrites MARKER."""
    rng = random.Random(size_mib)
    per_layer = size_mib * MiB // layers - SMALL_FILES * SMALL_SIZE
    tars, files = [], 0
    for n in range(layers):
        tar = Tar().dir("etc").file(MARKER, f"layer {n} of {size_mib} MiB\n".encode())
        for k in range(SMALL_FILES):
            tar.file(f"layer{n}/small/{k % 10}/file{k}", rng.randbytes(SMALL_SIZE // 2).hex().encode())
        for start in range(0, per_layer, BIG_FILE):
            big = rng.randbytes(min(BIG_FILE, per_layer - start) // 2).hex().encode()
            big_path = f"layer{n}/big{start // BIG_FILE}"
            tar.file(big_path, big)
        files += SMALL_FILES + -(-per_layer // BIG_FILE)
        tars.append(tar.to_bytes())
    expected = Expected(files, f"layer {layers - 1} of {size_mib} MiB\n".encode(), big_path, sha256_hex(big))
    return HistoryImage(tars, config={"Cmd": ["/bin/sh"]}, compression="gzip"), expected


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def push_image(work: Path, registry: str, size_mib: int, layers: int, certs: Certs) -> BenchImage:
    image, expected = build_image(size_mib, layers)
    layout = work / f"layout-{size_mib}"
    write_oci_layout(layout, image, "bench")
    ref = f"{registry}/bench/pull{size_mib}:latest"
    command = [*SKOPEO_COPY, "--dest-cert-dir", str(certs.cert_dir), f"oci:{layout}:bench", f"docker://{ref}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if done.returncode:
        raise Error(f"skopeo could not push {ref}: {done.stderr.strip()}")
    shutil.rmtree(layout)
    blob_mib = sum(len(blob) for blob in image.layer_blobs) / MiB
    return BenchImage(ref, size_mib, blob_mib, expected)


# -- the tools


def make_tools(certs: Certs, jobs: int) -> list[Tool]:
    skopeo_copy = [*SKOPEO_COPY, "--src-cert-dir", str(certs.cert_dir)]
    umoci_unpack = ["umoci", "raw", "unpack", "--rootless", "--image"]
    d_pull = [sys.executable, "-m", "dutils.pull", "-q", "-j", str(jobs), "--ca-bundle", str(certs.ca)]
    ch_image = ["/usr/bin/python3", shutil.which("ch-image") or "ch-image"]  # Debian's python has its lark
    # ch-image uses requests with verify=True, which takes REQUESTS_CA_BUNDLE from the environment.
    ch_env = {"REQUESTS_CA_BUNDLE": str(certs.ca), "CURL_CA_BUNDLE": str(certs.ca), "SSL_CERT_FILE": str(certs.ca)}
    return [
        Tool(
            "d-pull",
            lambda ref, work: [[*d_pull, "--cache", str(work / "cache"), ref, str(work / "pulled")]],
            lambda work: work / "pulled" / "rootfs",
            {},
        ),
        Tool(
            "skopeo+umoci",
            lambda ref, work: [
                [*skopeo_copy, f"docker://{ref}", f"oci:{work}/layout:bench"],
                [*umoci_unpack, f"{work}/layout:bench", f"{work}/rootfs"],
            ],
            lambda work: work / "rootfs",
            {},
        ),
        Tool(
            "ch-image",
            # --no-cache: its build cache would also commit the image to git, work the others do not do
            lambda ref, work: [[*ch_image, "--no-cache", "-s", str(work / "storage"), "pull", ref]],
            lambda work: only_child(work / "storage" / "img"),
            {"USER": getpass.getuser(), **ch_env},
        ),
    ]


def only_child(folder: Path) -> Path:
    children = list(folder.iterdir()) if folder.is_dir() else []
    if len(children) != 1:
        raise Error(f"expected one image in {folder}, found {len(children)}")
    return children[0]


def measure(command: list[str], env: dict[str, str], work: Path) -> Sample:
    """Wall time and peak RSS of one command. GNU time runs it: a child forked from this (large) process would
    report this process's RSS as its own peak. Its own process group, so that no grandchild outlives a Ctrl-C."""
    rss, log = work / "rss", work / "log"
    with log.open("ab") as output:
        start = time.perf_counter()
        process = subprocess.Popen(
            [TIME, "-f", "%M", "-o", str(rss), *command],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
            start_new_session=True,
        )
        try:
            process.wait(timeout=RUN_TIMEOUT)
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.perf_counter() - start
    if process.returncode:
        raise Error(f"{shlex.join(command)} failed (exit {process.returncode}): {log.read_text().strip()[-800:]}")
    return Sample(seconds, int(rss.read_text().split()[-1]))


def pull_once(tool: Tool, image: BenchImage, work: Path) -> Sample:
    """One cold pull (fresh cache and destination); a multi-command tool adds times and keeps the largest RSS."""
    env = os.environ | tool.env
    samples = [measure(command, env, work) for command in tool.commands(image.ref, work)]
    check_rootfs(tool.name, tool.rootfs(work), image.expected)
    return Sample(sum(s.seconds for s in samples), max(s.rss_kib for s in samples))


def check_rootfs(tool: str, rootfs: Path, expected: Expected) -> None:
    # only the image's own folders: ch-image adds files of its own (ch/, etc/hosts...)
    files = sum(len(names) for top in rootfs.glob("layer*") for _, _, names in os.walk(top))
    marker = (rootfs / MARKER).read_bytes() if (rootfs / MARKER).is_file() else b""
    big = rootfs / expected.big_path
    big_sha256 = sha256_hex(big.read_bytes()) if big.is_file() else ""
    if (files, marker, big_sha256) != (expected.files, expected.marker, expected.big_sha256):
        raise Error(
            f"{tool} gave a wrong rootfs: {files} files (want {expected.files}), {MARKER} {marker!r}"
            f" (want {expected.marker!r}), {expected.big_path} sha256 {big_sha256[:12] or 'missing'}"
            f" (want {expected.big_sha256[:12]})"
        )


def bench_image(tools: list[Tool], image: BenchImage, repeat: int, scratch: Path) -> dict[str, Sample]:
    """Median seconds and median peak RSS of each tool; the order of the tools rotates between repetitions."""
    samples: dict[str, list[Sample]] = {tool.name: [] for tool in tools}
    for rep in range(repeat):
        for tool in tools[rep % len(tools) :] + tools[: rep % len(tools)]:
            work = Path(tempfile.mkdtemp(prefix=f"{tool.name}-", dir=scratch))
            try:
                sample = pull_once(tool, image, work)
            finally:
                shutil.rmtree(work)
            samples[tool.name].append(sample)
            print(
                f"  {image.size_mib} MiB, run {rep + 1}/{repeat}: {tool.name} {sample.seconds:.2f} s,"
                f" {sample.rss_kib / 1024:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return {
        name: Sample(statistics.median(s.seconds for s in runs), int(statistics.median(s.rss_kib for s in runs)))
        for name, runs in samples.items()
    }


# -- report


def print_table(results: list[tuple[BenchImage, dict[str, Sample]]]) -> None:
    labels = [f"{image.size_mib} MiB ({image.blob_mib:.0f} gz)" for image, _ in results]
    width = max(len("image"), *map(len, labels))
    header = f"{'image':<{width}}  {'tool':<13} {'median s':>9} {'peak RSS MiB':>12} {'time d-pull/x':>13} {'RSS d-pull/x':>12}"
    print(header)
    print("-" * len(header))
    for label, (_, medians) in zip(labels, results, strict=True):
        mine = medians["d-pull"]
        for name, sample in medians.items():
            print(
                f"{label:<{width}}  {name:<13} {sample.seconds:>9.2f} {sample.rss_kib / 1024:>12.1f}"
                f" {mine.seconds / sample.seconds:>13.2f} {mine.rss_kib / sample.rss_kib:>12.2f}"
            )
            label = ""
    print("(ratios below 1: d-pull is faster / smaller)")


def print_memory_trend(results: list[tuple[BenchImage, dict[str, Sample]]]) -> None:
    """d-pull's peak RSS by image size: flat means streaming, growth with size means something buffers."""
    by_size = [(image.size_mib, medians["d-pull"].rss_kib / 1024) for image, medians in results]
    print("\nd-pull peak RSS by image size: " + ", ".join(f"{size} MiB -> {rss:.1f} MiB" for size, rss in by_size))
    if len(by_size) > 1:
        (small, small_rss), (large, large_rss) = min(by_size), max(by_size)
        verdict = "flat" if large_rss <= small_rss * 1.25 else "GROWS with the image"
        print(f"image x{large / small:.0f}, d-pull peak RSS x{large_rss / small_rss:.2f}: {verdict}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_pull", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,64,256", help="MiB of file data per image (default: 16,64,256)")
    parser.add_argument("--layers", type=int, default=4, help="layers per image (default: 4)")
    parser.add_argument("--repeat", type=int, default=3, help="cold pulls per tool and image; median (default: 3)")
    parser.add_argument("-j", "--jobs", type=int, default=3, help="d-pull's parallel downloads (default: 3)")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted(int(size) for size in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes: {args.sizes!r} is not a comma-separated list of whole MiB")
    if min(args.sizes) < 1 or args.layers < 1 or args.repeat < 1 or args.jobs < 1:
        parser.error("--sizes, --layers, --repeat and --jobs must be positive")
    if min(args.sizes) < args.layers:
        parser.error(f"--sizes: each image needs at least 1 MiB per layer ({args.layers} layers)")
    return args


def run(args: argparse.Namespace, scratch: Path) -> None:
    require_commands()
    host, address = registry_host()
    certs = make_certs(scratch, host, address)
    registry, where = start_registry(scratch, host, address, certs)
    try:
        images = []
        for size in args.sizes:
            print(f"building and pushing {size} MiB in {args.layers} layers", file=sys.stderr, flush=True)
            images.append(push_image(scratch, where, size, args.layers, certs))
        tools = make_tools(certs, args.jobs)
        results = [(image, bench_image(tools, image, args.repeat, scratch)) for image in images]
    finally:
        stop(registry)
    print(f"\ncold pulls from docker-registry over TLS on {where}, median of {args.repeat}; {os.cpu_count()} CPUs\n")
    print_table(results)
    print_memory_trend(results)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="d-utils-bench-") as scratch:
            run(args, Path(scratch))
    except (Error, subprocess.TimeoutExpired) as err:
        print(f"bench_pull: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_pull: interrupted; everything it started is stopped and removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
