"""Published ports (`d-run -p`): parse and check them, and serve them with pasta (start_pasta, pasta_argv).

pasta (Debian's `passt`) gives the container its own network namespace with outbound access and
forwards the published host ports into it; nothing else of the host's network, its loopback
services included, is reachable from inside. Standard library only, and cheap to import: d-run's
start-up is measured; `socket` is imported only when there are ports.
"""

import os
from collections import namedtuple

from .errors import Error
from .locks import soon
from .store import read_setting

HOST_ROOT = os.geteuid() == 0  # d-run's user as it starts: in a namespace of its own (overlay.py) a user is 0 too
NOBODY = 65534  # whom pasta becomes when root starts it, by default; d-run's root pasta too (userns.namespaces)
NS_GET_USERNS = 0xB701  # ioctl: the user namespace owning a namespace
DEFAULT_ADDRESS = "127.0.0.1"  # published on the host's loopback unless an address is given
TUN = "/dev/net/tun"
# pasta's own sockets (the host ports it listens on) are inherited by the command it starts; left
# open, a UDP one would let the container send to the host's loopback. So pasta starts this small
# program, which keeps only d-run's descriptors, lets any user inside bind ports below 1024 in the
# container's namespace (as Docker does: bwrap's user namespace does not own pasta's network one),
# undoes pasta's ignored SIGPIPE and blocked SIGUSR1, then execs bwrap: no Python stays behind.
STARTER = """\
import os, signal, sys
start = 3
for fd in sorted(int(fd) for fd in sys.argv[1].split(",") if fd):
    os.closerange(start, fd)
    start = fd + 1
os.closerange(start, os.sysconf("SC_OPEN_MAX"))
try:
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as setting:
        setting.write("0")
except OSError as err:
    print(f"d-run: warning: ports below 1024 need root inside: {err.strerror}", file=sys.stderr)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
os.execvp(sys.argv[2], sys.argv[2:])
"""


class Port(namedtuple("Port", "address host_port container_port protocol")):
    """One published port: pasta listens on the host's address and port, and forwards to the container's."""

    __slots__ = ()

    def __str__(self) -> str:
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{address}:{self.host_port}/{self.protocol}"


def port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def host_address(text: str) -> str:
    """An IPv4 address, or an IPv6 one in brackets ([::1]), as the address without brackets."""
    import socket

    family, address = socket.AF_INET, text
    if text.startswith("[") and text.endswith("]"):
        family, address = socket.AF_INET6, text[1:-1]
    try:
        socket.inet_pton(family, address)
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not an IP address (IPv6 in brackets: [::1])") from None
    return address


def parse_port(spec: str) -> Port:
    """`[HOST_ADDR:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]`, as Docker's -p (without ranges)."""
    ports, slash, protocol = spec.partition("/")
    if slash and protocol not in ("tcp", "udp"):
        raise ValueError(f"the protocol must be tcp or udp, not {protocol!r}")
    rest, _, container_port = ports.rpartition(":")
    address, _, host_port = rest.rpartition(":")  # a bracketed IPv6 address holds no colon outside []
    if not host_port:
        raise ValueError("expected [HOST_ADDR:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]")
    address = host_address(address) if address else DEFAULT_ADDRESS
    return Port(address, port_number(host_port), port_number(container_port), protocol or "tcp")


def parse_ports(specs: list[str], source: str) -> tuple[Port, ...]:
    """Every spec parsed, each host address, port and protocol published once; errors name `source`."""
    published: dict[tuple, Port] = {}
    for spec in specs:
        try:
            port = parse_port(spec)
        except ValueError as err:
            raise Error(
                f"{source} {spec}: {err}", "write it as [HOST_ADDR:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]"
            ) from None
        key = (port.address, port.host_port, port.protocol)
        if key in published:
            raise Error(f"{source} {spec}: host port {port} is published twice", "publish each host port once")
        published[key] = port
    return tuple(published.values())


def published(flags: list[str], configured: tuple[str, ...], network: bool) -> tuple[Port, ...]:
    """The ports to publish: -p's, else config.json's (flags win, as for every key)."""
    specs, source = (flags, "-p") if flags else (configured, "config.json 'ports':")
    chosen = parse_ports(list(specs), source)
    if chosen and network:
        raise Error("-p and -n exclude each other: with -n the container's ports are the host's", "drop one of them")
    return chosen


