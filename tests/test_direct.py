"""direct.py: a shared folder made without doit. What it makes is compared with the pipeline's in test_share.py
(test_a_folder_made_from_a_complete_tree_is_the_pipeline_s_and_starts_no_doit)."""

import subprocess
import sys


def test_it_loads_neither_doit_nor_the_layer_machinery():
    code = "import sys, dutils.direct; print(*sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "dutils.pipeline" in loaded and "dutils.share" in loaded
    assert not {"doit", "dutils.runner", "dutils.apply", "dutils.tree", "sqlite3"} & set(loaded)
