"""rootfs: names resolve inside the root (the malicious layers are in test_attacks_layers.py)."""

from pathlib import Path

import pytest

from dutils.rootfs import clean
from dutils.tree import Tree


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
