"""Images run as their authors meant: services that drop privileges, apt, and image users, end to end on
Debian bookworm with nginx, as root and as the ordinary user (with a subordinate id range, and without a
mapping: no newuidmap on PATH)."""

import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cli import BIN, assert_one_line_error, d_pull
from malicious import USER
from test_images import CACHE, debian_layer, push_gzip_layer_image, run_bounded
from test_ports import pastas, tun  # noqa: F401 (tun: a fixture, /dev/net/tun usable by the ordinary user)
from test_run import wait_until

pytestmark = pytest.mark.integration
SERVICES_LAYER = CACHE / "debian-services.tar.gz"
README = Path(__file__).parents[1] / "README.md"
CONFIG = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["bash"]}
WHO = ["root", "user", "user-unmapped"]


def services_layer() -> Path:
    """minbase with nginx-light and procps, a user `app` (1000) owning /home/app, and apt's partial folder
    belonging to _apt as in an image whose build ran apt."""
    app = ("useradd", "-m", "-u", "1000", "-G", "www-data", "app")
    apt = ("chown", "_apt:root", "/var/cache/apt/archives/partial")
    return debian_layer(SERVICES_LAYER, ("nginx-light", "procps"), (app, apt))


@pytest.fixture(scope="module")
def images(registry) -> dict[str, str]:
    layer = services_layer()
    return {
        "services": push_gzip_layer_image(registry.host, "services", "latest", layer, CONFIG),
        "app": push_gzip_layer_image(registry.host, "services", "app", layer, {**CONFIG, "User": "1000"}),
    }


