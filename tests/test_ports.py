"""d-run -p: published ports through pasta. The pure pieces, then real containers (real pasta, real bwrap,
the busybox test image with httpd) run as the ordinary user, reached by real clients on the host's loopback."""

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli import d_pull
from images import Image, busybox_tar, push
from test_run import (
    HOST_PYTHON,
    IMAGE_CONFIG,
    USER,
    Runner,
    assert_error,
    on_terminal,
    processes_running,
    wait_until,
    write_record,
)

from dutils.errors import Error
from dutils.ports import Port, find_program, parse_port, parse_ports, pasta_argv, published

PAGE = b"hello from inside\n"

# ----- pure pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, port",
    [
        ("8080:80", Port("127.0.0.1", 8080, 80, "tcp")),
        ("8080:80/tcp", Port("127.0.0.1", 8080, 80, "tcp")),
        ("5353:53/udp", Port("127.0.0.1", 5353, 53, "udp")),
        ("0.0.0.0:80:8080", Port("0.0.0.0", 80, 8080, "tcp")),
        ("192.0.2.7:1:65535/udp", Port("192.0.2.7", 1, 65535, "udp")),
        ("[::1]:8443:443", Port("::1", 8443, 443, "tcp")),
        ("[::]:53:53/udp", Port("::", 53, 53, "udp")),
    ],
)
def test_parse_port(spec, port):
    assert parse_port(spec) == port


@pytest.mark.parametrize(
    "spec",
    [
        "", "80", ":80", "80:", "8080:80/", "8080:80/sctp", "8080:80/TCP", "0:80", "80:0", "65536:80", "80:65536",
        "-1:80", "+80:80", " 80:80", "80 :80", "８０:80", "0x50:80", "1e3:80", "a:80", "80:b", "1.2.3:80:80",
        "1.2.3.4.5:80:80", "256.1.1.1:80:80", "::1:80:80", "[::1]:80", "[127.0.0.1]:80:80", "[::1:80:80",
        "localhost:80:80", "host:80:80:80", "8080-8090:80", "127.0.0.1:8080:80\n", "127.0.0.1\x1b[2J:80:80",
    ],
)  # fmt: skip
def test_parse_port_refuses(spec):
    with pytest.raises(ValueError):
        parse_port(spec)


def test_malformed_or_repeated_ports_are_one_line_errors_naming_their_source():
    with pytest.raises(Error) as refused:
        parse_ports(["8080:80", "x:80"], "-p")
    assert str(refused.value).startswith("-p x:80: ") and "HOST_PORT:CONTAINER_PORT" in str(refused.value)
    with pytest.raises(Error, match="published twice"):
        parse_ports(["8080:80", "127.0.0.1:8080:81/tcp"], "-p")
    assert len(parse_ports(["8080:80", "8080:80/udp", "[::1]:8080:80"], "-p")) == 3  # other protocol, address
    with pytest.raises(Error) as refused:
        parse_ports(["8080:80\x1b[2J"], "config.json 'ports':")
    assert "\x1b" not in str(refused.value) and str(refused.value).startswith("config.json 'ports': 8080:80\\x1b")


def test_flags_win_over_config_and_exclude_the_host_network():
    assert published(["1:2"], ("3:4",), network=False) == (Port("127.0.0.1", 1, 2, "tcp"),)
    assert published([], ("3:4",), network=False) == (Port("127.0.0.1", 3, 4, "tcp"),)
    assert published([], (), network=True) == ()
    with pytest.raises(Error, match="-p and -n exclude each other"):
        published([], ("3:4",), network=True)


