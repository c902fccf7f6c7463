"""rootfs: names resolve inside the root, and no malicious layer changes anything outside it."""

import os
import shutil
from pathlib import Path

import pytest
from malicious import (
    ROWS,
    USER,
    Layer,
    Row,
    apply_all,
    apply_as_user,
    as_root,
    check_outcome,
    make_workspace,
    outside_state,
    plant_markers,
    write_layer,
)

from dutils.errors import Error
from dutils.rootfs import Tree, clean


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("etc/passwd", "etc/passwd"),
        ("./etc/./passwd", "etc/passwd"),
        ("/etc/passwd", "etc/passwd"),
        ("//etc//passwd/", "etc/passwd"),
        ("../../etc/passwd", "etc/passwd"),
        ("a/../../b", "b"),
        ("..", ""),
        ("./", ""),
    ],
)
def test_clean_makes_names_relative_and_clamps_dotdot(name: str, path: str) -> None:
    assert clean(name) == path


def test_parents_resolve_through_symlinks_rerooted_at_the_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "real" / "sub").mkdir(parents=True)
    (rootfs / "abs").symlink_to("/real")
    (rootfs / "rel").symlink_to("real/sub/../..")
    (rootfs / "up").symlink_to("../../../../real")
    (rootfs / "real" / "loop").symlink_to("loop")
    with Tree(rootfs, "sha256:test") as tree:
        for name, path in [
            ("abs/sub/f", "real/sub/f"),
            ("rel/real/f", "real/f"),
            ("up/sub/f", "real/sub/f"),
            ("abs/sub/../../x", "x"),  # cleaned as a name first, as umoci does
            ("abs", "abs"),  # the last component is never followed
            ("new/dirs/f", "new/dirs/f"),
        ]:
            with tree.parent(name) as place:
                assert place.path == path
        assert (rootfs / "new" / "dirs").is_dir()
        assert tree.find("missing/f") is None
        assert not (rootfs / "missing").exists()
        with pytest.raises(OSError, match="Too many levels"):
            tree.parent("real/loop/f")
        tree.finish()
    assert not list(tmp_path.glob(".*journal"))


def apply_row(layers: list[Layer], rootfs: Path) -> str:
    try:
        apply_all(layers, rootfs)
    except Error as err:
        return str(err)
    return ""


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_malicious_layer_changes_nothing_outside_the_rootfs(row: Row, tmp_path: Path, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("outside")
    rootfs = tmp_path / "pull" / "rootfs"
    plant_markers(tmp_path / "victim.txt", tmp_path / "pull" / "victim.txt", out / "victim.txt")
    layers = [write_layer(tmp_path, tar.to_bytes()) for tar in row.layers(str(out))]
    rootfs.mkdir()
    passwd = os.stat("/etc/passwd")
    before = outside_state([tmp_path, out])

    error = apply_row(layers, rootfs)

    assert outside_state([tmp_path, out]) == before
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    check_outcome(row, error, rootfs, out)


@as_root
def test_malicious_layers_change_nothing_outside_as_an_ordinary_user(unprivileged) -> None:
    """The same table, applied by a real unprivileged user who could write to every marker."""
    workspace = make_workspace()
    try:
        out = workspace / "pull" / "outside"
        steps, checks = [], []
        for row in ROWS:
            folder = workspace / "pull" / row.name
            plant_markers(folder / "victim.txt", out / row.name / "victim.txt")
            (folder / "rootfs").mkdir()
            layers = [write_layer(workspace, tar.to_bytes()) for tar in row.layers(str(out / row.name))]
            steps += [(layer, folder / "rootfs") for layer in layers]
            checks.append((row, len(steps) - 1))
        for path in (workspace / "pull").rglob("*"):
            shutil.chown(path, USER, USER)
        before = outside_state([workspace])

        results = apply_as_user(unprivileged, workspace, steps)

        assert outside_state([workspace]) == before
        for row, last in checks:
            error = results[last] if isinstance(results[last], str) else ""
            check_outcome(row, error, workspace / "pull" / row.name / "rootfs", out / row.name)
    finally:
        shutil.rmtree(workspace)
