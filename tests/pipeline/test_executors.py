"""The same build through datatrove's Ray and Slurm executors gives the same bytes as local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.shards import read_manifest

from .conftest import run_build
from .test_build import shard_digests

FAKE_SLURM = Path(__file__).parent / "fake_slurm"
SMALL = ("executor.tasks=2", "dedup.num_buckets=2", "dedup.hashes_per_bucket=4")


@pytest.fixture(scope="module")
def local_small(dump, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "c"
    run_build(dump.root, out, *SMALL)
    return out


@pytest.mark.slow
def test_slurm_chain_matches_local(dump, local_small, tmp_path, monkeypatch):
    """Slurm path: dependent array jobs submitted via sbatch (a test double runs them)."""
    log = tmp_path / "slurm.log"
    bin_dir = Path(os.__file__).parents[3] / "bin"  # the venv's bin: launch_pickled_pipeline
    path = f"{FAKE_SLURM}:{Path(os.sys.executable).parent}:{bin_dir}:{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    out = tmp_path / "c"
    proc = run_build(dump.root, out, "--executor", "slurm", *SMALL)
    assert "submitted the build to Slurm" in proc.stdout
    submissions = [x for x in log.read_text().splitlines() if x.startswith("sbatch")]
    assert sum("--dependency=afterok" in x for x in submissions) >= 10, log.read_text()[-3000:]
    assert read_manifest(out)["documents"] == read_manifest(local_small)["documents"]
    assert shard_digests(out) == shard_digests(local_small)


@pytest.mark.slow
def test_ray_matches_local(dump, local_small, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "c"
    run_build(dump.root, out, "--executor", "ray", *SMALL)
    assert shard_digests(out) == shard_digests(local_small)