def test_pasta_forwards_only_what_is_published():
    argv = pasta_argv((Port("127.0.0.1", 8080, 80, "tcp"),), "/usr/bin/python3", [5, 7], ["bwrap", "--", "sh"])
    assert argv[:2] == ["pasta", "--quiet"] and "--foreground" in argv and "--config-net" in argv
    options = " ".join(argv[: argv.index("--")])
    # Nothing from the namespace to the host's ports, no gateway mapped to its loopback; for a protocol
    # without ports, "none": pasta's default, "auto", would publish whatever the container listens on.
    assert "--no-map-gw" in argv and "-T none -U none" in options
    assert "-t 127.0.0.1/8080:80 -u none" in options
    starter = argv[argv.index("--") + 1 :]
    assert starter[:3] == ["/usr/bin/python3", "-I", "-S"] and starter[5:] == ["5,7", "bwrap", "--", "sh"]
    udp = pasta_argv((Port("::1", 53, 5353, "udp"), Port("::1", 54, 54, "udp")), "py", [], ["bwrap"])
    assert "-t none -u ::1/53:5353 -u ::1/54:54 --" in " ".join(udp)


def test_importing_ports_costs_no_socket_module():
    code = "import sys, dutils.run; print(sorted(set(sys.modules) & {'socket', 'shutil'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert done.stdout == "[]\n"


def test_find_program_finds_what_shutil_which_finds(tmp_path):
    import shutil

    for name, mode in (("tool", 0o755), ("plain", 0o644), ("folder", None), ("later", 0o755)):
        folder = tmp_path / ("second" if name == "later" else "first")
        folder.mkdir(exist_ok=True)
        if mode is None:
            (folder / name).mkdir(mode=0o755)
        else:
            (folder / name).touch(mode=mode)
    path = os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "first"), str(tmp_path / "second")])
    for name in ("tool", "plain", "folder", "later", "absent", str(tmp_path / "first" / "tool"), "first/tool"):
        assert find_program(name, path) == shutil.which(name, path=path)
    assert find_program("later", path) == str(tmp_path / "second" / "later")
    assert find_program("plain", path) is None and find_program("folder", path) is None


# ----- real containers, as the ordinary user ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tun():
    """/dev/net/tun usable by the ordinary user, as common distributions ship it (0666); its mode is
    restored afterwards."""
    if os.geteuid() != 0:
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            pytest.skip("/dev/net/tun is not usable, and only root may change it")
        yield
        return
    mode = os.stat("/dev/net/tun").st_mode & 0o7777
    os.chmod("/dev/net/tun", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/net/tun", mode)


@pytest.fixture(scope="module")
def template():
    """The busybox test image's rootfs, plus /www/index.html for its httpd."""
    root = Path(tempfile.mkdtemp(prefix="d-utils-ports-"))
    root.chmod(0o755)
    layer = busybox_tar().dir("www").file("www/index.html", PAGE).to_bytes()
    with tarfile.open(fileobj=io.BytesIO(layer)) as archive:
        archive.extractall(root / "template" / "rootfs")
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=True, timeout=60)


@pytest.fixture(scope="module")
def run(unprivileged, tun) -> Runner:
    return Runner(unprivileged.bin / "d-run", unprivileged.env, USER if unprivileged.as_root else None)


@pytest.fixture
def box(template, run) -> Path:
    """A fresh, complete pull folder owned by the ordinary user."""
    folder = Path(tempfile.mkdtemp(dir=template)) / "busybox"
    folder.parent.chmod(0o755)
    subprocess.run(["cp", "-a", str(template / "template"), str(folder)], check=True)
    (folder / "config.json").write_text(json.dumps(IMAGE_CONFIG))
    write_record(folder, complete=True)
    run.own(folder.parent)
    return folder


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pastas(port: int) -> list[int]:
    """The pids of pasta processes publishing host port `port`."""
    wanted = f"127.0.0.1/{port}:".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue  # gone meanwhile
        if argv and argv[0].endswith(b"pasta") and any(arg.startswith(wanted) for arg in argv):
            found.append(int(entry.name))
    return found


def fetch(port: int, deadline: float, host: str = "127.0.0.1") -> bytes | None:
    """The page at http://HOST:PORT/, asked until `deadline` (time.monotonic()) while refused."""
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


