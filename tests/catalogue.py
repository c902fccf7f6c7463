"""The layer catalogue: five layers that use every feature of the changeset format, and umoci's unpacking of
them (an independent implementation to compare with), shared by test_apply.py and test_images.py."""

import subprocess
from pathlib import Path

from images import Image, Tar, write_oci_layout
from trees import snapshot, without

UNICODE = "données/ünïcödé-名前 €.txt"
DEEP = "/".join(["deep"] + [f"level-{n}-with-a-rather-long-name" for n in range(6)])
LONG = DEEP + "/and-a-file-whose-path-needs-a-pax-header.txt"
DEVICES = ["dev/null", "dev/loop0", "dev/zero"]


def catalogue() -> list[Tar]:
    """Five layers that use every feature of the changeset format, each layer building on the ones below."""
    deep = Tar()
    for depth in range(1, DEEP.count("/") + 2):
        deep = deep.dir("/".join(DEEP.split("/")[:depth]))
    base = (
        deep.dir(".", 0o755)
        .dir("etc")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/shadow", b"secret\n", mode=0o640, gid=42)
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
        .file("usr/bin/su", b"su", mode=0o4755)
        .file("usr/bin/wall", b"wall", mode=0o2755, gid=5)
        .hardlink("usr/bin/tool-again", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .symlink("etc/tool-link", "/usr/bin/tool")
        .symlink("dangling", "/nowhere/at/all")
        .dir("tmp", 0o1777)
        .dir("ro", 0o555)
        .file("ro/inside", b"in a read-only dir")
        .dir("locked", 0o000)
        .dir("locked/sub", 0o700)
        .file("locked/sub/secret", b"s", mode=0o000)
        .file("zero-mode", b"nobody reads me", mode=0o000)
        .dir("run")
        .fifo("run/fifo")
        .dir("dev")
        .device("dev/null", "char", 1, 3)
        .device("dev/loop0", "block", 7, 0)
        .dir("données")
        .file(UNICODE, b"utf-8 name\n")
        .file(LONG, b"deep\n")
        .dir("old-dir")
        .dir("old-dir/sub")
        .file("old-dir/sub/f", b"f")
        .file("old-file", b"old")
        .dir("opaque")
        .file("opaque/lower", b"lower")
        .dir("opaque/lower-dir", 0o555)
        .file("opaque/lower-dir/x", b"x")
        .file("gone", b"bye")
        .dir("gone-dir", 0o500)
        .file("gone-dir/child", b"c")
        .file("shared", b"v1")
        .hardlink("shared-link", "shared")
        .dir("chmod-me", 0o755)
        .file("chmod-me/keep", b"keep")
        .dir("opaque2")
        .dir("opaque2/sub")
        .file("opaque2/sub/lower", b"lower")
    )
    second = (
        Tar()
        .whiteout("gone")
        .whiteout("gone-dir")
        .file("opaque/upper", b"upper")  # before the marker: entry order must not matter
        .opaque("opaque")
        .file("old-dir", b"a file over a directory")
        .dir("old-file", 0o750)
        .file("old-file/inside", b"a directory over a file")
        .dir("chmod-me", 0o700)
        .hardlink("etc/passwd-again", "etc/passwd")
        .file("ro/added", b"into a read-only dir of a lower layer")
        .file("locked/sub/added", b"into a mode-0000 dir of a lower layer")
    )
    third = (
        Tar()
        .file("bin", b"a file over a symlink")
        .symlink("etc/shadow", "passwd")
        .file("shared", b"v2")  # a new inode: shared-link keeps v1
        .file("usr/bin/su", b"su v2", mode=0o4750)
        .file("both", b"written, then whited out in the same layer: kept")
        .whiteout("both")
    )
    fourth = (
        Tar()
        .opaque("opaque2")
        .dir("opaque2/sub", 0o755)
        .file("opaque2/sub/upper", b"upper")
        .whiteout("usr/bin/wall")
        .fifo("run/fifo2")
        .symlink("opaque2/link", "../etc")
    )
    fifth = (
        Tar()
        .dir(".", 0o755)
        .file("ro/late", b"late")
        .device("dev/zero", "char", 1, 5)
        .hardlink("usr/bin/tool-third", "usr/bin/tool-again")
        .file("locked/late", b"late", mode=0o600)
        .dir("etc", 0o755)
        .file("etc/hostname", b"catalogue\n")
    )
    return [base, second, third, fourth, fifth]


def catalogue_image() -> Image:
    """The catalogue as one gzip-compressed OCI image."""
    return Image(layers=catalogue(), config={}, compression="gzip")


def unpack_with_umoci(folder: Path) -> dict[str, Path]:
    """Writes the catalogue image as the OCI layout `folder`/layout (tag "catalogue", readable by all) and unpacks
    it with umoci; returns the paths "layout", "root" and "rootless"."""
    layout = folder / "layout"
    write_oci_layout(layout, catalogue_image(), "catalogue")
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    return {"layout": layout} | umoci_unpack(f"{layout}:catalogue", folder)


def umoci_unpack(image: str, folder: Path) -> dict[str, Path]:
    """Unpacks `image` (LAYOUT:TAG) with umoci as root and with --rootless, into `folder`/umoci-root and
    umoci-rootless; returns those paths as "root" and "rootless"."""
    trees = {}
    for mode, flags in [("root", []), ("rootless", ["--rootless"])]:
        trees[mode] = folder / f"umoci-{mode}"
        command = ["umoci", "raw", "unpack", *flags, "--image", image, str(trees[mode])]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    return trees


def assert_same_as_umoci_rootless(rootfs: Path, umoci_rootless: Path, devices: list[str]) -> None:
    """`rootfs`, unpacked by an ordinary user, is umoci's --rootless tree but for owners and the device nodes
    `devices`, which we skip where umoci leaves an empty file."""
    ours, theirs = without(snapshot(rootfs), owner=None), without(snapshot(umoci_rootless), owner=None)
    for device in devices:
        assert (theirs[0][device].kind, theirs[0].pop(device).payload) == ("-", b"")
        assert device not in ours[0]
    assert ours == theirs


# GNU tar's sparse files: the old GNU format and pax 0.0, 0.1 and 1.0
SPARSE_FORMATS = [("gnu", None), ("posix", "0.0"), ("posix", "0.1"), ("posix", "1.0")]
SPARSE_IDS = ["gnu", "pax-0.0", "pax-0.1", "pax-1.0"]


def sparse_source(folder: Path) -> Path:
    """Files with holes at the start, between data and at the end, one all hole, and an ordinary one."""
    source = folder / "source"
    source.mkdir()
    with (source / "holes").open("wb") as file:
        for offset in (1 << 20, 5 << 20, 9 << 20):
            file.seek(offset)
            file.write(b"data at %d\n" % offset * 500)
        file.truncate(16 << 20)
    with (source / "all-hole").open("wb") as file:
        file.truncate(3 << 20)
    (source / "dense").write_bytes(b"no holes" * 1000)
    return source


def gnu_sparse_tar(source: Path, tar_format: str, version: str | None) -> bytes:
    versions = [f"--sparse-version={version}"] if version else []
    command = ["tar", "--sparse", *versions, f"--format={tar_format}", "-cf", "-", "-C", str(source), "."]
    return subprocess.run(command, check=True, capture_output=True).stdout
