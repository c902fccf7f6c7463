"""d-run: its argument parsing, image files and seccomp filter, then real containers (real bwrap, the busybox
test image) run as root and as the ordinary user, each flag and config key checked from inside. The bwrap command
line from pure pieces is in test_sandbox.py."""

import io
import json
import os
import pty
import pwd
import select
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from images import busybox_layer

from dutils import seccomp
from dutils.errors import Error
from dutils.rootfs import Root
from dutils.run import make_parser, parse_args, quick_parse, read_image_file
from dutils.store import PullDir, Record

USER = "dutest"
BIN = Path(sys.executable).parent
HOST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
IMAGE_CONFIG = {  # as d-pull writes it for the busybox test image
    "User": "",
    "Hostname": "",
    "WorkingDir": "",
    "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    "Volumes": None,
    "Entrypoint": None,
    "Cmd": ["sh"],
    "net": False,
    "rw": False,
}
# The host's python3 inside the busybox image, for what busybox cannot do (ioctl).
HOST_PYTHON = ["-v", "/usr:/usr:ro", "-v", "/lib:/lib:ro", "-v", "/lib64:/lib64:ro"]


# ----- pure pieces ------------------------------------------------------------------------------------


def test_image_files_are_read_inside_the_image(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd.real").write_text("inside")
    (rootfs / "etc" / "passwd").symlink_to("/etc/passwd.real")  # absolute: the image's, not the host's
    (rootfs / "etc" / "group").symlink_to("../../../../../etc/passwd.real")
    (rootfs / "etc" / "shadow").symlink_to("/etc/missing")
    (rootfs / "loop").symlink_to("loop")
    with Root(os.open(tmp_path, os.O_PATH), "rootfs") as root:
        assert read_image_file(root, "/etc/passwd") == "inside"
        assert read_image_file(root, "etc/group") == "inside"
        assert read_image_file(root, "etc/shadow") == ""
        with pytest.raises(Error, match="Too many levels of symbolic links"):
            read_image_file(root, "/loop/x")


# ----- the seccomp filter, run by a small classic-BPF interpreter ---------------------------------------


def run_filter(program: bytes, nr: int, arch: int, arg1: int = 0) -> int:
    """The seccomp action `program` returns for one call, as the kernel would evaluate it."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, 0, arg1, 0, 0, 0, 0)
    code = [struct.unpack_from("=HBBI", program, offset) for offset in range(0, len(program), 8)]
    pc, acc = 0, 0
    for _ in code:  # jumps only go forward: at most one step per instruction
        op, jt, jf, k = code[pc]
        if op == seccomp.LD_W_ABS:
            acc, pc = struct.unpack_from("=I", data, k)[0], pc + 1
        elif op == seccomp.AND_K:
            acc, pc = acc & k, pc + 1
        elif op == seccomp.JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif op == seccomp.RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
    raise AssertionError("the program runs off its end")


EPERM, ENOSYS = seccomp.RET_ERRNO | 1, seccomp.RET_ERRNO | 38
SUCCEED, ALLOW = seccomp.RET_ERRNO | 0, seccomp.RET_ALLOW
X86_64, I386, AARCH64, ARM = (table.arch for table in (seccomp.X86_64, seccomp.I386, seccomp.AARCH64, seccomp.ARM))
TCGETS = 0x5401


@pytest.mark.parametrize(
    "machine, nr, arch, arg1, action",
    [
        ("x86_64", 16, X86_64, seccomp.TIOCSTI, EPERM),
        ("x86_64", 16, X86_64, 0xFFFFFFFF_00000000 | seccomp.TIOCSTI, EPERM),  # the tty layer truncates it
        ("x86_64", 16, X86_64, seccomp.TIOCLINUX, EPERM),
        ("x86_64", 16, X86_64, TCGETS, ALLOW),
        ("x86_64", 1, X86_64, seccomp.TIOCSTI, ALLOW),  # write(2), whatever its arguments
        ("x86_64", 92, X86_64, 0, SUCCEED),
        ("x86_64", 260, X86_64, 0, SUCCEED),
        ("x86_64", seccomp.X32_BIT | 514, X86_64, seccomp.TIOCSTI, EPERM),  # x32's ioctl
        ("x86_64", seccomp.X32_BIT | 93, X86_64, 0, SUCCEED),
        ("x86_64", 54, I386, seccomp.TIOCSTI, EPERM),
        ("x86_64", 54, I386, TCGETS, ALLOW),
        ("x86_64", 212, I386, 0, SUCCEED),
        ("x86_64", 16, AARCH64, 0, ENOSYS),  # a table the host has not
        ("aarch64", 29, AARCH64, seccomp.TIOCSTI, EPERM),
        ("aarch64", 54, AARCH64, 0, SUCCEED),
        ("aarch64", 64, AARCH64, 0, ALLOW),
        ("aarch64", 54, ARM, seccomp.TIOCLINUX, EPERM),
        ("aarch64", 325, ARM, 0, SUCCEED),
        ("aarch64", 16, X86_64, 0, ENOSYS),
    ],
)
def test_seccomp_filter(machine, nr, arch, arg1, action):
    assert run_filter(seccomp.filter_program(machine), nr, arch, arg1) == action


def test_no_filter_for_unknown_machines():
    assert seccomp.filter_program("riscv64") is None


# All that `import dutils.run` and reading a run's JSON may load beyond what site loads (os): every
# module costs each start. Not `re` (nor json's decoder, which imports it), enum (`signal`'s), pathlib, ctypes,
# argparse, typing, dataclasses, shutil, subprocess, struct, warnings...
START_UP_MODULES = {"__future__", "_collections", "_functools", "_json", "_operator", "collections"}
START_UP_MODULES |= {"collections.abc", "contextlib", "errno", "fcntl", "functools", "itertools", "keyword", "operator"}
START_UP_MODULES |= {"reprlib", "types"}


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_start_up_loads_only_what_a_run_needs(python):
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python}")
    code = (
        f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r}); before = set(sys.modules)\n"
        "from dutils import run, store, sandbox\n"
        'assert store.load_json(b\' {"Cmd": ["sh", "\\\\u00e9"], "n": null, "x": -1.5e3}\\n\')[\'n\'] is None\n'
        "assert sandbox.parse_entrypoint('[\"/bin/sh\", \"-c\"]') == ('/bin/sh', '-c')\n"
        "print(*sorted(name for name in set(sys.modules) - before if not name.startswith('dutils')))"
    )
    done = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert set(done.stdout.split()) <= START_UP_MODULES


@pytest.mark.parametrize(
    "argv",
    [
        ["DIR"],
        ["DIR", "ls", "-l"],
        ["DIR", "--", "ls", "--", "x"],
        ["DIR", "-n", "--help"],
        ["-n", "--rw", "--debug", "DIR", "id"],
        ["-w", "/srv", "--tmpfs", "/run:size=4096", "--tmpfs=/var/cache", "DIR"],
        ["--entrypoint", '["/bin/sh", "-c"]', "DIR", "echo hi"],
        ["--net", "--rw", "DIR"],
        ["-v", "/data", "-v", "/h:/c:ro", "--volume=/x", "--volume", "./s:/s", "DIR"],
        ["-e", "A=1", "--env", "B", "--env=C=2=3", "--env-file", "f", "--env-file=g", "DIR", "sh"],
        ["-u", "app:staff", "--user=0", "--workdir", "/srv/", "--hostname=web", "--entrypoint", "", "DIR"],
        ["--entrypoint=", "DIR", "-u", "x"],
    ],
)
def test_the_quick_parser_reads_as_argparse_does(argv):
    quick = quick_parse(argv)
    assert quick is not None and vars(quick) == vars(make_parser().parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-h"],
        ["--help"],
        ["-nw", "DIR"],  # grouped flags
        ["--deb", "DIR"],  # an abbreviation
        ["--no-such-flag", "DIR"],
        ["-v", "relative", "DIR"],
        ["-e", "=x", "DIR"],
        ["--workdir", "here", "DIR"],
        ["--tmpfs", "/run:size=1g", "DIR"],
        ["--entrypoint", "[sh", "DIR"],
        ["-u", "-1", "DIR"],
        ["--net=yes", "DIR"],
        ["-v"],
        ["--", "DIR"],
    ],
)
def test_the_quick_parser_leaves_the_rest_to_argparse(argv):
    assert quick_parse(argv) is None


def test_argparse_reads_what_the_quick_parser_leaves():
    assert vars(parse_args(["-nw/srv", "--deb", "DIR", "x"])) == vars(
        quick_parse(["-n", "-w", "/srv", "--debug", "DIR", "x"])
    )


# ----- real containers, as root and as the ordinary user ------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """How to start d-run: its script, its environment, and the user to become (None: stay who we are)."""

    script: Path
    env: dict
    user: str | None = None

    def popen_args(self) -> dict:
        """subprocess arguments that become the user: no process in between (runuser would be one),
        so that signals and exit statuses are d-run's own."""
        return {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}

    def own(self, *paths: Path) -> None:
        """Give `paths` (recursively) to the user d-run runs as, as if they had made them."""
        if self.user:
            subprocess.run(["chown", "-R", "-h", f"{self.user}:{self.user}", *map(str, paths)], check=True)

    def __call__(self, *args: str, env: dict | None = None, cwd: Path | None = None, pass_fds: tuple = ()):
        return subprocess.run(
            [str(self.script), *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=self.env | (env or {}),
            timeout=30,
            cwd=cwd or "/",
            pass_fds=pass_fds,
            **self.popen_args(),
        )

    def out(self, *args: str, **kwargs) -> str:
        """The standard output of a run that must succeed."""
        done = self(*args, **kwargs)
        assert done.returncode == 0, (done.returncode, done.stderr)
        return done.stdout


@pytest.fixture(scope="session")
def workspace():
    """A folder the ordinary user can reach (pytest's tmp_path is private to root), with the busybox
    image's rootfs to copy pull folders from."""
    root = Path(tempfile.mkdtemp(prefix="d-utils-run-"))
    root.chmod(0o755)
    with tarfile.open(fileobj=io.BytesIO(busybox_layer())) as layer:
        layer.extractall(root / "template" / "rootfs")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", params=["root", "ordinary-user"])
def run(request, bwrap) -> Runner:
    """d-run as root (this tree's, installed beside pytest's python), then as the ordinary user (installed
    for Debian's python, not editable)."""
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("the tests do not run as root")
        return Runner(BIN / "d-run", HOST_ENV)
    unprivileged = request.getfixturevalue("unprivileged")
    return Runner(unprivileged.bin / "d-run", unprivileged.env, USER if unprivileged.as_root else None)


def configure(folder: Path, **changes) -> None:
    """Write config.json as d-pull would, with the user's `changes`."""
    (folder / "config.json").write_text(json.dumps(IMAGE_CONFIG | changes))


def write_record(folder: Path, complete: bool) -> None:
    record = Record(reference="busybox:latest", digest="sha256:" + "0" * 64, platform="linux/amd64", complete=complete)
    PullDir(folder).write_record(record)
    (folder / "image.json").chmod(0o644)  # the ordinary user reads what root wrote here


@pytest.fixture
def box(workspace, run) -> Path:
    """A fresh, complete pull folder named `busybox`, owned by the user who runs d-run."""
    folder = Path(tempfile.mkdtemp(dir=workspace)) / "busybox"
    folder.parent.chmod(0o755)
    subprocess.run(["cp", "-a", str(workspace / "template"), str(folder)], check=True)
    configure(folder)
    write_record(folder, complete=True)
    run.own(folder.parent)
    return folder


# An HTTP request to 127.0.0.1:PORT from inside (busybox's wget crashes when refused; nc does not).
FETCH = ["sh", "-c", 'printf "GET / HTTP/1.0\\r\\n\\r\\n" | busybox nc 127.0.0.1 "$0"']


@pytest.fixture(scope="session")
def web():
    """The port of a web server on the host's loopback: reachable from a container only when it shares the network."""

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the host\n")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield str(server.server_address[1])
    server.shutdown()
    thread.join(timeout=5)


def test_echo_and_exit_status(run, box):
    hi = run(str(box), "echo", "hi")
    assert (hi.returncode, hi.stdout, hi.stderr) == (0, "hi\n", "")
    assert run(str(box), "sh", "-c", "exit 7").returncode == 7


def test_death_by_signal_is_reported_as_a_shell_does(run, box):
    assert run(str(box), "sh", "-c", "kill -TERM $$").returncode == 143


def test_defaults_seen_from_inside(run, box):
    groups = "" if run.user else " groups=0(root)"  # root takes the image's groups; a user keeps their one group
    assert run.out(str(box), "id") == f"uid=0(root) gid=0(root){groups}\n"
    assert run.out(str(box), "hostname") == "busybox\n"
    assert run.out(str(box), "pwd") == "/\n"
    env = run.out(str(box), "env", env={"SECRET": "host only"}).splitlines()
    assert sorted(env) == ["HOME=/root", "HOSTNAME=busybox", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PWD=/"]
    assert "busybox" in run.out(str(box), "cat", "/etc/hosts")
    write = run(str(box), "touch", "/made-here")
    assert write.returncode == 1 and "Read-only file system" in write.stderr
    assert not (box / "rootfs" / "made-here").exists()
    assert run.out(str(box), "sh", "-c", "touch /tmp/scratch && echo ok") == "ok\n"
    interfaces = run.out(str(box), "cat", "/proc/net/dev").splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]
    assert run.out(str(box), "sh", "-c", "echo $$") == "2\n"  # its own pid namespace (bwrap is pid 1)


def test_nothing_of_the_python_process_reaches_the_container(run, box, workspace):
    # Python ignores SIGPIPE and SIGXFSZ; a container that inherited that would see EPIPE, not die.
    assert run.out(str(box), "grep", "SigIgn", "/proc/self/status") == "SigIgn:\t0000000000000000\n"
    # A descriptor left open by d-run's caller is not handed on into the container.
    with open(workspace / "template" / "rootfs" / "etc" / "passwd", "rb") as private:
        os.dup2(private.fileno(), 42)
        try:
            listing = run.out(str(box), "ls", "/proc/self/fd", pass_fds=(42,))
        finally:
            os.close(42)
    assert "42" not in listing.split()


def test_a_run_loads_nothing_more_up_to_its_exec(run, box):
    """A plain run, up to bwrap's exec, loads only what importing d-run does, ctypes' C module for root's namespace
    and pwd (a user's name, for its ranges): not ctypes, shutil (with `re`), warnings (os.execvp's), struct..."""
    python = run.script.read_text().splitlines()[0].removeprefix("#!")
    code = (
        "import os, sys; before = set(sys.modules); from dutils import run\n"
        "def execv(*argv): print(*sorted(set(sys.modules) - before)); sys.stdout.flush(); os._exit(0)\n"
        f"os.execv = execv; run.main([{str(box)!r}, 'true'])"
    )
    done = subprocess.run(
        [python, "-I", "-c", code], capture_output=True, text=True, env=run.env, timeout=30, cwd="/", **run.popen_args()
    )
    assert done.returncode == 0, done.stderr
    loaded = {name for name in done.stdout.split() if not name.startswith("dutils")}
    assert loaded - START_UP_MODULES <= {"_ctypes", "pwd"}


def test_cmd_runs_when_no_command_is_given(run, box):
    configure(box, Cmd=["echo", "from", "Cmd"])
    assert run.out(str(box)) == "from Cmd\n"


def test_arguments_keep_the_entrypoint_even_when_they_look_like_options(run, box):
    configure(box, Entrypoint=["echo", "entry:"])
    assert run.out(str(box)) == "entry: sh\n"
    assert run.out(str(box), "-n", "--help") == "entry: -n --help\n"  # neither d-run's -n nor its --help
    assert run.out("--entrypoint", "id", str(box), "-u") == "0\n"
    assert run.out("--entrypoint", "", str(box), "echo", "plain") == "plain\n"
    assert run.out("--entrypoint", '["/bin/sh", "-c"]', str(box), "echo $0", "json") == "json\n"


@pytest.mark.parametrize(
    "flags, config, command, expected",
    [
        (["-u", "1000"], {}, ["sh", "-c", "id -un; id -gn"], "app\napp\n"),
        (["-u", "app"], {}, ["sh", "-c", "id -u; id -g; echo $HOME"], "1000\n1000\n/home/app\n"),
        (["-u", "app:root"], {}, ["sh", "-c", "id -u; id -g"], "1000\n0\n"),
        (["-u", "4321:77"], {}, ["sh", "-c", "id -u; id -g; echo $HOME"], "4321\n77\n/\n"),
        ([], {"User": "app"}, ["id", "-un"], "app\n"),
        (["-u", "root"], {"User": "app"}, ["id", "-un"], "root\n"),
        (
            ["--hostname", "web"],
            {},
            ["sh", "-c", "hostname; grep -c web /etc/hosts; cat /etc/hostname"],
            "web\n1\nweb\n",
        ),
        ([], {}, ["cat", "/etc/hostname"], "busybox\n"),
        (["-w", "/srv/app"], {}, ["pwd"], "/srv/app\n"),
        ([], {"Hostname": "cfg"}, ["sh", "-c", "hostname; echo $HOSTNAME"], "cfg\ncfg\n"),
        (["--workdir", "/home/app"], {}, ["pwd"], "/home/app\n"),
        ([], {"WorkingDir": "/etc"}, ["pwd"], "/etc\n"),
        (["--workdir", "/"], {"WorkingDir": "/etc"}, ["pwd"], "/\n"),
        (["-e", "A=1", "-e", "PATH=/bin"], {}, ["sh", "-c", "echo $A $PATH"], "1 /bin\n"),
        ([], {"Env": ["PATH=/bin", "GREETING=hello"]}, ["sh", "-c", "echo $GREETING"], "hello\n"),
        (["-e", "GREETING=bye"], {"Env": ["GREETING=hello"]}, ["sh", "-c", "echo $GREETING"], "bye\n"),
        (["-e", "FROM_HOST", "-e", "NOT_SET"], {}, ["sh", "-c", "echo $FROM_HOST ${NOT_SET-unset}"], "passed unset\n"),
    ],
)
def test_flags_and_config_keys(run, box, flags, config, command, expected):
    configure(box, **config)
    assert run.out(*flags, str(box), *command, env={"FROM_HOST": "passed"}) == expected


def test_env_file(run, box, workspace):
    env_file = Path(tempfile.mkstemp(dir=workspace)[1])
    env_file.write_text("# settings\nA=from file\nB=file\n")
    env_file.chmod(0o644)
    command = [str(box), "sh", "-c", "echo $A, $B"]
    assert run.out("--env-file", str(env_file), "-e", "B=flag", *command) == "from file, flag\n"


def test_tmpfs_on_a_read_only_root(run, box):
    script = "touch /run/x /var/cache/y && grep -E ' /(run|var/cache) ' /proc/mounts && touch /z"
    done = run("--tmpfs", "/run:size=65536", "--tmpfs", "/var/cache", str(box), "sh", "-c", script)
    assert done.returncode == 1 and "Read-only file system" in done.stderr
    assert "tmpfs /run tmpfs rw" in done.stdout and "size=64k" in done.stdout and "tmpfs /var/cache " in done.stdout
    assert not (box / "rootfs" / "run" / "x").exists()


@pytest.mark.parametrize("how", [["--rw"], "config"])
def test_writable_root(run, box, how):
    if how == "config":
        configure(box, rw=True)
    flags = how if isinstance(how, list) else []
    assert run.out(*flags, str(box), "sh", "-c", "echo kept > /made-here && echo ok") == "ok\n"
    assert (box / "rootfs" / "made-here").read_text() == "kept\n"


@pytest.mark.parametrize("how", [["-n"], "config"])
def test_network(run, box, web, how):
    if how == "config":
        configure(box, net=True)
    flags = how if isinstance(how, list) else []
    response = run.out(*flags, str(box), *FETCH, web)
    assert response.startswith("HTTP/1.0 200 OK") and response.endswith("\n\nhello from the host\n")
    assert run.out(*flags, str(box), "cat", "/etc/resolv.conf") == Path("/etc/resolv.conf").read_text()


def test_no_network_by_default(run, box, web):
    refused = run(str(box), *FETCH, web)
    assert refused.returncode == 1 and "Connection refused" in refused.stderr


def test_volumes(run, box, workspace):
    host = Path(tempfile.mkdtemp(dir=workspace))
    (host / "greeting").write_text("from the host\n")
    run.own(host)
    listing = run.out("-v", f"{host}:/volumes-target", str(box), "ls", "/volumes-target")
    assert listing == "greeting\n"
    run.out("-v", f"{host}:/volumes-target", str(box), "sh", "-c", "echo back > /volumes-target/reply")
    assert (host / "reply").read_text() == "back\n"
    read_only = run("-v", f"{host}:/volumes-target:ro", str(box), "touch", "/volumes-target/x")
    assert read_only.returncode == 1 and "Read-only file system" in read_only.stderr
    relative = run.out("-v", f"{host.name}:/in", str(box), "cat", "/in/greeting", cwd=workspace)
    assert relative == "from the host\n"


def test_a_bind_over_d_runs_own_files_wins_and_nothing_is_made_in_it(run, box, workspace):
    """/etc/hosts (and apt's 99d-run) are d-run's only in the image: a user's file bound there is what the container
    sees, as in Docker, and a folder bound over /etc (read-only too) gets no file of ours."""
    host = Path(tempfile.mkdtemp(dir=workspace))
    (host / "hosts").write_text("10.1.2.3 mine\n")
    (host / "etc").mkdir()
    run.own(host)
    assert run.out("-v", f"{host / 'hosts'}:/etc/hosts", str(box), "cat", "/etc/hosts") == "10.1.2.3 mine\n"
    assert run.out("-v", f"{host / 'etc'}:/etc:ro", str(box), "ls", "/etc") == ""
    assert list((host / "etc").iterdir()) == []


def test_anonymous_volumes_live_in_the_pull_folder(run, box):
    run.out("-v", "/cache", str(box), "sh", "-c", "echo 1 > /cache/count")
    assert (box / "volumes" / "cache" / "count").read_text() == "1\n"
    assert run.out("-v", "/cache", str(box), "cat", "/cache/count") == "1\n"  # kept between runs
    configure(box, Volumes={"/home/app": {}, "/var/lib/data": {}})
    run.out(str(box), "sh", "-c", "echo x > /var/lib/data/f; echo y > /home/app/g")
    assert (box / "volumes" / "var" / "lib" / "data" / "f").read_text() == "x\n"
    assert (box / "volumes" / "home" / "app" / "g").read_text() == "y\n"
    assert not (box / "rootfs" / "home" / "app" / "g").exists()
    # A new anonymous volume starts as a copy of what the image holds there, as Docker's do.
    assert run.out("-v", "/etc", str(box), "cat", "/etc/os-release").startswith('NAME="BusyBox"')
    assert (box / "volumes" / "etc" / "passwd").read_bytes() == (box / "rootfs" / "etc" / "passwd").read_bytes()


@pytest.mark.parametrize("how", ["config", "flag"])
def test_a_missing_working_directory_is_made_as_runc_does(run, box, how):
    # buildah writes WORKDIR without making the folder when no later step does; runc makes it.
    flags = ["--workdir", "/srv/app"] if how == "flag" else []
    if how == "config":
        configure(box, WorkingDir="/srv/app")
    assert run.out(*flags, str(box), "sh", "-c", "pwd; touch /srv/app/x 2>&1 | grep -c Read-only") == "/srv/app\n1\n"
    assert (box / "rootfs" / "srv" / "app").is_dir()  # made by d-run before bwrap: the root stays read-only


def test_chown_succeeds_without_effect_unless_root_maps_every_id(run, box):
    # a user's mapping would leave files it cannot remove: the filter makes chown a no-op; root's is real.
    script = "touch /tmp/f && chown 1234:1234 /tmp/f && stat -c %u /tmp/f"
    assert run.out(str(box), "sh", "-c", script) == ("0\n" if run.user else "1234\n")


def test_apt_is_told_to_stay_root_where_the_image_has_apt(run, box):
    assert run(str(box), "cat", "/etc/apt/apt.conf.d/99d-run").returncode == 1
    assert not (box / "rootfs" / "etc" / "apt").exists()
    (box / "rootfs" / "etc" / "apt" / "apt.conf.d").mkdir(parents=True)
    run.own(box / "rootfs" / "etc" / "apt")
    if run.user:
        assert 'APT::Sandbox::User "root";' in run.out(str(box), "cat", "/etc/apt/apt.conf.d/99d-run")
    else:  # root maps every id: apt switches to _apt for real
        assert run(str(box), "cat", "/etc/apt/apt.conf.d/99d-run").returncode == 1


def test_debug_prints_the_bwrap_command(run, box):
    done = run("--debug", str(box), "echo", "hi")
    assert done.returncode == 0 and done.stdout == "hi\n"
    assert done.stderr.startswith("bwrap --unshare-pid ") and done.stderr.rstrip().endswith("-- echo hi")


def test_help_describes_every_argument(run):
    done = run("--help")
    assert done.returncode == 0
    for word in ["DIR", "COMMAND", "--volume", "--env ", "--env-file", "--user", "--rw", "--net", "--workdir"]:
        assert word in done.stdout
    for word in ["--hostname", "--entrypoint", "--debug", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "TIOCSTI"]:
        assert word in done.stdout


# ----- errors: one line, no traceback ---------------------------------------------------------------------


def assert_error(done: subprocess.CompletedProcess, status: int, *words: str) -> None:
    assert done.returncode == status, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("d-run: error: "), done.stderr
    assert "Traceback" not in done.stderr and (status == 2 or len(lines) == 1), done.stderr
    for word in words:
        assert word in lines[-1]


def test_missing_or_incomplete_folder(run, box, workspace):
    assert_error(run(str(workspace / "nowhere"), "true"), 1, "not a folder made by d-pull", "d-pull IMAGE DIR")
    write_record(box, complete=False)
    assert_error(run(str(box), "true"), 1, "incomplete", f"run the same d-pull again: d-pull busybox:latest {box}")
    (box / "image.json").write_text("[" * 100_000)
    assert_error(run(str(box), "true"), 1, "damaged pull record (nested too deeply)")


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", ["config.json: not valid JSON"]),
        ("[" * 100_000, ["config.json: not valid JSON", "nested too deeply"]),
        ('["sh"]', ["must hold a JSON object"]),
        ('{"Cmd": "sh"}', ["'Cmd' must be a list of strings"]),
        ('{"Env": {"A": "1"}}', ["'Env'"]),
        ('{"Volumes": {"relative": {}}}', ["'Volumes'", "absolute"]),
        ('{"net": "yes"}', ["'net' must be a boolean"]),
    ],
)
def test_malformed_config_json(run, box, text, words):
    (box / "config.json").write_text(text)
    assert_error(run(str(box), "true"), 1, *words)