class Started:
    """d-run started in the background as the ordinary user; killed and waited for on exit."""

    def __init__(self, run: Runner, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(run.script), *args],
            bufsize=0,  # unbuffered: a line read must not take the next one out of select()'s sight
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=run.env,
            cwd="/",
            **run.popen_args(),
        )

    def line(self, timeout: float = 20) -> bytes:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline() if ready else b""

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.communicate(timeout=10)


def test_a_published_port_serves_the_containers_http_and_nothing_else(run, box):
    port, unpublished, ipv6 = free_port(), free_port(), free_port()
    script = f"busybox httpd -p {unpublished} -h /www && exec busybox httpd -f -p 80 -h /www"
    with Started(run, "-p", f"{port}:80", "-p", f"[::1]:{ipv6}:80", str(box), "sh", "-c", script) as started:
        assert fetch(port, time.monotonic() + 20) == PAGE
        assert fetch(ipv6, time.monotonic() + 5, "[::1]") == PAGE
        # The container listens on `unpublished` too; pasta forwards only -p's port (its default would
        # forward every port the container listens on), and only on the loopback.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", unpublished), timeout=5).close()
        assert started.process.poll() is None
    assert wait_until(lambda: not pastas(port))


@pytest.fixture
def host_services():
    """A TCP and a UDP service on the host's loopback (IPv4 and IPv6), recording whatever reaches them."""
    reached: list[str] = []
    sockets = []
    for family, address in [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]:
        tcp, udp = socket.socket(family, socket.SOCK_STREAM), socket.socket(family, socket.SOCK_DGRAM)
        tcp.bind((address, 0))
        port = tcp.getsockname()[1]
        udp.bind((address, port))
        tcp.listen()
        sockets += [tcp, udp]
    stop = threading.Event()

    def record():
        while not stop.is_set():
            readable, _, _ = select.select(sockets, [], [], 0.1)
            for sock in readable:
                if sock.type == socket.SOCK_STREAM:
                    sock.accept()[0].close()
                    reached.append(f"tcp {sock.getsockname()[0]}")
                else:
                    reached.append(f"udp {sock.getsockname()[0]} {sock.recv(100)!r}")

    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    yield sockets[0].getsockname()[1], sockets[2].getsockname()[1], reached
    stop.set()
    thread.join(timeout=5)
    for sock in sockets:
        sock.close()


# Run inside, with the host's python: after the host reached the published port (pasta has then seen
# traffic from the host's loopback, which is when it would map the gateway to it), send to the host's
# services by every address that could lead there. Prints what each attempt gave.
PROBE = r"""
import os, socket, sys, time
port4, port6 = int(sys.argv[1]), int(sys.argv[2])
print("fds", sorted(os.listdir("/proc/self/fd")), flush=True)
server = socket.create_server(("0.0.0.0", 80))
print("serving", flush=True)
server.accept()[0].close()
gateway = next(line.split()[2] for line in open("/proc/net/route").read().splitlines()[1:] if line.split()[1] == "00000000")
gateway = socket.inet_ntoa(int(gateway, 16).to_bytes(4, "little"))
for family, address, port in [(socket.AF_INET, "127.0.0.1", port4), (socket.AF_INET, gateway, port4), (socket.AF_INET6, "::1", port6)]:
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"from inside", (address, port))
    try:
        socket.create_connection((address, port), timeout=3).close()
        print("tcp", address, "connected", flush=True)
    except OSError as err:
        print("tcp", address, type(err).__name__, flush=True)
"""


def test_the_container_cannot_reach_the_hosts_loopback_services(run, box, host_services):
    port4, port6, reached = host_services
    port = free_port()
    command = [*HOST_PYTHON, "-p", f"{port}:80", str(box), "/usr/bin/python3", "-c", PROBE, str(port4), str(port6)]
    with Started(run, *command) as started:
        assert started.line() == b"fds ['0', '1', '2', '3']\n"  # none of pasta's host sockets (3: listdir's)
        assert started.line() == b"serving\n"
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        results = [started.line().decode().split() for _ in range(3)]
        assert started.process.wait(timeout=30) == 0, started.process.stderr.read()
    assert all(result[0] == "tcp" and result[2] != "connected" for result in results), results
    time.sleep(0.5)  # a datagram still on its way
    assert reached == []


