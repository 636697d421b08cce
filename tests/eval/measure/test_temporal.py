"""maskscale eval temporal: period order, degradation with intervals, report files, gate, match."""

from __future__ import annotations

import json
import math

import pytest

from eval.measure.loading import load_model
from eval.measure.temporal import order_periods
from tests.eval.conftest import RECENT_RANGE, copy_run, run_cli

ARGS = ["--rows", "24", "--mc-samples", "4", "--batch-size", "8"]


@pytest.fixture
def pair(eval_runs, tmp_path):
    """Private copies of both runs side by side (the report goes next to them)."""
    runs = tmp_path / "runs"
    return copy_run(eval_runs.arm, runs / "arm"), copy_run(eval_runs.mdm, runs / "mdm")


def test_periods_follow_ranges_then_years_then_names():
    ranges = {
        "holdout_late": ["2031-01-01", "2035-12-31"],
        "holdout_x": ["1999-05-01", "1999-06-01"],
    }
    holdouts = ["holdout_misc", "holdout_late", "holdout_2020s", "holdout_2024", "holdout_x"]
    periods = order_periods(holdouts, ranges)
    assert [p["split"] for p in periods] == [
        "holdout_x", "holdout_2020s", "holdout_2024", "holdout_late", "holdout_misc",
    ]  # fmt: skip
    assert periods[1]["start"] == "2020-01-01" and periods[1]["end"] == "2029-12-31"
    assert periods[2]["end"] == "2024-12-31" and periods[4]["start"] is None


def test_report_files_numbers_and_mlflow(eval_runs, pair, capsys):
    from mlflow.tracking import MlflowClient

    arm, mdm = pair
    code, out, _ = run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS)
    assert code == 0
    folder = arm.parent / "eval-temporal"
    assert (folder / "temporal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (folder / "temporal.md").read_text()
    assert "| recent | " + " .. ".join(RECENT_RANGE) + " | arm |" in md
    assert str(folder / "temporal.md") in out and str(folder / "temporal.png") in out
    report = json.loads((folder / "temporal.json").read_text())
    assert [p["split"] for p in report["periods"]] == [
        "holdout_2021",
        "holdout_2023",
        "holdout_recent",
    ]
    assert report["gate"] is None and report["match"] is None
    for run_dir, run in zip((arm, mdm), report["runs"]):
        ppl = json.loads((run_dir / "eval" / "ppl.json").read_text())["splits"]
        assert run["validation"]["loss"] == ppl["validation"]["loss"]
        for p in run["periods"]:
            deg = ppl[p["split"]]["loss"] - ppl["validation"]["loss"]
            assert p["degradation"] == pytest.approx(deg)
            assert p["ppl_ratio"] == pytest.approx(math.exp(deg))
            lo, hi = p["degradation_ci"]
            assert lo < p["degradation"] < hi
            assert p["ppl_ratio_ci"] == pytest.approx([math.exp(lo), math.exp(hi)])
    recent = {r["family"]: r["periods"][-1] for r in report["runs"]}
    assert recent["arm"]["degradation_ci"][0] > 1.0  # random text vs learned ramps
    client = MlflowClient(eval_runs.mlflow_uri)
    for run_dir in (arm, mdm):
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        hist = client.get_metric_history(run_id, "eval/temporal/holdout_recent/degradation")
        assert hist and hist[-1].step == 20
        names = {a.path for a in client.list_artifacts(run_id, "eval")}
        assert {"eval/temporal.md", "eval/temporal.png", "eval/temporal.json"} <= names


def test_reuses_ppl_results_only_when_settings_match(pair, capsys):
    arm, _ = pair
    assert run_cli(capsys, "eval", "temporal", arm, *ARGS)[0] == 0
    ppl = arm / "eval" / "ppl.json"
    stamp = ppl.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "eval", "temporal", arm, *ARGS)
    assert code == 0 and "reused saved ppl results" in out and ppl.stat().st_mtime_ns == stamp
    assert (arm / "eval" / "temporal" / "temporal.md").is_file()  # one run: its own folder
    code, out, _ = run_cli(capsys, "eval", "temporal", arm, *ARGS, "--seed", "3")
    assert code == 0 and "reused" not in out
    assert json.loads(ppl.read_text())["settings"]["seed"] == 3


def test_gate_exits_1_naming_each_failing_period_and_0_below(pair, capsys):
    arm, mdm = pair
    assert run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS)[0] == 0
    report = json.loads((arm.parent / "eval-temporal" / "temporal.json").read_text())
    lows = {
        (r["run"], p["split"]): p["degradation_ci"][0] for r in report["runs"] for p in r["periods"]
    }
    top = max(lows.values())
    threshold = top - 1e-3
    code, out, err = run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS,
                             "--max-degradation", threshold)  # fmt: skip
    assert code == 1
    failing = sorted(k for k, low in lows.items() if low > threshold)
    assert failing and all(f"{run}/{split}" in err for run, split in failing)
    gate = json.loads((arm.parent / "eval-temporal" / "temporal.json").read_text())["gate"]
    assert sorted((f["run"], f["period"]) for f in gate["failures"]) == failing
    assert "FAILED" in out
    code, out, err = run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS,
                             "--max-degradation", top + 1e-3)  # fmt: skip
    assert code == 0 and "passed" in out and "FAILED" not in err


def test_match_needs_both_families(pair, capsys):
    arm, _ = pair
    code, _, err = run_cli(capsys, "eval", "temporal", arm, *ARGS, "--match")
    assert code == 2 and "--match needs at least one ARM run and one MDM run" in err
    assert not (arm / "eval").exists()  # refused before anything was computed


def test_match_among_three_runs(eval_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    arm = copy_run(eval_runs.arm, runs / "arm", checkpoints=True)
    mdm = copy_run(eval_runs.mdm, runs / "mdm")
    early = load_model(arm, checkpoint=10, weights=False).export_dir  # an ARM at step 10
    code, out, _ = run_cli(capsys, "eval", "temporal", arm, early, mdm, *ARGS, "--match")
    assert code == 0
    report = json.loads((runs / "eval-temporal" / "temporal.json").read_text())
    val = report["match"]["val_loss"]
    assert set(val) == {"arm", "step00000010", "mdm"}
    best = min(("arm", "step00000010"), key=lambda a: abs(val[a] - val["mdm"]))
    assert (report["match"]["arm"], report["match"]["mdm"]) == (best, "mdm")
    assert [r["run"] for r in report["runs"]] == [best, "mdm"]
    assert f"Matched at validation loss: ARM `{best}`" in out


def test_demo_runs_the_temporal_report_on_its_two_runs(pair, tmp_path, capsys):
    from eval.demo.config import DemoEval
    from eval.demo.run import temporal

    arm, mdm = pair
    runs = {"arm": str(arm), "mdm": str(mdm)}
    out = temporal(tmp_path, runs, DemoEval(rows=16, mc_samples=2, bootstrap=100))
    assert out == tmp_path / "temporal"
    assert {p.name for p in out.iterdir()} == {"temporal.md", "temporal.png", "temporal.json"}
    assert "| recent |" in capsys.readouterr().out
