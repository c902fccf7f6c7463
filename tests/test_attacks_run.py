"""Attacks on d-run, written as a hostile image author (or a container planting for the next run) would,
grouped by class, each run as root and as the ordinary user. Folders standing in for the host's home and
/etc lie outside DIR, are writable by the user d-run runs as, and must stay byte-for-byte unchanged; each
run ends in one clear line or a safe success, within a bounded time and a bounded memory."""

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import test_run
from test_run import Runner, assert_error, configure
from trees import snapshot

from dutils.errors import Error
from dutils.store import PullDir

# test_run's fixtures, shared: d-run as root and as the ordinary user, and a fresh busybox pull folder.
workspace, run, box = test_run.workspace, test_run.run, test_run.box

MAX_RSS_KIB = 150 * 1024
# The Python half of d-run, up to the moment it would exec bwrap: its peak memory (VmHWM), or its error.
PLAN = (
    "import sys\n"
    "from dutils.errors import Error\n"
    "from dutils.run import make_parser, plan_sandbox\n"
    "try:\n"
    "    plan_sandbox(make_parser().parse_args(sys.argv[1:]))\n"
    "except Error as err:\n"
    "    print('error:', err)\n"
    "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"
)


class Host:
    """Stand-ins for the host's home and /etc, outside DIR, owned by the user d-run runs as."""

    def __init__(self, root: Path, run: Runner) -> None:
        self.home, self.etc = root / "home", root / "etc"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA the owner's key\n")
        self.etc.mkdir()
        (self.etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nhostonly:x:4242:4242::/:/bin/sh\n")
        (self.etc / "hosts").write_text("127.0.0.1 localhost\n")
        run.own(root)
        self.before = {path: snapshot(path) for path in (self.home, self.etc)}

    def unchanged(self) -> None:
        for path, before in self.before.items():
            assert snapshot(path) == before, f"{path} changed"


@pytest.fixture
def host(workspace, run) -> Host:
    root = Path(tempfile.mkdtemp(dir=workspace, prefix="host-"))
    root.chmod(0o755)
    return Host(root, run)


def oldroot(path: Path) -> str:
    """How `path` on the host is named from where bwrap stands before it pivots."""
    return f"/oldroot{path}"


def ends_well(done: subprocess.CompletedProcess) -> None:
    """One clear line, or a safe success."""
    if done.returncode != 0:
        assert_error(done, 1)


def peak_kib(run: Runner, *args: str) -> int:
    """The peak memory of d-run's Python half for `args` (measured in a Python beside its script)."""
    python = run.script.parent / "python"
    done = subprocess.run(
        [str(python), "-c", PLAN, *args], capture_output=True, text=True, timeout=60, env=run.env, cwd="/",
        **run.popen_args(),
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return int(done.stdout.splitlines()[-1])


def timed(run: Runner, *args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = run(*args)  # the Runner itself gives up after 30 s
    assert time.monotonic() - started < 20
    return done


# ----- class 1: links in volumes lead the mounts of later volumes to the host ----------------------------

LINK_FORMS = {
    "absolute": lambda target, depth: str(target),
    "relative": lambda target, depth: "../" * (depth + 8) + str(target).lstrip("/"),
    "oldroot": lambda target, depth: oldroot(target),
}


@pytest.mark.parametrize("form", LINK_FORMS)
def test_seeded_link_does_not_lead_a_nested_volume_to_the_host_home(run, box, host, form):
    (box / "rootfs" / "data").mkdir()
    (box / "rootfs" / "data" / "x").symlink_to(LINK_FORMS[form](host.home, 1))
    run.own(box)
    configure(box, Volumes={"/data": {}, "/data/x/.ssh": {}})
    done = timed(run, str(box), "sh", "-c", "echo attacker-key >> /data/x/.ssh/authorized_keys")
    assert_error(done, 1, "volumes/data/x is a symbolic link")
    host.unchanged()
    assert peak_kib(run, str(box), "true") < MAX_RSS_KIB


def test_an_update_does_not_bind_a_link_left_in_an_old_volume(run, box, host):
    # Version 1: a/b -> the host's /etc, and a volume at /a seeded with that link.
    (box / "rootfs" / "a").mkdir()
    (box / "rootfs" / "a" / "b").symlink_to(host.etc)
    run.own(box)
    configure(box, Volumes={"/a": {}})
    assert run.out(str(box), "true") == ""
    assert (box / "volumes" / "a" / "b").is_symlink()
    # Version 2 (as d-pull --update leaves it): a real a/b, and a volume at /a/b.
    (box / "rootfs" / "a" / "b").unlink()
    (box / "rootfs" / "a" / "b").mkdir()
    run.own(box)
    configure(box, Volumes={"/a/b": {}})
    done = timed(run, str(box), "sh", "-c", "echo pwned > /a/b/passwd")
    assert_error(done, 1, "volumes/a/b is a symbolic link")
    host.unchanged()


@pytest.mark.parametrize("nested", ["anonymous", "host folder"])
def test_a_volume_planted_link_does_not_lead_the_next_run_out(run, box, host, workspace, nested):
    # The container writes a link into its volume; the next run mounts something below it.
    planted = run(
        *["-v", "/data"], str(box), "sh", "-c", f"ln -s {host.home} /data/x && ln -s {oldroot(host.etc)} /data/y"
    )
    assert planted.returncode == 0, planted.stderr
    mine = Path(tempfile.mkdtemp(dir=workspace))
    run.own(mine)
    for target in ("/data/x/.ssh", "/data/y"):
        flags = ["-v", target] if nested == "anonymous" else ["-v", f"{mine}:{target}"]
        done = timed(run, "-v", "/data", *flags, str(box), "sh", "-c", f"echo pwned > {target}/authorized_keys")
        assert_error(done, 1, "is a symbolic link")
    host.unchanged()


# ----- class 2: bwrap's mount points through links to /oldroot (the host, before bwrap pivots) -----------


def plant_rootfs_link(box: Path, name: str, target: str) -> None:
    path = box / "rootfs" / name
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


MOUNT_POINTS = {
    # name in the rootfs, how far below the root, config and flags that make d-run mount through it
    "etc/hosts": ({}, []),
    "tmp": ({}, []),
    "proc": ({}, []),
    "dev": ({}, []),
    "data": ({"Volumes": {"/data/sub": {}}}, []),
    "srv": ({"WorkingDir": "/srv/app"}, []),
    "opt": ({}, ["-v", "/opt/cache"]),
    "etc/apt/apt.conf.d": ({}, []),
    "etc/resolv.conf": ({}, ["-n"]),
}


@pytest.mark.parametrize("name", MOUNT_POINTS)
@pytest.mark.parametrize("form", ["oldroot", "relative"])
def test_mount_points_through_rootfs_links_create_nothing_on_the_host(run, box, host, name, form):
    victim = host.etc / "made-by-bwrap"
    depth = name.count("/")
    target = oldroot(victim) if form == "oldroot" else "../" * (depth + 6) + oldroot(victim).lstrip("/")
    if name == "etc/apt/apt.conf.d":  # apt's file goes only into a folder the image has: give it one
        target = oldroot(host.etc) if form == "oldroot" else "../" * (depth + 6) + oldroot(host.etc).lstrip("/")
        (box / "rootfs" / oldroot(host.etc).lstrip("/")).mkdir(parents=True)
    plant_rootfs_link(box, name, target)
    run.own(box)
    config, flags = MOUNT_POINTS[name]
    configure(box, **config)
    done = timed(run, *flags, str(box), "true")
    ends_well(done)
    assert not victim.exists()
    host.unchanged()


@pytest.mark.parametrize("link", ["/proc/self", "/proc/sys/kernel", "/dev/fd", "../dev/pts"])
@pytest.mark.parametrize("what", ["volume", "hosts", "tmp"])
def test_mount_points_through_links_into_proc_or_dev_are_refused(run, box, host, link, what):
    # bwrap makes /proc and /dev itself, with its own links (/dev/fd -> /proc/self/fd): nothing goes there.
    if what == "volume":
        plant_rootfs_link(box, "data", link)
        configure(box, Volumes={"/data/x": {}})
    elif what == "hosts":
        plant_rootfs_link(box, "etc/hosts", f"{link}/hosts")
    else:  # bwrap's own /tmp mounted inside its /proc or /dev
        plant_rootfs_link(box, "tmp", link)
    run.own(box)
    assert_error(timed(run, str(box), "true"), 1, "which d-run leaves as bwrap makes it")
    host.unchanged()


def test_links_planted_by_a_writable_container_create_nothing_on_the_host_next_time(run, box, host):
    victim = host.etc / "made-by-bwrap"
    plant = (
        f"ln -s {oldroot(victim)} /data && mv /etc /etc.old && mkdir /etc && ln -s {oldroot(victim)} /etc/hosts"
        f" && rmdir /srv 2>/dev/null; ln -s ../../../../../{oldroot(victim)} /srv"
    )
    planted = run("--rw", str(box), "sh", "-c", plant)
    assert planted.returncode == 0, planted.stderr
    assert (box / "rootfs" / "etc" / "hosts").is_symlink()
    configure(box, Volumes={"/data/sub": {}}, WorkingDir="/srv/app")
    for flags in ([], ["--rw"], ["-v", "/data/other"]):
        ends_well(timed(run, *flags, str(box), "sh", "-c", "echo x > /etc/hosts; echo y > /data/sub/f"))
    assert not victim.exists()
    host.unchanged()


# ----- class 3: what a new volume copies from the image ---------------------------------------------------


def special_files(rootfs: Path, as_root: bool) -> list[str]:
    """Plant every kind of file a seed copy must not open: /dev/zero's node, the root disk's block node
    (as root only: an ordinary user cannot make them), a FIFO and a socket."""
    seed = rootfs / "data"
    seed.mkdir()
    (seed / "kept").write_text("kept\n")
    (seed / "link").symlink_to("/etc/passwd")
    os.mkfifo(seed / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(seed / "socket"))
    sock.close()
    names = ["fifo", "socket"]
    if as_root:
        os.mknod(seed / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        disk = os.stat("/").st_dev
        os.mknod(seed / "disk", stat.S_IFBLK | 0o600, os.makedev(os.major(disk), os.minor(disk)))
        names += ["zero", "disk"]
    return names


def test_seed_copies_skip_devices_fifos_and_sockets_without_opening_them(run, box, host):
    skipped = special_files(box / "rootfs", os.geteuid() == 0 and run.user is None)
    run.own(box)
    configure(box, Volumes={"/data": {}})
    done = timed(run, str(box), "ls", "/data")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["kept", "link"]
    assert (
        done.stderr
        == f"d-run: warning: {len(skipped)} device nodes, FIFOs or sockets of the image not copied into new volumes\n"
    )
    volume = box / "volumes" / "data"
    assert os.readlink(volume / "link") == "/etc/passwd"  # a link copied as a link, never followed
    assert sorted(os.listdir(volume)) == ["kept", "link"]
    assert timed(run, str(box), "true").stderr == ""  # said once: the volume exists now
    host.unchanged()


def test_a_seed_that_is_a_link_to_the_root_is_refused(run, box, host):
    plant_rootfs_link(box, "data", "/")
    run.own(box)
    configure(box, Volumes={"/data": {}})
    assert_error(timed(run, str(box), "true"), 1, "/data leads to the image's root folder")
    assert not (box / "volumes" / "data").exists()


def test_a_deep_seed_is_copied_without_recursion(run, box):
    (box / "rootfs" / "deep").mkdir()
    fd = os.open(box / "rootfs" / "deep", os.O_PATH)
    try:
        for _ in range(1500):  # deeper than Python's recursion limit
            os.mkdir("d", dir_fd=fd)
            fd, parent = os.open("d", os.O_PATH, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    try:
        run.own(box)
        configure(box, Volumes={"/deep": {}})
        ends_well(timed(run, str(box), "true"))
        assert peak_kib(run, str(box), "true") < MAX_RSS_KIB
        assert (box / "volumes" / "deep" / ("d/" * 1500)).is_dir()
    finally:  # shutil.rmtree recurses: rm does not
        subprocess.run(["rm", "-rf", str(box / "rootfs" / "deep"), str(box / "volumes")], check=True, timeout=60)


# ----- class 4: the image's /etc/passwd and /etc/group ----------------------------------------------------


def plant_passwd(rootfs: Path, kind: str, host: Host) -> None:
    passwd = rootfs / "etc" / "passwd"
    passwd.unlink()
    if kind == "fifo":
        os.mkfifo(passwd)
    elif kind == "huge":
        with open(passwd, "wb") as out:
            out.write(b"root:x:0:0:root:/root:/bin/sh\n")
            out.truncate(300 << 20)  # sparse: 300 MB to read, nothing on the disk
    elif kind == "device":
        os.mknod(passwd, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # /dev/zero
    elif kind == "host link":
        passwd.symlink_to(oldroot(host.etc / "passwd"))
    elif kind == "odd digits":
        passwd.write_text("root:x:0:0:root:/root:/bin/sh\nsup:x:\u00b2:1::/:/bin/sh\narab:x:\u0661:1::/:/bin/sh\n")


@pytest.mark.parametrize("kind", ["fifo", "huge", "device", "host link", "odd digits"])
@pytest.mark.parametrize("file", ["passwd", "group"])
def test_hostile_passwd_and_group_files(run, box, host, kind, file):
    if kind == "device" and (os.geteuid() != 0 or run.user):
        pytest.skip("only root can make device nodes")
    plant_passwd(box / "rootfs", kind, host)
    if file == "group":  # the same kinds, as /etc/group (passwd put back)
        (box / "rootfs" / "etc" / "passwd").rename(box / "rootfs" / "etc" / "group.new")
        (box / "rootfs" / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (box / "rootfs" / "etc" / "group").unlink()
        (box / "rootfs" / "etc" / "group.new").rename(box / "rootfs" / "etc" / "group")
    run.own(box)
    for user in ["", "hostonly", "\u00b2", "\u0661", "sup", "root:\u0661"]:
        done = timed(run, *(["-u", user] if user else []), str(box), "id", "-u")
        if done.returncode == 0:
            assert done.stdout in ("0\n", "1\n") and user not in ("hostonly", "\u00b2", "\u0661")
        else:
            assert_error(done, 1)
    assert peak_kib(run, str(box), "true") < MAX_RSS_KIB
    host.unchanged()


# ----- class 5: config.json as an attacker writes it ------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"Hostname": "box\n6.6.6.6 registry.example"}, "Hostname"),
        ({"Hostname": "a" * 64}, "Hostname"),
        ({"Hostname": "under_score"}, "Hostname"),
        ({"Hostname": ("a" * 63 + ".") * 4}, "Hostname"),
        ({"Env": ["A=1\x00B=2"]}, "Env"),
        ({"Env": ["A\x1b[2J=1"]}, "Env"),
        ({"Cmd": ["echo", "\x00"]}, "Cmd"),
        ({"Entrypoint": ["echo\x1b]0;title\x07"]}, "Entrypoint"),
        ({"User": "root\x00"}, "User"),
        ({"User": "app\nroot"}, "User"),
        ({"WorkingDir": "/srv\x00/x"}, "WorkingDir"),
        ({"Volumes": {"/data\x00": {}}}, "Volumes"),
        ({"Volumes": {"/data\n": {}}}, "Volumes"),
        ({"Volumes": {"//": {}}}, "Volumes"),
        ({"Volumes": {"/.": {}}}, "Volumes"),
        ({"Volumes": {"/x/..": {}}}, "Volumes"),
        ({"Volumes": {"/./": {}}}, "Volumes"),
        ({"Volumes": {"/proc/sys": {}}}, "Volumes"),
        ({"Volumes": {f"/v{n}": {} for n in range(100_000)}}, "Volumes"),
        ({"Volumes": {"/a" * 5000: {}}}, "Volumes"),
        ({"WorkingDir": "/a" * 5000}, "WorkingDir"),
        ({"Env": {"A": "1"}}, "Env"),
        ({"Env": [1]}, "Env"),
        ({"Cmd": "sh -c id"}, "Cmd"),
        ({"Entrypoint": {"sh": 1}}, "Entrypoint"),
        ({"User": 0}, "User"),
        ({"Hostname": ["a"]}, "Hostname"),
        ({"WorkingDir": 5}, "WorkingDir"),
        ({"Volumes": ["/data"]}, "Volumes"),
        ({"net": "true"}, "net"),
        ({"rw": 1}, "rw"),
    ],
)
def test_config_strings_and_types_are_checked_naming_the_field(run, box, host, change, field):
    configure(box, **change)
    done = timed(run, str(box), "true")
    assert_error(done, 1, f"'{field}'")
    assert "\x1b" not in done.stderr and "\x00" not in done.stderr and len(done.stderr) < 500
    host.unchanged()


@pytest.mark.parametrize("kind", ["huge", "fifo", "deep", "link"])
def test_hostile_config_json_file(run, box, host, kind):
    config = box / "config.json"
    config.unlink()
    if kind == "huge":
        with open(config, "wb") as out:
            out.write(b'{"Cmd": ["true"], "Labels": {"x": "')
            out.truncate(300 << 20)
    elif kind == "fifo":
        os.mkfifo(config)
    elif kind == "deep":
        config.write_text("[" * 100_000 + "]" * 100_000)
    else:
        (host.etc / "config.json").write_text(json.dumps({"Cmd": ["true"]}))
        run.own(host.etc / "config.json")
        host.before = {path: snapshot(path) for path in host.before}
        config.symlink_to(host.etc / "config.json")
    run.own(box)
    done = timed(run, str(box), "true")
    assert_error(done, 1, "config.json")
    assert peak_kib(run, str(box), "true") < MAX_RSS_KIB
    host.unchanged()


# ----- class 6: the pull folder's own entries -------------------------------------------------------------


@pytest.mark.parametrize("entry", ["rootfs", "volumes", "volumes/data"])
def test_pull_folder_entries_that_are_links_are_refused(run, box, host, entry):
    configure(box, Volumes={"/data": {}})
    (box / "volumes").mkdir()
    path = box / entry
    if path.exists():
        path.rename(host.etc.parent / "moved")  # the real one kept outside, as an attacker would
    path.symlink_to(host.etc)
    run.own(box)
    done = timed(run, str(box), "sh", "-c", "echo pwned > /data/passwd; echo pwned > /passwd")
    assert_error(done, 1, entry.rsplit("/", 1)[-1])
    host.unchanged()


def test_volume_folders_owned_by_someone_else_are_refused(run, box, host):
    configure(box, Volumes={"/data": {}})
    assert run.out(str(box), "true") == ""
    other = 4321 if run.user is None else 0  # as root: another user's; as the user: root's
    os.chown(box / "volumes" / "data", other, other)
    assert_error(timed(run, str(box), "true"), 1, "volumes/data is owned by uid")
    host.unchanged()


# ----- class 7: what d-run hands to bwrap -----------------------------------------------------------------


def test_no_descriptor_of_d_run_reaches_the_container(run, box, host, workspace):
    # Sources are bound by descriptor: bwrap must close them all, or the container could reach the host
    # through an O_PATH descriptor of a folder outside its root (fchdir, openat).
    mine = Path(tempfile.mkdtemp(dir=workspace))
    run.own(mine)
    configure(box, Volumes={"/data": {}})
    listing = run.out("-n", "-v", f"{mine}:/mine:ro", "-v", "/cache", str(box), "ls", "/proc/self/fd")
    assert sorted(listing.split()) == ["0", "1", "2", "3"]  # 3: ls's own listing of the folder
    host.unchanged()


# ----- class 8: other users of the machine (dutest2 attacks root and the ordinary user) -------------------


def as_other(other_user: str, *paths: Path) -> None:
    """Give `paths` to the second user, as if they had made them."""
    subprocess.run(["chown", "-R", "-h", f"{other_user}:{other_user}", *map(str, paths)], check=True)


def test_a_mount_point_another_user_could_swap_is_refused_while_dir_is_open_to_others(run, box, other_user):
    """bwrap looks a mount point up again as it mounts, following links: in a DIR others can enter, a folder on the
    way that another user owns (a root pull's folder of the image's uid 1000, a host user's) or may write in (not
    sticky) would let them swap it for a link to anywhere on the host meanwhile, where root would make the mount
    point (create or truncate a file). Such a mount point is refused while DIR is open to others."""
    rootfs = box / "rootfs"
    (rootfs / "home" / "u").mkdir(parents=True)
    (rootfs / "home" / "u" / "app.conf").write_text("")  # the image's, as its uid's folder holds it
    as_other(other_user, rootfs / "home" / "u")
    for name, mode in (("open", 0o777), ("sticky", 0o1777)):
        (rootfs / name).mkdir()
        (rootfs / name).chmod(mode)
    conf = box.parent / "app.conf"
    conf.write_text("settings\n")
    conf.chmod(0o644)
    box.chmod(0o755)
    other = pwd.getpwnam(other_user).pw_uid
    for target, problem in (
        ("/home/u/app.conf", f"/home/u belongs to uid {other}"),
        ("/open/app.conf", "/open is writable"),
    ):
        assert_error(
            run("-v", f"{conf}:{target}", str(box), "true"), 1, f"refusing the mount point {target}: {problem}"
        )
    assert run.out("-v", f"{conf}:/sticky/app.conf", str(box), "cat", "/sticky/app.conf") == "settings\n"  # d-run's own
    box.chmod(0o700)  # no one else enters: nothing to swap
    assert run.out("-v", f"{conf}:/home/u/app.conf", str(box), "cat", "/home/u/app.conf") == "settings\n"


def d_pull(run: Runner, *args: str) -> subprocess.CompletedProcess:
    """d-pull beside `run`'s d-run, as the same user, with a cache of the folder's own."""
    argv = [str(run.script.parent / "d-pull"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=run.env, cwd="/", **run.popen_args())


def assert_pull_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("d-pull: error: "), done.stderr
    assert all(word in done.stderr for word in words), done.stderr


def test_a_complete_fake_pull_in_another_users_folder_never_runs(run, box, host, other_user):
    configure(box, Cmd=["echo", "the attacker's command ran"])
    as_other(other_user, box)
    done = timed(run, str(box))
    uid = pwd.getpwnam(other_user).pw_uid
    assert_error(done, 1, "refusing", f"belongs to user {uid}", "pull into a folder of your own")
    assert "attacker" not in done.stdout
    host.unchanged()


@pytest.mark.parametrize("part", ["", "rootfs", "config.json", "image.json", "volumes", ".d-pull"])
@pytest.mark.parametrize("bits", [0o020, 0o002])
def test_a_folder_others_can_write_is_refused_naming_the_fix(run, box, host, part, bits):
    (box / "volumes").mkdir()
    (box / ".d-pull").mkdir()
    run.own(box)
    path = box / part
    path.chmod(stat.S_IMODE(path.stat().st_mode) | bits)
    done = timed(run, str(box), "true")
    assert_error(done, 1, "it is writable by other users", f"chmod go-w {str(path).rstrip('/')}")
    host.unchanged()


def test_what_no_one_else_can_reach_may_be_group_writable(tmp_path):
    # A umask of 002 makes rootfs and .d-pull's files group-writable; in a 0700 DIR, no one else can reach them.
    folder = tmp_path / "pull"
    (folder / ".d-pull").mkdir(parents=True)
    (folder / "rootfs").mkdir()
    (folder / ".d-pull" / "applied").touch()
    (folder / ".d-pull" / "applied").chmod(0o664)
    (folder / "rootfs").chmod(0o775)
    for mode, refused in [(0o700, False), (0o701, False), (0o710, True), (0o755, True)]:
        folder.chmod(mode)
        if refused:
            with pytest.raises(Error, match="writable by other users"):
                PullDir(folder).check_trusted()
        else:
            PullDir(folder).check_trusted()


@pytest.mark.parametrize("tool", ["d-run", "d-pull"])
def test_a_dangling_link_planted_in_d_pull_state_is_refused_never_followed(run, box, host, images, tool):
    victim = host.etc / "nologin"
    (box / ".d-pull").mkdir()
    (box / ".d-pull" / "applied").symlink_to(victim)
    run.own(box)
    if tool == "d-run":
        assert_error(timed(run, str(box), "true"), 1, ".d-pull/applied: it is a symbolic link")
    else:
        done = d_pull(run, "--cache", str(box.parent / "cache"), "--update", images["busybox"], str(box))
        assert_pull_error(done, ".d-pull/applied: it is a symbolic link")
    assert not victim.exists() and not victim.is_symlink()
    host.unchanged()


@pytest.mark.parametrize("premade", [False, True], ids=["made by d-pull", "an empty 0755 folder made before"])
def test_what_a_root_pull_writes_is_private_until_root_opens_it(workspace, images, other_user, unprivileged, premade):
    if os.geteuid() != 0:
        pytest.skip("a root pull")
    folder = Path(tempfile.mkdtemp(dir=workspace)) / "pulled"
    folder.parent.chmod(0o755)
    if premade:
        folder.mkdir(0o755)
    root = Runner(test_run.BIN / "d-run", test_run.HOST_ENV)
    done = d_pull(root, "--cache", str(folder.parent / "cache"), images["busybox"], str(folder))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    peek = subprocess.run(
        ["/usr/sbin/runuser", "-u", other_user, "--", "ls", str(folder / "rootfs" / "bin")],
        capture_output=True,
        timeout=30,
    )
    assert peek.returncode != 0 and b"Permission denied" in peek.stderr
    user = Runner(unprivileged.bin / "d-run", unprivileged.env, test_run.USER)
    assert_error(timed(user, str(folder), "true"), 1, "Permission denied")
    folder.chmod(0o755)  # root opens it on purpose: read-only runs for everyone, nothing written into it
    before = snapshot(folder)
    assert user.out(str(folder), "hostname") == "pulled\n"
    assert snapshot(folder) == before
    configure(folder, Volumes={"/data": {}})
    assert_error(timed(user, str(folder), "true"), 1, "anonymous volume /data", "-v")


# ----- class 9: a running container of the same DIR -------------------------------------------------------

# Inside a --rw container: swap /etc with a link to the host folder, as bwrap sees it before it pivots, and back,
# as fast as it can (renameat2 RENAME_EXCHANGE), until `seconds` have passed.
SWAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.symlink(sys.argv[1], "/etc.evil")
open("/ready", "w").close()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    libc.renameat2(-100, b"/etc", -100, b"/etc.evil", 2)
"""


def test_a_writable_container_swapping_etc_cannot_redirect_200_starts(run, box, host, workspace):
    victim = Path(tempfile.mkdtemp(dir=workspace, prefix="victim-"))
    run.own(victim)
    before = snapshot(victim)
    swap = ["python3", "-c", SWAPPER, oldroot(victim), "300"]
    attacker = subprocess.Popen(
        [str(run.script), "--rw", *test_run.HOST_PYTHON, str(box), *swap],
        env=run.env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        **run.popen_args(),
    )  # fmt: skip
    try:
        assert test_run.wait_until((box / "rootfs" / "ready").exists, timeout=30)
        refused, started = 0, time.monotonic()
        for _ in range(200):
            done = run(*(["-v", "/data"] if _ % 2 else []), str(box), "cat", "/etc/hostname")
            ends_well(done)
            refused += "is in use by a writable container" in done.stderr
            assert time.monotonic() - started < 240
        assert refused == 200  # the defence, not luck: no start raced the swaps
    finally:
        attacker.kill()
        attacker.communicate(timeout=30)
    assert snapshot(victim) == before
    host.unchanged()


def test_the_lock_of_a_running_container_is_out_of_its_reach(run, box):
    # bwrap's init inside keeps its --sync-fd open, and the container may copy it (pidfd_getfd) and unlock it:
    # what bwrap gets is a pipe to the process holding the lock, never the lock itself.
    links = run.out("--rw", str(box), "sh", "-c", "for fd in /proc/1/fd/*; do readlink $fd; done")
    assert links.strip() and all(not link.startswith("/") or link.startswith("/dev/") for link in links.split()), links
    assert any(link.startswith("pipe:") for link in links.split()), links
    assert run.out("--rw", str(box), "echo", "after") == "after\n"  # the holder let go when the container ended


def start_container(run: Runner, box: Path, *flags: str) -> subprocess.Popen:
    """A container of `box` running for 30 s, once it runs (its d-run's lock is bwrap's from then on)."""
    mark = Path(tempfile.mkdtemp(dir=box.parent))
    run.own(mark)
    argv = [str(run.script), *flags, "-v", f"{mark}:/mark", str(box), "sh", "-c", "touch /mark/up; sleep 30"]
    started = subprocess.Popen(argv, env=run.env, cwd="/", stdin=subprocess.DEVNULL, **run.popen_args())
    assert test_run.wait_until((mark / "up").exists, timeout=20)
    return started


def test_two_read_only_runs_of_one_folder_run_together_and_a_writable_one_starts_alone(run, box):
    first = start_container(run, box)
    try:
        assert run.out(str(box), "echo", "beside") == "beside\n"
        assert_error(run("--rw", str(box), "true"), 1, "is in use: this run must start alone", "runs alone")
        assert_error(run("-v", "/cache", "-v", "/cache/sub", str(box), "true"), 1, "must start alone")
    finally:
        first.kill()
        first.wait(timeout=30)
    assert run.out("--rw", str(box), "echo", "alone") == "alone\n"


# As d-run: take DIR's lock, hand it to a child that keeps it for argv[2] seconds, and end at once.
ENDED_TAKER = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
if os.fork() == 0:
    time.sleep(float(sys.argv[2]))
os._exit(0)
"""


def test_a_lock_let_go_soon_after_the_start_is_waited_for(run, box):
    """The lock holder of a run that has just ended lets DIR's lock go a moment after its d-run's status is out: the
    next run waits (bounded) for it; a lock whose taker still runs (a container) is refused at once."""
    import fcntl

    subprocess.run([sys.executable, "-c", ENDED_TAKER, str(box), "0.5"], check=True, timeout=30)
    assert run.out("--rw", str(box), "echo", "next") == "next\n"
    subprocess.run([sys.executable, "-c", ENDED_TAKER, str(box), "6"], check=True, timeout=30)
    started = time.monotonic()
    assert_error(run("--rw", str(box), "true"), 1, "is in use: this run must start alone")  # kept past the wait
    assert time.monotonic() - started < 15
    assert test_run.wait_until(lambda: run("--rw", str(box), "true").returncode == 0, timeout=40)
    held = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # taken by this process, which runs on
        assert_error(run("--rw", str(box), "true"), 1, "is in use: this run must start alone")
    finally:
        os.close(held)


def test_a_volume_holding_another_mount_point_keeps_its_folder_to_itself(run, box, host):
    # The running container can write /data, where bwrap would mount /data/sub for the next run by path.
    configure(box, Volumes={"/data": {}, "/data/sub": {}})
    first = start_container(run, box)
    try:
        assert_error(run(str(box), "true"), 1, "is in use by a writable container")
    finally:
        first.kill()
        first.wait(timeout=30)
    host.unchanged()


def test_the_container_holds_no_descriptor_of_the_lock(run, box):
    listing = run.out("--rw", str(box), "ls", "/proc/self/fd")
    assert sorted(listing.split()) == ["0", "1", "2", "3"]


def test_fresh_folders_started_twice_at_once_both_run(run, workspace):
    for _ in range(10):  # the volumes folder and each volume made by one, taken by the other
        folder = Path(tempfile.mkdtemp(dir=workspace)) / "twice"
        folder.parent.chmod(0o755)
        subprocess.run(["cp", "-a", str(workspace / "template"), str(folder)], check=True)
        configure(folder, Volumes={"/data": {}, "/cache": {}, "/srv/www": {}})
        test_run.write_record(folder, complete=True)
        run.own(folder.parent)
        argv = [str(run.script), str(folder), "true"]
        pair = [
            subprocess.Popen(argv, env=run.env, cwd="/", stderr=subprocess.PIPE, text=True, **run.popen_args())
            for _ in range(2)
        ]
        for started in pair:
            _, err = started.communicate(timeout=30)
            assert started.returncode == 0, err


def test_an_update_racing_a_running_container_ends_in_one_line(run, box, images, workspace):
    folder = Path(tempfile.mkdtemp(dir=workspace)) / "updated"
    folder.parent.chmod(0o755)
    run.own(folder.parent)
    cache = str(folder.parent / "cache")
    assert d_pull(run, "--cache", cache, images["busybox"], str(folder)).returncode == 0
    running = start_container(run, folder)
    try:
        done = d_pull(run, "--cache", cache, "--update", images["busybox-plain"], str(folder))
        assert_pull_error(done, "is in use by a running container")
    finally:
        running.kill()
        running.wait(timeout=30)
    done = d_pull(run, "--cache", cache, "--update", images["busybox-plain"], str(folder))
    assert done.returncode == 0, done.stderr
    assert run.out(str(folder), "echo", "updated") == "updated\n"


# ----- class 10: work and memory, fields and messages ------------------------------------------------------


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "huge"])
def test_an_env_file_that_is_no_small_regular_file_is_refused(run, box, workspace, kind):
    env_file = Path(tempfile.mkdtemp(dir=workspace)) / ".env"
    if kind == "/dev/zero":
        env_file.symlink_to("/dev/zero")  # as a cloned repository's .env may be
    elif kind == "fifo":
        os.mkfifo(env_file)
    else:
        with open(env_file, "wb") as out:
            out.truncate(300 << 20)
    run.own(env_file.parent)
    done = timed(run, "--env-file", str(env_file), str(box), "true")
    assert_error(done, 1, "--env-file", "not a regular file" if kind != "huge" else "larger than")
    assert peak_kib(run, "--env-file", str(env_file), str(box), "true") < MAX_RSS_KIB


def test_an_env_file_through_a_link_to_a_regular_file_is_read(run, box, workspace):
    folder = Path(tempfile.mkdtemp(dir=workspace))
    (folder / "real.env").write_text("FROM_FILE=yes\n")
    (folder / ".env").symlink_to("real.env")  # as dotfile managers make them
    run.own(folder)
    assert run.out("--env-file", str(folder / ".env"), str(box), "sh", "-c", "echo $FROM_FILE") == "yes\n"


@pytest.mark.parametrize("ports", [["8080:\x1b]0;title\x07"], "8080:80", [80]])
def test_config_ports_are_checked_naming_the_field_escaped(run, box, ports):
    configure(box, ports=ports)
    done = timed(run, str(box), "true")
    assert_error(done, 1, "ports")
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