UDP_ECHO = """
import socket, sys
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
data, peer = server.recvfrom(100)
server.sendto(data.upper(), peer)
"""


def test_udp_forwarding(run, box):
    # The same port number outside and inside: Debian 12's pasta (passt 2023.03) can lose the replies of
    # a UDP port published on the loopback under another number (the README says so).
    port = free_port(socket.SOCK_DGRAM)
    command = [*HOST_PYTHON, "-p", f"{port}:{port}/udp", str(box), "/usr/bin/python3", "-c", UDP_ECHO, str(port)]
    with Started(run, *command) as started:
        assert started.line() == b"ready\n"
        assert udp_answers(port) == [b"PING"]
        assert started.process.wait(timeout=20) == 0
    assert wait_until(lambda: not pastas(port))


def udp_answers(port: int) -> list[bytes]:
    """Send "ping" to 127.0.0.1:PORT until an answer comes (a datagram may be lost), 20 times at most."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.5)
        for _ in range(20):
            client.sendto(b"ping", ("127.0.0.1", port))
            try:
                return [client.recvfrom(100)[0]]
            except TimeoutError:
                continue
    return []


@pytest.mark.parametrize("publish", [False, True])
def test_exit_statuses_are_the_same_as_without_ports(run, box, publish):
    port = free_port()
    flags = ["-p", f"{port}:80"] if publish else []
    assert run(*flags, str(box), "sh", "-c", "exit 7").returncode == 7
    assert run(*flags, str(box), "sh", "-c", "kill -TERM $$").returncode == 143
    assert run(*flags, str(box), "sh", "-c", "kill -KILL $$").returncode == 137
    done = run(*flags, str(box), "sh", "-c", "echo out; echo err >&2")
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    assert wait_until(lambda: not pastas(port))  # its watcher ends pasta just after d-run's status is out


def killed(run: Runner, box: Path, how: signal.Signals) -> int:
    """The exit status of d-run -p killed by `how` while its container sleeps; the container and pasta
    must be gone afterwards."""
    port = free_port()
    sleeper = ["sleep", str(200_000 + os.getpid() + how)]  # a command line no one else runs
    with Started(run, "-p", f"{port}:80", str(box), "sh", "-c", f"echo ready; exec {' '.join(sleeper)}") as started:
        assert started.line() == b"ready\n"
        assert wait_until(lambda: processes_running(sleeper)) and len(pastas(port)) == 1
        started.process.send_signal(how)
        status = started.process.wait(timeout=10)
    assert wait_until(lambda: not processes_running(sleeper))  # bwrap's --die-with-parent
    assert wait_until(lambda: not pastas(port))
    return status


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGHUP])
def test_killing_d_run_leaves_nothing_behind(run, box, how):
    assert killed(run, box, how) == -how  # as bwrap itself dies without -p


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGQUIT])
def test_sigterm_to_d_run_leaves_nothing_behind(run, box, how):
    killed(run, box, how)


def test_sigterm_to_d_run_is_reported_as_without_ports(run, box):
    # d-run becomes bwrap, pasta its child (with a range: the ordinary user's here); without a range, pasta
    # starts bwrap and Debian 12's pasta (passt 2023.03) exits 0 on SIGTERM and SIGQUIT.
    assert killed(run, box, signal.SIGTERM) == -signal.SIGTERM


def test_ctrl_c_and_exit_status_on_a_terminal(run, box):
    port = free_port()
    d_run = [str(run.script), "-p", f"{port}:80", str(box), "sh"]
    sleeper = "busybox sh -c 'echo st''arted; exec sleep 4321'\n"
    steps = [("# ", sleeper), ("started", "\x03"), ("# ", "echo al''ive; exit 5\n"), ("alive", "")]
    started = time.monotonic()
    output, status = on_terminal(run, d_run, steps)
    assert status == 5, output
    assert time.monotonic() - started < 15  # the sleep did not run out its time
    assert "job control turned off" not in output  # the shell owns the terminal, as without -p
    assert wait_until(lambda: not pastas(port))


def test_help_describes_publishing(run):
    done = run("--help")
    assert done.returncode == 0
    for words in ["-p [HOST_ADDR:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]", "--publish", "ports", "apt-get install passt"]:
        assert words in done.stdout


def test_without_ports_there_is_still_no_network(run, box):
    (box / "config.json").write_text(json.dumps(IMAGE_CONFIG | {"ports": []}))
    interfaces = run.out(str(box), "cat", "/proc/net/dev").splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]
    published_ = run.out("-p", f"{free_port()}:80", str(box), "cat", "/proc/net/dev").splitlines()[2:]
    assert len(published_) == 2  # lo and pasta's interface


def test_nothing_of_pasta_reaches_the_container(run, box):
    # pasta ignores SIGPIPE and blocks SIGUSR1 in what it starts: a container inheriting that would see
    # EPIPE instead of dying, and never get SIGUSR1.
    status = run.out("-p", f"{free_port()}:80", str(box), "grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status")
    assert status == "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"


def test_ports_from_config_json(run, box):
    port = free_port()
    (box / "config.json").write_text(json.dumps(IMAGE_CONFIG | {"ports": [f"{port}:80"]}))
    with Started(run, str(box), "busybox", "httpd", "-f", "-p", "80", "-h", "/www"):
        assert fetch(port, time.monotonic() + 20) == PAGE


def test_an_image_config_cannot_publish_itself(registry, run, template):
    # The image's config becomes config.json, d-run's keys written over it; a hostile image asks for
    # its port 22 on every address of the host.
    hostile = {"Cmd": ["sh"], "ports": ["0.0.0.0:2222:22"], "net": True}
    push(registry.host, "hostile-ports", "latest", Image(layers=[busybox_tar()], config=hostile))
    folder = Path(tempfile.mkdtemp(dir=template)) / "pulled"
    done = d_pull(f"{registry.host}/hostile-ports:latest", str(folder), cache=folder.parent / "cache")
    assert done.returncode == 0, done.stderr
    config = json.loads((folder / "config.json").read_text())
    assert (config["ports"], config["net"]) == ([], False)
    folder.parent.chmod(0o755)
    run.own(folder)
    interfaces = run.out(str(folder), "cat", "/proc/net/dev").splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]


# ----- errors: one line, exit status 1, no traceback ---------------------------------------------------------


def test_pasta_missing(run, box):
    bin_only = Path(tempfile.mkdtemp(dir=box.parent))
    (bin_only / "bwrap").symlink_to("/usr/bin/bwrap")
    run.own(bin_only)
    done = run("-p", f"{free_port()}:80", str(box), "true", env={"PATH": str(bin_only)})
    assert_error(done, 1, "pasta", "not installed", "apt-get install passt")


def test_bwrap_missing_with_ports_is_one_line_before_pasta_starts(run, box):
    pasta_only = Path(tempfile.mkdtemp(dir=box.parent))
    (pasta_only / "pasta").symlink_to("/usr/bin/pasta")
    run.own(pasta_only)
    done = run("-p", f"{free_port()}:80", str(box), "true", env={"PATH": str(pasta_only)})
    assert_error(done, 1, "bwrap is not installed", "apt-get install bubblewrap")


def test_tun_not_usable(run, box):
    if os.geteuid() != 0:
        pytest.skip("only root may change /dev/net/tun")
    mode = os.stat("/dev/net/tun").st_mode & 0o7777
    os.chmod("/dev/net/tun", 0o600)
    try:
        done = run("-p", f"{free_port()}:80", str(box), "true")
    finally:
        os.chmod("/dev/net/tun", mode)
    assert_error(done, 1, "/dev/net/tun", "readable and writable", "0666")


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_host_port_in_use(run, box, kind):
    (box / "config.json").write_text(json.dumps(IMAGE_CONFIG | {"Volumes": {"/data": {}}}))
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        port = taken.getsockname()[1]
        protocol = "tcp" if kind == socket.SOCK_STREAM else "udp"
        done = run("-p", f"{port}:80/{protocol}", str(box), "true")
    assert_error(done, 1, f"host port 127.0.0.1:{port}/{protocol} is already in use")
    assert not (box / "volumes").exists()  # refused before the anonymous volume was made


def test_a_port_released_soon_after_the_start_is_waited_for(run, box):
    """The pasta of a container that has just ended is ended a moment after its d-run's status is out: the next
    d-run of the same port waits (bounded) for it, as for this listener closed shortly after the start."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        threading.Timer(0.5, taken.close).start()
        done = run("-p", f"{port}:80", str(box), "sh", "-c", "exit 7")
    assert (done.returncode, done.stderr) == (7, "")


