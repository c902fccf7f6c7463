"""d-run --rw of a shared folder writes into an overlay inside DIR (overlay.py): the store, the folder's own lower tree
and its siblings stay as they were, every later run sees the changes, d-pull --unshare keeps them, and where the kernel
refuses the overlay the folder is made private once. Against the real registry and bwrap, as root, as the ordinary
user with a subordinate range (newuidmap), and as that user without one (no newuidmap on PATH)."""

import concurrent.futures
import contextlib
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import push
from malicious import USER, make_workspace
from test_ports import pastas
from test_run import wait_until
from test_share import BASE, EXTENDED, RW_SCRIPT, pull, subprocess_tool, trees
from trees import snapshot

WHO = ["root", "user", "user-unmapped"]
# Without a range the container has no capability: it writes only what its mode lets the owner write
UNCAPABLE_SCRIPT = RW_SCRIPT.replace("echo w >> ro; ", "").replace(" : > locked/secret;", "")


@pytest.fixture(params=WHO)
def tool(request: pytest.FixtureRequest, tmp_path: Path):
    """Where to pull, and the tools run as root or as the ordinary user (user-unmapped: without newuidmap on PATH)."""
    if request.param == "root":
        return tmp_path, subprocess_tool
    user, place = request.getfixturevalue("unprivileged"), make_workspace()
    request.addfinalizer(lambda: shutil.rmtree(place))
    env = {name: str(place / "pull") for name in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG")}
    if request.param == "user-unmapped":
        tools = place / "tools"
        tools.mkdir()
        for name in ("bwrap", "cp", "find", "pasta"):
            (tools / name).symlink_to(shutil.which(name))
        env["PATH"] = f"{user.bin}:{tools}"

    def run_as_user(name: str, *args: object) -> subprocess.CompletedProcess:
        return user.run([user.bin / name, *args], env=env, capture_output=True, text=True, timeout=120)

    return place / "pull", run_as_user


def shared_pair(place: Path, run, registry, name: str) -> Path:
    """Two shared folders a and b of BASE; the cache."""
    push(registry.host, name, "latest", BASE)
    cache = place / "cache"
    for folder in ("a", "b"):
        pull(run, cache, "--share", f"{registry.host}/{name}:latest", place / folder)
    return cache


def test_a_rw_run_writes_into_the_overlay_only_and_every_later_run_sees_it(tool, request, registry):
    place, run = tool
    cache = shared_pair(place, run, registry, "overlay-rw")
    (tree,) = trees(cache)
    before = {path: snapshot(path) for path in (tree / "rootfs", place / "a" / "rootfs", place / "b" / "rootfs")}
    script = RW_SCRIPT if request.node.callspec.params["tool"] != "user-unmapped" else UNCAPABLE_SCRIPT
    ran = run("d-run", "--rw", place / "a", "sh", "-c", script)
    assert ran.returncode == 0 and "private" not in ran.stderr, ran.stderr
    assert {path: snapshot(path) for path in before} == before  # the store, a's lower tree and the sibling
    assert (place / "a" / ".d-pull" / "shared").exists() and (tree / "anchor").stat().st_nlink == 3

    # the image's ids are the host's as in any run: under root themselves, the user's own the running user's
    assert run("d-run", "--rw", place / "a", "chmod", "1777", "/data/made").returncode == 0
    owners = run("d-run", "--rw", "-u", "1000", place / "a", "touch", "/data/made/by-1000")
    assert owners.returncode == 0, owners.stderr
    upper = place / "a" / ".d-pull" / "overlay" / "upper" / "data"
    expected_1000 = {"root": 1000}.get(request.node.callspec.params["tool"], (place / "a").stat().st_uid)
    assert (upper / "made").stat().st_uid == (place / "a").stat().st_uid
    assert (upper / "made" / "by-1000").stat().st_uid == expected_1000

    # a write to one name of a hard-linked file copies it apart from its other names, as under Docker's overlay2
    seen = "cat /data/file /data/hard /data/locked/new; ls /data; stat -c %a /data/mode; wc -c < /data/trunc"
    expected = (
        "content\nmore\ncontent\nn\nfile\nhard\nlink\nlocked\nmade\nmode\nmoved\nrenamed\nro\nsetuid\ntrunc\n600\n0\n"
    )
    again = run("d-run", "--rw", place / "a", "sh", "-c", seen)
    assert (again.returncode, again.stdout) == (0, expected), again.stderr
    read_only = run("d-run", "--tmpfs", "/new-place", place / "a", "sh", "-c", f"{seen}; touch /data/x")
    assert read_only.stdout == expected and "Read-only file system" in read_only.stderr

    assert run("d-cache", "--cache", cache, "prune", "--all").returncode == 0
    assert trees(cache) == []
    after_prune = run("d-run", place / "a", "sh", "-c", seen)  # a's lower tree holds its own links
    assert (after_prune.returncode, after_prune.stdout) == (0, expected), after_prune.stderr
    assert snapshot(place / "b" / "rootfs") == before[place / "b" / "rootfs"]

    done = run("d-pull", "--unshare", place / "a")
    assert done.returncode == 0 and done.stderr.count("\n") == 1 and "with the changes" in done.stderr, done.stderr
    assert not (place / "a" / ".d-pull" / "shared").exists() and not (place / "a" / ".d-pull" / "overlay").exists()
    data = place / "a" / "rootfs" / "data"
    assert (data / "file").read_text() == "content\nmore\n" and not (data / "gone").exists()
    assert (data / "moved" / "inner").exists() and (data / "link").readlink() == Path("elsewhere")
    private = run("d-run", place / "a", "sh", "-c", seen)
    assert (private.returncode, private.stdout) == (0, expected), private.stderr


def test_update_moves_a_folder_with_changes_to_the_new_tree_and_drops_them_as_for_a_private_one(tool, registry):
    place, run = tool
    cache = shared_pair(place, run, registry, "overlay-update")
    (base_tree,) = trees(cache)
    before = snapshot(base_tree / "rootfs"), snapshot(place / "b" / "rootfs")
    assert run("d-run", "--rw", place / "a", "sh", "-c", "echo changed > /data/file").returncode == 0
    push(registry.host, "overlay-update", "latest", EXTENDED)
    pull(run, cache, "--update", f"{registry.host}/overlay-update:latest", place / "a")
    assert (snapshot(base_tree / "rootfs"), snapshot(place / "b" / "rootfs")) == before
    assert not (place / "a" / ".d-pull" / "overlay").exists() and (place / "a" / ".d-pull" / "shared").exists()
    ran = run("d-run", place / "a", "cat", "/data/file")
    assert (ran.returncode, ran.stdout) == (0, "upper\n"), ran.stderr


def test_a_run_with_published_ports_gets_the_overlay_too(tool, registry, request):
    """With -p d-run (or, without a range, pasta) makes the network namespace from inside the overlay's namespace.
    pasta is the user, whom the overlay's namespace makes 0 (not that namespace's nobody, a container id); root's is
    nobody."""
    place, run = tool
    shared_pair(place, run, registry, "overlay-ports")
    owner = "65534" if request.node.callspec.params["tool"] == "root" else str(pwd.getpwnam(USER).pw_uid)
    for n, flags in enumerate((["--rw"], [])):
        with socket.socket() as probe:  # a free port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        script = f"echo {n} >> /x; cat /x; sleep 3"
        with concurrent.futures.ThreadPoolExecutor(1) as running:
            started = running.submit(
                run, "d-run", *flags, "-p", f"127.0.0.1:{port}:80", place / "a", "sh", "-c", script
            )
            assert wait_until(lambda p=port, s=started: pastas(p) or s.done()) and (found := pastas(port))
            # (without a range pasta, which d-run execs, runs as two processes; root's starts as root, then drops)
            assert wait_until(lambda f=found: real_uids(f) == {owner}), real_uids(found)
            ran = started.result(timeout=120)
        assert (ran.returncode, ran.stdout) == (0, "0\n"), ran.stderr  # the first run's line, seen by the second
        assert flags or "Read-only file system" in ran.stderr


def real_uids(pids: list[int]) -> set[str]:
    uids = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            uids |= {line.split()[1] for line in status if line.startswith("Uid:")}
    return uids


def test_another_user_runs_root_s_folder_with_its_changes(registry, unprivileged, tmp_path):
    """A root folder opened to others: the ordinary user's read-only run mounts root's changes too."""
    place = make_workspace()
    try:
        cache = shared_pair(place, subprocess_tool, registry, "overlay-opened")
        assert subprocess_tool("d-run", "--rw", place / "a", "sh", "-c", "echo root > /data/file").returncode == 0
        (place / "a").chmod(0o755)
        ran = unprivileged.tool("d-run", place / "a", "cat", "/data/file")
        assert (ran.returncode, ran.stdout) == (0, "root\n"), ran.stderr
        assert trees(cache)
    finally:
        shutil.rmtree(place)


def test_a_link_planted_at_the_upper_s_place_redirects_no_write(tool, registry):
    place, run = tool
    shared_pair(place, run, registry, "overlay-planted")
    elsewhere = place / "elsewhere"  # a stand-in for a folder of the user's outside DIR
    elsewhere.mkdir()
    overlay = place / "a" / ".d-pull" / "overlay"
    overlay.mkdir()
    (overlay / "upper").symlink_to(elsewhere)
    if place.owner() != "root":
        subprocess.run(["chown", "-hR", f"{place.owner()}:", elsewhere, overlay], check=True)
    ran = run("d-run", "--rw", place / "a", "sh", "-c", "echo x > /planted")
    assert ran.returncode == 1 and ran.stderr.startswith("d-run: error: ") and ran.stderr.count("\n") == 1, ran.stderr
    assert list(elsewhere.iterdir()) == []


@contextlib.contextmanager
def overlayfs_at(place: Path, folder: Path) -> Iterator[None]:
    """DIR/.d-pull/overlay of `folder` made an overlayfs mount (of the host's, by the tests' root), on which the kernel
    refuses the upper folder of another overlay ("not supported as upperdir"); unmounted after."""
    overlay, scratch = folder / ".d-pull" / "overlay", Path(tempfile.mkdtemp(dir=place))
    for made in (overlay, scratch / "u", scratch / "w"):
        made.mkdir(exist_ok=True)
        shutil.chown(made, place.owner(), place.group())
    options = f"lowerdir={overlay},upperdir={scratch}/u,workdir={scratch}/w,volatile"  # (volatile: unmounted unsynced)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, overlay], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", overlay], check=True, timeout=30)


def test_where_the_kernel_refuses_the_overlay_a_rw_run_makes_the_folder_private_once(tool, registry):
    """A real refusal: DIR/.d-pull/overlay is itself an overlayfs mount (overlayfs_at). A folder whose upper holds
    changes is not run on its stale lower tree."""
    place, run = tool
    cache = shared_pair(place, run, registry, "overlay-refused")
    (tree,) = trees(cache)
    before = snapshot(tree / "rootfs"), snapshot(place / "b" / "rootfs")
    with overlayfs_at(place, place / "a"):
        ran = run("d-run", "--rw", place / "a", "sh", "-c", UNCAPABLE_SCRIPT)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.count("\n") == 1 and "the kernel refuses an overlay here" in ran.stderr, ran.stderr
    assert (snapshot(tree / "rootfs"), snapshot(place / "b" / "rootfs")) == before
    assert (place / "a" / "rootfs" / "data" / "hard").read_text() == "content\nmore\n"
    assert not (place / "a" / ".d-pull" / "shared").exists()
    again = run("d-run", "--rw", place / "a", "cat", "/data/hard")
    assert (again.returncode, again.stdout, again.stderr) == (0, "content\nmore\n", "")

    assert run("d-run", "--rw", place / "b", "touch", "/data/changed").returncode == 0
    with overlayfs_at(place, place / "b"):
        stale = run("d-run", "--rw", place / "b", "ls", "/data/changed")
    assert stale.returncode == 1 and stale.stderr.count("\n") == 1, stale.stderr
    assert stale.stderr.startswith("d-run: error: cannot mount the overlay holding the changes of ")
    assert (place / "b" / ".d-pull" / "shared").exists() and snapshot(place / "b" / "rootfs") == before[1]
