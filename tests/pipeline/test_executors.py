"""The same build through datatrove's Ray and Slurm executors gives the same bytes as local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.shards import read_manifest

from .conftest import run_build
from .test_build import shard_digests

FAKE_SLURM = Path(__file__).parent / "fake_slurm"
SMALL = ("records.task_bytes=40000", "dedup.num_buckets=2", "dedup.hashes_per_bucket=4")


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
    # per-stage resources and parallel dedup settings: neither may change the output
    buckets = "executor.slurm.stages.minhash-buckets"
    resources = (f"{buckets}.cpus_per_task=4", f"{buckets}.mem_per_cpu_gb=8",
                 f"{buckets}.time=24:00:00", "executor.slurm.stages.tokenizer.cpus_per_task=3",
                 "dedup.workers_per_bucket=2", "dedup.exact_finder_workers=2")  # fmt: skip
    proc = run_build(dump.root, out, "--executor", "slurm", *SMALL, *resources)
    assert "submitted the build to Slurm" in proc.stdout
    # the clustering task's memory follows from its pair count (estimated: nothing ran yet)
    assert "maskscale: minhash-cluster: 4 GB per CPU (needs ~0.8 GB for ~" in proc.stdout
    scripts = {p.parents[1].name.split("-", 1)[1].rsplit("-", 1)[0]: p.read_text()
               for p in out.glob(".work/*/logs/launch_script.slurm")}  # fmt: skip
    assert "#SBATCH --cpus-per-task=4" in scripts["minhash-buckets"]
    assert "#SBATCH --mem-per-cpu=8G" in scripts["minhash-buckets"]
    assert "#SBATCH --time=24:00:00" in scripts["minhash-buckets"]
    assert "#SBATCH --array=0-3" in scripts["minhash-buckets"]  # 2 buckets x 2 workers
    assert "#SBATCH --array=0-1" in scripts["exact-find"]  # 2 finder workers
    assert "#SBATCH --cpus-per-task=3" in scripts["tokenizer"]
    assert "#SBATCH --cpus-per-task=1" in scripts["split"]  # the default
    assert "#SBATCH --time=12:00:00" in scripts["split"]
    submissions = [x for x in log.read_text().splitlines() if x.startswith("sbatch")]
    assert sum("--dependency=afterok" in x for x in submissions) == len(scripts) - 1 == 10
    assert read_manifest(out)["documents"] == read_manifest(local_small)["documents"]
    assert shard_digests(out) == shard_digests(local_small)


@pytest.mark.slow
def test_ray_matches_local(dump, local_small, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "c"
    run_build(dump.root, out, "--executor", "ray", *SMALL)
    assert shard_digests(out) == shard_digests(local_small)