def test_privileged_host_port(run, box):
    if Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() in ("0", "1"):
        pytest.skip("this host lets every user bind port 1")
    assert_error(run("-p", "1:80", str(box), "true"), 1, "host port 127.0.0.1:1/tcp", "below", "8080:80")


@pytest.mark.parametrize(
    "flags, config, words",
    [
        (["-p", "80"], {}, ["-p 80:", "HOST_PORT:CONTAINER_PORT"]),
        (["-p", "8080:80/sctp"], {}, ["tcp or udp"]),
        (["-p", "99999:80"], {}, ["'99999' is not a port number"]),
        (["-p", "::1:8080:80"], {}, ["not an IP address", "[::1]"]),
        (["-p", "8080:80", "-p", "8080:81"], {}, ["published twice"]),
        (["-p", "8080:80", "-n"], {}, ["-p and -n exclude each other"]),
        ([], {"ports": ["8080:80"], "net": True}, ["-p and -n exclude each other"]),
        ([], {"ports": "8080:80"}, ["'ports' must be a list of strings"]),
        ([], {"ports": ["8080"]}, ["config.json 'ports': 8080:"]),
    ],
)
def test_malformed_ports(run, box, flags, config, words):
    (box / "config.json").write_text(json.dumps(IMAGE_CONFIG | config))
    assert_error(run(*flags, str(box), "true"), 1, *words)