def test_bad_input_errors(run, box):
    assert_error(run("-v", "/nowhere/at/all:/x", str(box), "true"), 1, "/nowhere/at/all does not exist")
    assert_error(run("-u", "nobody", str(box), "true"), 1, "'nobody' is not in the image's /etc/passwd")
    assert_error(run("-u", "app:wheel", str(box), "true"), 1, "'wheel' is not in the image's /etc/group")
    assert_error(run("--workdir", "/etc/passwd", str(box), "true"), 1, "/etc/passwd is not a folder")
    assert_error(run("--env-file", "/no/such/file", str(box), "true"), 1, "--env-file /no/such/file")
    configure(box, Cmd=None)
    assert_error(run(str(box)), 1, "no Entrypoint or Cmd")


def test_usage_errors(run, box):
    assert_error(run(), 2, "DIR")
    assert_error(run("-v", "relative", str(box), "true"), 2, "--volume", "absolute")
    assert_error(run("-e", "=x", str(box), "true"), 2, "--env")
    assert_error(run("--workdir", "here", str(box), "true"), 2, "--workdir")
    assert_error(run("--no-such-flag", str(box)), 2, "--no-such-flag")


def test_bwrap_missing(run, box):
    done = run(str(box), "true", env={"PATH": "/nonexistent"})
    assert_error(done, 1, "bwrap is not installed", "apt-get install bubblewrap")
    (box.parent / "bwrap").write_text("#!/bin/sh\nexit 0\n")  # there, where d-run's user looks, but not executable
    done = run(str(box), "true", env={"PATH": str(box.parent)})
    assert_error(done, 1, "no executable bwrap on PATH", "apt-get install bubblewrap")