class Runner:
    """d-pull and d-run as root, as the ordinary user, or as the ordinary user with no newuidmap on PATH."""

    def __init__(self, who: str, unprivileged, workspace: Path, tmp_path: Path) -> None:
        self.who, self.unprivileged = who, unprivileged
        self.base = tmp_path if who == "root" else Path(tempfile.mkdtemp(dir=workspace / "pull"))
        if who != "root":
            shutil.chown(self.base, USER, USER)
        self.path = ""
        if who == "user-unmapped":  # bwrap and pasta, without newuidmap and newgidmap
            tools = Path(tempfile.mkdtemp(dir=workspace))
            tools.chmod(0o755)
            for tool in ("bwrap", "pasta"):
                (tools / tool).symlink_to(shutil.which(tool))
            self.path = f"{unprivileged.bin}:{tools}"

    def argv(self, tool: str, *args: object) -> list[str]:
        if self.who == "root":
            return [str(BIN / tool), *map(str, args)]
        prefix = [*self.unprivileged.become, *(["env", f"PATH={self.path}"] if self.path else [])]
        return [*prefix, str(self.unprivileged.bin / tool), *map(str, args)]

    def pull(self, image: str) -> Path:
        folder = self.base / "image"
        done = subprocess.run(
            self.argv("d-pull", "--cache", self.base / "cache", image, folder),
            capture_output=True, text=True, timeout=300, cwd="/",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return folder

    def run(self, folder: Path, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = self.argv("d-run", *args[:-1], folder, *args[-1]) if isinstance(args[-1], list) else None
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")

    def start(self, folder: Path, *options: str, command: list[str]) -> subprocess.Popen:
        argv = self.argv("d-run", *options, folder, *command)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd="/", start_new_session=True)


@pytest.fixture(params=WHO)
def runner(request, unprivileged, workspace: Path, tmp_path: Path) -> Runner:
    return Runner(request.param, unprivileged, workspace, tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_setpriv_entrypoint_drops_to_its_user(images, runner: Runner) -> None:
    folder = runner.pull(images["services"])
    script = "setpriv --reuid=app --regid=app --init-groups id"
    done = runner.run(folder, ["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    if runner.who == "user-unmapped":  # faked: the calls succeed, nothing changes
        assert done.stdout.startswith("uid=0(root) gid=0(root)"), done.stdout
    else:
        assert done.stdout == "uid=1000(app) gid=1000(app) groups=1000(app),33(www-data)\n"


# podman's default set: CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, KILL 5, SETGID 6, SETUID 7, SETPCAP 8,
# NET_BIND_SERVICE 10, SYS_CHROOT 18, SETFCAP 31 (linux/capability.h)
ROOT_CAPS = sum(1 << bit for bit in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31))


def test_root_inside_a_mapped_namespace_has_a_bounded_capability_set(images, runner: Runner) -> None:
    folder = runner.pull(images["services"])
    script = "grep CapEff /proc/self/status; mount -t tmpfs none /mnt && echo MOUNTED"
    done = runner.run(folder, ["sh", "-c", script])
    effective = int(done.stdout.split()[1], 16)
    assert effective == (0 if runner.who == "user-unmapped" else ROOT_CAPS), done.stdout
    assert "MOUNTED" not in done.stdout  # no CAP_SYS_ADMIN: nothing mounted over the image, ro binds stay ro


def nginx_script(port: int) -> str:
    """Starts nginx on `port`, waits (bounded) for its workers, prints `ps`, then READY, and waits."""
    return (
        f"sed -i 's/80 default_server/{port} default_server/' /etc/nginx/sites-enabled/default"
        " && nginx && for i in $(seq 100); do ps -eo args | grep -q '^nginx: worker' && break; sleep 0.1; done;"
        " ps -eo user:12,args; echo READY; exec sleep 120"
    )


def serve_nginx(runner: Runner, folder: Path, options: list[str], inner: int, outer: int) -> tuple[str, str]:
    """What `ps` showed inside, and the page at 127.0.0.1:`outer`."""
    child = runner.start(folder, *options, command=["sh", "-c", nginx_script(inner)])
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (line := child.stdout.readline()) and line != "READY\n":
            lines.append(line)
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment
        with direct.open(f"http://127.0.0.1:{outer}/", timeout=30) as answer:
            page = answer.read().decode()
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    return "".join(lines), page


def test_nginx_serves_its_page_with_workers_as_www_data(images, runner: Runner) -> None:
    folder = runner.pull(images["services"])
    port = free_port()
    ps, page = serve_nginx(runner, folder, ["-n", "--rw"], port, port)
    assert "Welcome to nginx!" in page
    rows = [line.split(None, 1) for line in ps.splitlines()]
    workers = [user for user, args in rows if args.startswith("nginx: worker")]
    assert workers, ps
    assert set(workers) == {"root" if runner.who == "user-unmapped" else "www-data"}, ps


@pytest.mark.usefixtures("tun")
def test_nginx_serves_its_page_through_a_published_port(images, runner: Runner) -> None:
    folder = runner.pull(images["services"])
    port = free_port()
    ps, page = serve_nginx(runner, folder, ["--rw", "-p", f"{port}:80"], 80, port)
    assert "Welcome to nginx!" in page
    workers = {user for user, args in (line.split(None, 1) for line in ps.splitlines()) if args.startswith("nginx: w")}
    # Without a range the drop is faked (seccomp): the workers stay the one mapped user, your own uid (root inside).
    assert workers == {"root" if runner.who == "user-unmapped" else "www-data"}, ps


@pytest.mark.usefixtures("tun")
@pytest.mark.skipif(os.geteuid() != 0, reason="a root d-run")
def test_an_image_user_publishes_a_port_under_root_and_pasta_ends_with_it(images, tmp_path: Path) -> None:
    # Root's pasta outlives bwrap's monitor, the image's uid, whose end may not signal it: d-run's watcher ends it.
    done = d_pull("-q", images["app"], str(tmp_path / "app"), cache=tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr
    port = free_port()
    run = [BIN / "d-run", "-p", f"{port}:8080", tmp_path / "app", "sh", "-c", "id -u; ip -o -4 addr show scope global"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("1000\n") and " inet " in done.stdout, done
    assert wait_until(lambda: not pastas(port))


@pytest.mark.usefixtures("tun")
@pytest.mark.skipif(os.geteuid() != 0, reason="a root d-run (a user's pasta is that user's)")
def test_root_s_pasta_is_nobody_whose_namespaces_reach_no_host_file(images, workspace, tmp_path) -> None:
    # pasta parses every packet from the container and the host. The attacker is a flaw in it: whatever runs as
    # pasta, in pasta's namespaces, must reach no host file nobody could not (as root's pasta it would be root).
    done = d_pull("-q", images["app"], str(tmp_path / "app"), cache=tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr
    standin = Path(tempfile.mkdtemp(dir=workspace)) / "passwd"
    standin.parent.chmod(0o755)
    standin.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    port = free_port()
    argv = [BIN / "d-run", "-p", f"{port}:8080", tmp_path / "app", "sh", "-c", "echo READY; exec sleep 60"]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout.readline() == "READY\n"
        assert len(found := pastas(port)) == 1
        with open(f"/proc/{found[0]}/status") as status:
            assert [line.split()[1:] for line in status if line.startswith(("Uid:", "Gid:"))] == [["65534"] * 4] * 2
        # pasta's own code in its user namespace: nobody, given it (pasta, not dumpable, keeps nobody else out)
        userns = os.open(f"/proc/{found[0]}/ns/user", os.O_RDONLY)
        attack = ["sh", "-c", f"echo nobody::0:0::/:/bin/sh >> {standin}"]
        for keep in ([], ["--preserve-credentials"]):
            nsenter = ["nsenter", f"--user=/proc/self/fd/{userns}", *keep, *attack]
            done = subprocess.run(
                nsenter, pass_fds=[userns], user=65534, group=65534, extra_groups=[], capture_output=True, text=True
            )
            assert done.returncode != 0 and "Permission denied" in done.stderr, done
        os.close(userns)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert standin.read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    assert wait_until(lambda: not pastas(port))


SNOOP = """
import os, sys, time
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    for pid in set(filter(str.isdigit, os.listdir("/proc"))) - {str(os.getpid())}:
        try:
            with open(f"/proc/{pid}/status") as status:
                if "Uid:\\t65534\\t" not in status.read():
                    continue
            os.close(os.open(f"/proc/{pid}/ns/net", os.O_RDONLY))
            print("opened the network namespace of", pid, flush=True)
        except OSError:
            pass
"""


@pytest.mark.usefixtures("tun")
@pytest.mark.skipif(os.geteuid() != 0, reason="a root d-run (a user's pasta is that user's)")
def test_no_process_of_nobody_s_opens_what_root_s_d_run_makes_for_pasta(images, tmp_path) -> None:
    # The attacker runs as nobody, watching for processes of nobody's: d-run's helper that makes pasta's namespaces
    # is one, for a moment, and pasta another. Neither may let it in (nor hold d-run's descriptors).
    done = d_pull("-q", images["app"], str(tmp_path / "app"), cache=tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr
    snoop = subprocess.Popen(  # its own group: killing runuser alone left the snoop to run out its 30 s
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", SNOOP, "30"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        for _ in range(3):  # bounded; three starts caught the old helper
            run = [BIN / "d-run", "-p", f"{free_port()}:8080", tmp_path / "app", "true"]
            assert subprocess.run(run, capture_output=True, timeout=60).returncode == 0
    finally:
        os.killpg(snoop.pid, signal.SIGKILL)
    assert snoop.communicate(timeout=30)[0] == b""


def make_deb(where: Path, name: str, depends: str) -> Path:
    tree = where / name
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share" / name).mkdir(parents=True)
    (tree / "usr/share" / name / "marker").write_text(name)
    control = f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
    (tree / "DEBIAN/control").write_text(control + (f"Depends: {depends}\n" if depends else ""))
    run_bounded(["dpkg-deb", "--root-owner-group", "--build", tree, where / f"{name}.deb"], 60)
    return where / f"{name}.deb"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """A flat apt repository of two packages, dutest-a depending on dutest-b, served on 127.0.0.1."""
    where = tmp_path_factory.mktemp("repository")
    stanzas = []
    for name, depends in (("dutest-a", "dutest-b"), ("dutest-b", "")):
        deb = make_deb(where, name, depends)
        control = run_bounded(["dpkg-deb", "--field", deb], 60)
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        stanzas.append(f"{control.strip()}\nFilename: ./{deb.name}\nSize: {deb.stat().st_size}\nSHA256: {digest}\n")
    (where / "Packages").write_text("\n".join(stanzas))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(where)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_apt_get_installs_with_dependencies_from_a_local_repository(images, repository, runner: Runner) -> None:
    folder = runner.pull(images["services"])
    source = f"deb [trusted=yes] {repository} ./"
    script = f"echo '{source}' > /etc/apt/sources.list && apt-get update -q"
    done = runner.run(folder, "-n", "--rw", ["sh", "-c", script])
    assert done.returncode == 0, done.stdout + done.stderr
    example = re.search(r"`d-run (-n --rw) \./deb (apt-get install -y) curl`", README.read_text())
    assert example, "the README's apt example changed: test it as it is written"
    done = runner.run(folder, *example[1].split(), [*example[2].split(), "dutest-a"])
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("dutest-a", "dutest-b"):
        assert (folder / "rootfs/usr/share" / name / "marker").read_text() == name


@pytest.mark.skipif(os.geteuid() != 0, reason="a root d-run")
def test_an_image_user_writes_its_home_and_not_etc_under_root(images, tmp_path: Path) -> None:
    done = d_pull("-q", images["app"], str(tmp_path / "app"), cache=tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr
    run = [BIN / "d-run", "--rw", tmp_path / "app", "sh", "-c"]
    home = subprocess.run([*run, "id; touch /home/app/mine"], capture_output=True, text=True, timeout=60)
    assert home.returncode == 0, home.stderr
    assert home.stdout == "uid=1000(app) gid=1000(app) groups=1000(app),33(www-data)\n"
    assert (tmp_path / "app/rootfs/home/app/mine").stat().st_uid == 1000
    etc = subprocess.run([*run, "touch /etc/mine"], capture_output=True, text=True, timeout=60)
    assert etc.returncode != 0 and "Permission denied" in etc.stderr
    assert not (tmp_path / "app/rootfs/etc/mine").exists()
    # --debug prints bwrap's command line while d-run is still root: user 1000 could not import what it needs
    debug = subprocess.run([BIN / "d-run", "--debug", tmp_path / "app", "id", "-u"], capture_output=True, text=True)
    assert (debug.returncode, debug.stdout, debug.stderr.startswith("bwrap ")) == (0, "1000\n", True), debug.stderr


@pytest.mark.usefixtures("tun")
@pytest.mark.skipif(os.geteuid() != 0, reason="a root d-run (a user's namespace is that user's to join)")
@pytest.mark.parametrize("publish", [False, True])
def test_the_image_users_host_processes_cannot_join_its_namespace(images, workspace, tmp_path, publish) -> None:
    # The attacker is a host process of the container's uid. Were the namespace its (a child of the host's), it
    # would join it with every capability there, over every host file: root's stand-in passwd would take its line.
    # With -p, d-run's network namespace and root's pasta are in the chain too.
    uid = pwd.getpwnam(USER).pw_uid
    done = d_pull("-q", images["app"], str(tmp_path / "app"), cache=tmp_path / "cache", timeout=300)
    assert done.returncode == 0, done.stderr
    standin = Path(tempfile.mkdtemp(dir=workspace)) / "passwd"
    standin.parent.chmod(0o755)
    standin.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    argv = [BIN / "d-run", "-u", f"{uid}:{uid}", *["-p", f"{free_port()}:80"] * publish, tmp_path / "app"]
    argv += ["sh", "-c", "echo READY; exec sleep 60"]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout.readline() == "READY\n"
        assert os.stat(f"/proc/{child.pid}").st_uid == uid  # bwrap's monitor: the image's user, in its namespace
        for how in (["--user"], ["--user", "--preserve-credentials"], ["--user", "--mount"]):
            attack = f"echo {USER}::0:0::/:/bin/sh >> {standin}"
            nsenter = ["nsenter", f"--target={child.pid}", *how, "sh", "-c", attack]
            done = subprocess.run(["runuser", "-u", USER, "--", *nsenter], capture_output=True, text=True, timeout=30)
            assert done.returncode != 0 and re.search("Permission denied|Operation not permitted", done.stderr), done
        peek = ["runuser", "-u", USER, "--", "cat", f"/proc/{child.pid}/root/etc/hostname"]  # a traced view: none
        done = subprocess.run(peek, capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate(timeout=30)
    assert standin.read_bytes() == b"root:x:0:0::/root:/bin/sh\n"


def test_a_failing_newuidmap_is_one_line(images, unprivileged, workspace: Path, tmp_path: Path) -> None:
    runner = Runner("user-unmapped", unprivileged, workspace, tmp_path)
    tools = Path(runner.path.split(":")[1])
    for tool in ("newuidmap", "newgidmap"):  # found on PATH, and refusing, as with a range newuidmap rejects
        (tools / tool).write_text("#!/bin/sh\nexit 1\n")
        (tools / tool).chmod(0o755)
    folder = runner.pull(images["services"])
    assert_one_line_error(runner.run(folder, ["true"]), "newuidmap or newgidmap failed", program="d-run")