def test_root_publishes_a_port_and_pasta_ends_with_the_container(box):
    if os.geteuid() != 0:
        pytest.skip("the tests do not run as root")
    as_root = Runner(Path(sys.executable).parent / "d-run", {"PATH": os.environ["PATH"]})
    subprocess.run(["chown", "-R", "root:root", str(box)], check=True)  # root trusts only its own folders
    port = free_port()
    with Started(as_root, "-p", f"{port}:80", str(box), "busybox", "httpd", "-f", "-p", "80", "-h", "/www"):
        assert fetch(port, time.monotonic() + 20) == PAGE
        assert pastas(port)
    assert wait_until(lambda: not pastas(port))  # d-run (bwrap's monitor) was killed: pasta followed it


def test_ctrl_c_ends_a_foreground_command_as_without_ports(run, box):
    sleeper = ["sh", "-c", "echo star''ted; exec sleep 4321"]
    statuses = []
    for flags in ([], ["-p", f"{free_port()}:80"]):
        started = time.monotonic()
        output, status = on_terminal(run, [str(run.script), *flags, str(box), *sleeper], [("started", "\x03")])
        assert time.monotonic() - started < 15, output  # the sleep did not run out its time
        statuses.append(status)
    assert statuses == [-signal.SIGINT] * 2  # d-run dies of SIGINT (a shell says 130), with or without -p