def test_user_namespaces_disabled(run, box):
    # A user namespace of our own, where no further one may be made: bwrap would fail there.
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh", str(run.script), str(box), "true"],
        capture_output=True,
        text=True,
        env=run.env,
        timeout=30,
        **run.popen_args(),
    )
    assert_error(done, 1, "max_user_namespaces is 0", "sysctl")


def test_traceback_only_with_debug(run, box):
    assert "Traceback" in run("--debug", "-u", "nobody", str(box), "true").stderr


# ----- signals, terminals and sessions ---------------------------------------------------------------------


def processes_running(argv: list[str]) -> list[int]:
    """The pids whose command line is exactly `argv`."""
    wanted = ("\0".join(argv) + "\0").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == wanted:
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return pids


def wait_until(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_sigterm_to_d_run_ends_the_container(run, box):
    sleeper = ["sleep", str(100_000 + os.getpid())]  # a command line no one else runs
    script = f"echo ready; exec {' '.join(sleeper)}"
    process = subprocess.Popen(
        [str(run.script), str(box), "sh", "-c", script], stdout=subprocess.PIPE, env=run.env, **run.popen_args()
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready and process.stdout.readline() == b"ready\n"
        assert wait_until(lambda: processes_running(sleeper))
        # d-run exec'd bwrap: the process we started is bwrap itself, no Python stays behind.
        assert Path(f"/proc/{process.pid}/comm").read_text() == "bwrap\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == -signal.SIGTERM
        assert wait_until(lambda: not processes_running(sleeper))
    finally:
        process.kill()
        process.wait(timeout=10)
        process.stdout.close()


def on_terminal(run: Runner, argv: list[str], steps: list[tuple[str, str]], timeout: float = 20) -> tuple[str, int]:
    """Run `argv` as `run`'s user and with its environment, leading a new session on a new pseudo-terminal,
    as a login would.

    For each (expect, send) step, wait for `expect` in the output that follows the previous match, then
    type `send`. Returns the whole output and the exit status; the run is killed after `timeout`.
    """
    account = pwd.getpwnam(run.user) if run.user else None
    pid, terminal = pty.fork()
    if pid == 0:  # the child: become the user, then the command
        try:
            if account:
                os.setgroups([])
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)
            os.execve(argv[0], argv, run.env | {"TERM": "dumb"})
        finally:
            os._exit(127)
    output, position, pending = b"", 0, list(steps)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if pending and (found := output.find(pending[0][0].encode(), position)) >= 0:
                expect, send = pending.pop(0)
                position = found + len(expect)
                os.write(terminal, send.encode())
            readable, _, _ = select.select([terminal], [], [], 0.1)
            try:
                chunk = os.read(terminal, 4096) if readable else b""
            except OSError:  # EIO: every process holding the terminal has ended
                break
            if readable and not chunk:
                break
            output += chunk
    finally:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(terminal)
    assert not pending, f"never saw {pending[0][0]!r} in {output!r}"
    return output.decode(errors="replace"), os.waitstatus_to_exitcode(status)


def test_interactive_shell_runs_a_command_and_exits(run, box):
    steps = [("# ", "echo $((6 * 7))\n"), ("42", ""), ("# ", "exit 3\n")]
    output, status = on_terminal(run, [str(run.script), str(box), "sh"], steps)
    assert status == 3 and "\n42\r\n" in output, output
    assert "job control turned off" not in output  # the shell owns the terminal


def test_ctrl_c_reaches_the_foreground_job_and_the_shell_goes_on(run, box):
    # The marker is printed by the foreground job itself, after the shell gave it the terminal.
    sleeper = "busybox sh -c 'echo st''arted; exec sleep 4321'\n"
    steps = [("# ", sleeper), ("started", "\x03"), ("# ", "echo al''ive; exit 5\n"), ("alive", "")]
    started = time.monotonic()
    output, status = on_terminal(run, [str(run.script), str(box), "sh"], steps)
    assert status == 5, output
    assert time.monotonic() - started < 15  # the sleep did not run out its time


def test_keystrokes_cannot_be_pushed_into_the_terminal(run, box):
    code = (
        "import fcntl, termios, errno\n"
        "for name in ['TIOCSTI', 'TIOCLINUX', 'TIOCGWINSZ']:\n"
        "    try:\n"
        "        fcntl.ioctl(0, getattr(termios, name), bytes(8)); print(name, 'ok')\n"
        "    except OSError as err:\n"
        "        print(name, errno.errorcode[err.errno])\n"
    )
    argv = [str(run.script), *HOST_PYTHON, str(box), "/usr/bin/python3", "-c", code]
    output, status = on_terminal(run, argv, [])
    assert status == 0, output
    assert output.split("\r\n")[:3] == ["TIOCSTI EPERM", "TIOCLINUX EPERM", "TIOCGWINSZ ok"]


def test_without_a_terminal_on_stdin_the_container_gets_a_new_session(run, box):
    probe = "echo > /dev/tty && echo has-terminal || echo no-terminal"
    d_run = [str(run.script), str(box), "sh", "-c", probe]
    output, status = on_terminal(run, d_run, [])
    assert (status, output.splitlines()[-1]) == (0, "has-terminal")
    output, status = on_terminal(run, ["/bin/sh", "-c", 'exec "$@" < /dev/null', "sh", *d_run], [])
    assert (status, output.splitlines()[-1]) == (0, "no-terminal")
