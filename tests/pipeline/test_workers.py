"""The local executor's forkserver preloads the pipeline modules -- the same files we use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# run from another folder, with this tree put on sys.path at run time (as benchmarks do): a
# forkserver that preloaded by name from its own default path would import another copy
SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import multiprocess
from pipeline.build import preload_workers

if __name__ == "__main__":
    preload_workers()
    with multiprocess.get_context("forkserver").Pool(1) as pool:
        # KeyError unless the worker's forkserver had imported it before forking
        child = pool.apply(eval, ("__import__('sys').modules['pipeline.build'].__file__",))
    print(child)
    print(sys.modules["pipeline.build"].__file__)
"""


def test_forkserver_preloads_this_trees_pipeline(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    child, parent = proc.stdout.split()
    assert child == parent == str(ROOT / "pipeline" / "build.py")
