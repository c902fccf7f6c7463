"""A real registry for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1, with its own storage."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

START_TIMEOUT = 15  # seconds for the registry to answer /v2/
STOP_TIMEOUT = 10
SETTLE_PAUSE, SETTLE_TRIES = 0.05, 40


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session() -> requests.Session:
    """A requests session for loopback registries: no proxy, CA bundle or credentials from the environment."""
    http = requests.Session()
    http.trust_env = False
    return http


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


class Registry:
    """`docker-registry serve` on a free loopback port; `config` is merged into a default configuration, so a test
    can add `auth`, `http: {tls: ...}` or `proxy: {remoteurl: ...}`. Its JSON log feeds the request counters."""

    def __init__(self, config: dict | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="d-utils-registry-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.config = merge(
            {
                "version": 0.1,
                "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(self.root / "storage")}, "delete": {"enabled": True}},
                "http": {"addr": self.host, "secret": "d-utils-tests"},
            },
            config or {},
        )
        self.url = ("https" if "tls" in self.config["http"] else "http") + "://" + self.host
        self.log_path = self.root / "registry.log"
        config_path = self.root / "config.yml"
        config_path.write_text(json.dumps(self.config))  # JSON is YAML
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["/usr/bin/docker-registry", "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.process.returncode}: {self.log_tail()}")
            try:
                with warnings.catch_warnings():  # any answer will do, even over TLS with an unknown certificate
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                    session().get(f"{self.url}/v2/", timeout=2, verify=False)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer within {START_TIMEOUT} s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stops the registry and removes its storage; safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- counters read from the log

    def responses(self) -> list[dict]:
        """Every response the registry logged: its JSON fields (http.request.method, .uri, http.response.status...)."""
        entries = []
        for line in self.settled_log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if "http.response.status" in entry:
                    entries.append(entry)
        return entries

    def settled_log(self) -> str:
        """The log once it stops growing: the registry may log a response just after its last bytes left."""
        text = self.log_path.read_text(errors="replace")
        for _ in range(SETTLE_TRIES):
            time.sleep(SETTLE_PAUSE)
            again = self.log_path.read_text(errors="replace")
            if again == text:
                break
            text = again
        return text

    def _gets(self, kind: str, reference: str | None) -> int:
        count = 0
        for entry in self.responses():
            path = urlsplit(entry["http.request.uri"]).path
            _, found, tail = path.rpartition(f"/{kind}/")
            served = entry["http.request.method"] == "GET" and entry["http.response.status"] in (200, 206)
            count += bool(found and served and "/" not in tail and reference in (None, tail))
        return count

    def blob_gets(self, digest: str | None = None) -> int:
        """Blob GETs answered 200/206: all of them, or those for one digest."""
        return self._gets("blobs", digest)

    def manifest_gets(self, reference: str | None = None) -> int:
        """Manifest GETs answered 200: all of them, or those for one tag or digest."""
        return self._gets("manifests", reference)
