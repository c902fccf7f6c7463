"""The package's layering, read from the source: each module imports only modules before it in ORDER (the stages of
a pull in order, the leaves they share before them), so that no stage reaches into a later one."""

import ast
from pathlib import Path

import pytest

import dutils

PACKAGE = Path(dutils.__file__).parent
# Earliest first. A module may import those before it, never one after it; a new module must be placed here.
ORDER = [
    "__init__",
    "errors",
    "store",
    "locks",  # the flocks on folders, the cache and blobs, and the wait for what a container just ended lets go
    "reference",
    "oci",  # the OCI vocabulary: media types, limits, descriptors, JSON shape checks, the image config
    "progress",
    "auth",
    "transport",  # requests' sessions and transport errors, under registry
    "registry",
    "mirrors",  # each mirror in turn, then the origin: it walks registries
    "manifest",
    "fetch",
    "signature",  # imported by policy only when a policy asks for a signature
    "policy",
    "tarstream",
    "layout",  # images carried as files, read as a registry is: pipeline imports it only for them
    "rootfs",
    "tree",
    "apply",
    "config",
    "cache",
    "folder",
    "share",  # the store of applied trees, and the folders linked from it
    "dodo_api",
    "pipeline",
    "direct",  # a shared folder made from the store's complete tree by the pipeline's steps, without doit
    "runner",  # doit running the pipeline's tasks in d-pull's process
    "steps",
    "seccomp",
    "ports",
    "sandbox",
    "userns",  # the image's users and groups, read by sandbox's table helpers
    "overlay",  # where d-run --rw writes to a shared folder; d-pull --unshare copies its merged tree
    "pull",
    "mounts",
    "run",
]


def imported(path: Path) -> set[str]:
    """The dutils modules `path` imports, at its top or inside a function (a lazy import is an import all the same)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dutils."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("dutils.")}
    return names


MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_a_module_imports_only_earlier_stages_and_leaves(module: str) -> None:
    assert module in ORDER, f"dutils/{module}.py is not in ORDER: place it after the modules it imports"
    rank = {name: n for n, name in enumerate(ORDER)}
    later = {name for name in imported(PACKAGE / f"{module}.py") if rank.get(name, len(ORDER)) >= rank[module]}
    assert not later, f"dutils/{module}.py imports {sorted(later)}, which come at or after it in ORDER"


def test_the_reader_sees_every_form_of_import(tmp_path: Path) -> None:
    source = "from . import a, b\nfrom .c import d\nimport dutils.e\nfrom dutils.f import g\ndef h():\n    from .i import j\n"
    (tmp_path / "m.py").write_text(source)
    assert imported(tmp_path / "m.py") == {"a", "b", "c", "e", "f", "i"}