def check_free(port: Port) -> None:
    """The host port can be bound now, as pasta will: else a one-line Error saying why."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in port.address else socket.AF_INET
    kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pasta: TIME_WAIT is no obstacle
        try:
            soon(lambda: probe.bind((port.address, port.host_port)), errno.EADDRINUSE)  # a pasta ending
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise Error(f"host port {port} is already in use", "publish another host port with -p") from None
            if err.errno == errno.EACCES:
                lowest = read_setting("/proc/sys/net/ipv4/ip_unprivileged_port_start").strip() or "1024"
                raise Error(
                    f"host port {port}: only root may bind ports below {lowest}",
                    "publish a higher host port, e.g. -p 8080:80",
                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise Error(
                    f"host port {port}: {port.address} is not an address of this host",
                    "give one of its addresses, or none for 127.0.0.1",
                ) from None
            raise Error(f"host port {port}: {err.strerror}") from None


NO_BWRAP = (  # d-run's error, and pasta's before it would start bwrap
    "bwrap is not installed (no executable bwrap on PATH)",
    "install bubblewrap: apt-get install bubblewrap, dnf install bubblewrap, or pacman -S bubblewrap",
)


def find_program(name: str, path: str | None = None) -> str | None:
    """shutil.which(name, path=path) for d-run, whose start-up `import shutil` would cost 5 ms (fnmatch imports `re`)."""
    path = os.environ.get("PATH", os.defpath) if path is None else path
    for candidate in [name] if "/" in name else [os.path.join(folder, name) for folder in path.split(os.pathsep)]:
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def check_ready(ports: tuple[Port, ...], path: str) -> None:
    """Everything pasta needs, checked before d-run execs it: after that, only pasta's own messages reach the user."""
    if find_program("pasta", path) is None:
        raise Error(
            "-p needs pasta, which is not installed (no executable pasta on PATH)",
            "install passt: apt-get install passt",
        )
    if find_program("bwrap", path) is None:  # pasta would start it: its failure would be a traceback there
        raise Error(*NO_BWRAP)
    try:  # pasta makes its tap device through /dev/net/tun
        os.close(os.open(TUN, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        raise Error(
            f"-p needs {TUN}, which cannot be opened for reading and writing: {err.strerror}",
            f"it must exist and be readable and writable by you (mode 0666 on common distributions: as root, chmod 0666 {TUN})",
        ) from None
    for port in ports:
        check_free(port)


def forward_options(ports: tuple[Port, ...], protocol: str) -> list[str]:
    """pasta's -t or -u options for the ports of `protocol`; "none" when there are none (its default,
    "auto", would publish every port the container listens on)."""
    option = "-t" if protocol == "tcp" else "-u"
    specs = [f"{port.address}/{port.host_port}:{port.container_port}" for port in ports if port.protocol == protocol]
    return [arg for spec in specs or ["none"] for arg in (option, spec)]


def pasta_argv(ports: tuple[Port, ...], python: str, keep_fds: list[int], bwrap: list[str]) -> list[str]:
    """pasta, in the foreground, starting bwrap (through STARTER, run by `python`) in its network namespace."""
    starter = [python, "-I", "-S", "-c", STARTER, ",".join(map(str, keep_fds))]
    return [*pasta_options(ports), "--", *starter, *bwrap]


def pasta_options(ports: tuple[Port, ...]) -> list[str]:
    """-T/-U none, --no-map-gw: no port of the host's loopback is forwarded inside, nor is its gateway mapped."""
    argv = ["pasta", "--quiet", "--foreground", "--config-net", "--no-map-gw", "-T", "none", "-U", "none"]
    return argv + forward_options(ports, "tcp") + forward_options(ports, "udp")


def start_pasta(ports: tuple[Port, ...], netns_fd: int) -> None:
    """pasta, in the host's network, serving d-run's network namespace `netns_fd` as the user of the namespace owning
    it (d-run's, or under root nobody's) until d-run's process, then bwrap's, ends; ready once it writes its pid."""
    import ctypes
    import fcntl
    import select
    import signal
    import subprocess

    if HOST_ROOT:  # root's pasta, nobody by then, opens its pid pipe anew (/proc/self/fd): the pipe must be nobody's
        os.seteuid(NOBODY)
    ready_read, ready_write = os.pipe()  # both closed on d-run's exec, as `monitor`
    if HOST_ROOT:
        os.seteuid(0)
    fds = (fcntl.ioctl(netns_fd, NS_GET_USERNS), netns_fd, ready_write)
    # a user who is 0 in the overlay's namespace (overlay.py) stays themselves: pasta, started as 0, would be nobody
    runas = f"{NOBODY}:{NOBODY}" if HOST_ROOT else "0:0" if os.geteuid() == 0 else ""
    argv = [*pasta_options(ports), *["--runas", runas] * bool(runas)]
    paths = [f"/proc/self/fd/{fd}" for fd in fds]
    argv += ["--userns", paths[0], "--netns", paths[1], "--pid", paths[2]]
    monitor = os.pidfd_open(os.getpid())
    if os.fork() == 0:  # pasta's parent, d-run's user still (bwrap's monitor may be another uid, whose end would
        try:  # not signal root's pasta), ending pasta when the monitor ends, as its own end does (PR_SET_PDEATHSIG,
            # 1; root's pasta loses that signal when it becomes nobody)
            pasta = subprocess.Popen(argv, pass_fds=fds, preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM))
            os.close(ready_write)
            select.select([monitor], [], [])
            pasta.terminate()
        finally:
            os._exit(0)
    os.close(ready_write)
    if not os.read(ready_read, 32):
        raise Error("pasta did not start (see its message above)")
