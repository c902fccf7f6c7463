"""d-run's mount points and volumes (dutils.mounts): made inside the rootfs or a volume, links re-rooted or
refused, and a volume's seed copied whole."""

import os

import pytest
from trees import snapshot

from dutils.errors import Error
from dutils.mounts import MountTable, copy_tree, make_empty_file, make_folder
from dutils.rootfs import Root


def test_mount_points_are_made_inside_the_rootfs_links_rerooted(tmp_path):
    outside = tmp_path / "host"
    rootfs = tmp_path / "pull" / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hosts").symlink_to(f"/oldroot{outside}/hosts")
    (rootfs / "data").symlink_to(f"../../../../../../oldroot{outside}")
    (rootfs / "tmp").symlink_to("/data")
    volume = tmp_path / "volume"
    (volume / "sub").mkdir(parents=True)
    (volume / "sub" / "out").symlink_to(outside)
    with Root(os.open(rootfs.parent, os.O_PATH), "rootfs") as root:
        table = MountTable(root)
        assert table.place("/etc/hosts", make_empty_file) == f"/oldroot{outside}/hosts"
        assert table.place("/tmp", make_folder) == f"/oldroot{outside}"
        table.add(f"/oldroot{outside}", None, "/tmp")
        assert table.place("/data/x/y", make_folder) == f"/oldroot{outside}/x/y"  # in the tmpfs: bwrap's
        table.add("/vol", os.open(volume, os.O_PATH), str(volume))
        assert table.place("/vol/sub/new", make_folder) == "/vol/sub/new"
        with pytest.raises(Error, match="volume/sub/out is a symbolic link"):
            table.place("/vol/sub/out/x", make_folder)
        with pytest.raises(Error, match="is not a folder"):
            table.place("/etc/hosts", make_folder)
    assert (rootfs / "oldroot" / str(outside).lstrip("/") / "hosts").is_file()
    assert (volume / "sub" / "new").is_dir()
    assert not outside.exists()


def test_seed_copies_keep_modes_times_and_links(tmp_path):
    seed = tmp_path / "seed"
    (seed / "ro" / "deeper").mkdir(parents=True)
    (seed / "ro" / "deeper" / "f").write_text("data")
    (seed / "setuid").write_bytes(b"\x7fELF")
    (seed / "setuid").chmod(0o4755)
    (seed / "abs").symlink_to("/etc/passwd")
    (seed / "dangling").symlink_to("../../nowhere")
    (seed / "ro").chmod(0o555)
    seed.chmod(0o750)
    for number, path in enumerate([seed / "ro" / "deeper" / "f", seed / "ro" / "deeper", seed / "ro", seed]):
        os.utime(path, ns=(1, 1_000_000_000 + number))
    (tmp_path / "copy").mkdir()
    dest = os.open(tmp_path / "copy", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with Root(os.open(tmp_path, os.O_PATH), "seed") as source:
            assert copy_tree(source, dest) == 0
    finally:
        os.close(dest)
    assert snapshot(tmp_path / "copy") == snapshot(seed)
