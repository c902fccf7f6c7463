"""rootfs: names resolve inside the root (the malicious layers are in test_attacks_layers.py)."""

import random
from pathlib import Path

import pytest

from dutils.rootfs import Hashes, Tree, clean


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


def test_path_hashes_hold_what_was_added_across_merges() -> None:
    hashes, added = Hashes(), set()
    hashes.RECENT = 7  # merges every 7 additions
    rng = random.Random(5)
    for _ in range(500):
        value = rng.randrange(-(2**63), 2**63)
        hashes.add(value)
        added.add(value)
    assert len(hashes.merged) == 497 and len(hashes.recent) == 3
    assert all(value in hashes for value in added)
    assert not any(value in hashes for value in (rng.randrange(-(2**63), 2**63) for _ in range(500)))
