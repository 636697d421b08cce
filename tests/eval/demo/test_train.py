"""The demo's side-by-side training (eval/demo/train.py): real ``maskscale train`` processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eval.demo.train import Run, TrainingFailed, train_side_by_side
from tests.eval.conftest import ROOT
from tests.trainer.conftest import make_corpus

RECIPE = ROOT / "configs/train/tiny-cpu.yaml"


def test_metrics_are_read_line_by_line_and_the_step_count_from_the_log(tmp_path):
    run = Run("mdm", tmp_path, subprocess.Popen([sys.executable, "-c", "pass"]))
    (tmp_path / "train.log").write_text("[rank0] mdm tiny-1M: N=1 D=2 C=3 steps=40 micro=8\n")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 10, "loss": 6.5}) + '\n{"step": 20, "lo')
    run.poll_metrics()
    assert (run.total, run.step, run.last) == (40, 10, {"loss": 6.5})  # half a line: not yet
    with open(metrics, "a") as f:
        f.write('ss": 6.0}\n' + json.dumps({"step": 20, "val/validation/loss": 6.1}) + "\n")
    run.poll_metrics()
    assert run.step == 20 and run.last == {"loss": 6.0, "val/validation/loss": 6.1}
    run.proc.wait()


def test_a_failed_run_stops_the_other_and_shows_its_log(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=16, kind="ramp")
    good = [f"corpus={corpus}", "objective=arm", "model=tiny-0.3M", "steps=100000",
            f"run_dir={tmp_path / 'arm'}",
            "tracking.enabled=false", "checkpoint.every=0"]  # fmt: skip
    bad = [
        "corpus=/nonexistent/corpus",
        "objective=mdm",
        "tracking.enabled=false",
        f"run_dir={tmp_path / 'mdm'}",
    ]
    jobs = {"arm": (RECIPE, good, tmp_path / "arm"), "mdm": (RECIPE, bad, tmp_path / "mdm")}
    with pytest.raises(TrainingFailed, match=r"(?s)MDM training failed.*nonexistent"):
        train_side_by_side(jobs, cores=2)
    assert not (tmp_path / "arm" / "summary.json").exists()  # stopped, not run to its end


@pytest.mark.slow
def test_two_runs_train_side_by_side_to_their_summaries(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=16, kind="ramp")
    jobs = {}
    for family in ("arm", "mdm"):
        overrides = [f"corpus={corpus}", f"objective={family}", "model=tiny-0.3M", "steps=4",
                     f"run_dir={tmp_path / family}", "tracking.enabled=false", "log.every=1",
                     "eval.max_rows=8", "eval.n_samples=2"]  # fmt: skip
        jobs[family] = (RECIPE, overrides, tmp_path / family)
    summaries = train_side_by_side(jobs, cores=2)
    assert {f: s["steps"] for f, s in summaries.items()} == {"arm": 4, "mdm": 4}
    for family in ("arm", "mdm"):
        log = (tmp_path / family / "train.log").read_text()
        assert "steps=4" in log and (tmp_path / family / "export" / "model.safetensors").is_file()
