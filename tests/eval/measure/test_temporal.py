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


def _report(arm):
    return json.loads((arm.parent / "eval-temporal" / "temporal.json").read_text())


def test_gate_passes_fails_or_says_it_cannot_tell(pair, capsys):
    arm, mdm = pair
    assert run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS)[0] == 0
    cis = {(r["run"], p["split"]): p["degradation_ci"] for r in _report(arm)["runs"]
           for p in r["periods"]}  # fmt: skip
    assert all(ci is not None for ci in cis.values())
    los, his = [c[0] for c in cis.values()], [c[1] for c in cis.values()]
    gate = [*ARGS, "--max-degradation"]

    # above every upper bound: pass (0)
    code, out, err = run_cli(capsys, "eval", "temporal", arm, mdm, *gate, max(his) + 1e-3)
    assert code == 0 and "**PASS**" in out and _report(arm)["gate"]["outcome"] == "pass"

    # below the highest lower bound: that period fails (1), named on stderr
    threshold = max(los) - 1e-3
    code, out, err = run_cli(capsys, "eval", "temporal", arm, mdm, *gate, threshold)
    failing = sorted(k for k, ci in cis.items() if ci[0] > threshold)
    assert code == 1 and failing and "**FAIL**" in out
    assert all(f"{run}/{split}" in err for run, split in failing)
    g = _report(arm)["gate"]
    assert sorted((f["run"], f["period"]) for f in g["failures"]) == failing
    assert {r["outcome"] for r in g["periods"]} <= {"pass", "fail", "inconclusive"}

    # at or above every lower bound but under the highest upper one: inconclusive (3)
    inside = (max(los) + max(his)) / 2
    code, out, _ = run_cli(capsys, "eval", "temporal", arm, mdm, *gate, inside)
    assert code == 3 and "**INCONCLUSIVE**" in out
    assert any("straddles" in r["reason"] for r in _report(arm)["gate"]["periods"])
    assert run_cli(capsys, "eval", "temporal", arm, mdm, *gate, inside, "--inconclusive", "pass")[0] == 0  # fmt: skip
    assert run_cli(capsys, "eval", "temporal", arm, mdm, *gate, inside, "--inconclusive", "fail")[0] == 1  # fmt: skip


def test_gate_refuses_a_non_finite_threshold(pair, capsys):
    arm, _ = pair
    code, _, err = run_cli(capsys, "eval", "temporal", arm, *ARGS, "--max-degradation", "nan")
    assert code == 2 and "finite" in err
    assert not (arm / "eval").exists()  # refused before anything was computed


def test_gate_verdicts_on_thin_or_broken_data():
    from eval.measure.gate import gate, verdict

    assert verdict({"degradation_ci": [0.01, 0.02]}, 0.05)[0] == "pass"
    assert verdict({"degradation_ci": [0.06, 0.09]}, 0.05)[0] == "fail"
    assert verdict({"degradation_ci": [0.01, 0.09]}, 0.05)[0] == "inconclusive"
    assert verdict({"degradation_ci": [0.05, 0.05]}, 0.05)[0] == "pass"  # at the threshold
    one_doc = {"degradation_ci": None, "no_interval": "holdout_x: too few documents (1 < 5)"}
    assert verdict(one_doc, 0.05) == ("inconclusive", one_doc["no_interval"])
    assert verdict({"degradation_ci": [float("nan"), 0.0]}, 0.05)[0] == "inconclusive"
    runs = [{"run": "a", "periods": [{"split": "p1", "degradation": 0.0, "degradation_ci": [0.0, 0.01]},
                                     {"split": "p2", "degradation": float("nan"), **one_doc}]}]  # fmt: skip
    g = gate(runs, 0.05)
    assert (g["outcome"], g["exit_code"]) == ("inconclusive", 3)
    assert gate(runs, 0.05, "pass")["exit_code"] == 0
    runs[0]["periods"].append({"split": "p3", "degradation": 1.0, "degradation_ci": [0.9, 1.1]})
    assert gate(runs, 0.05, "pass")["outcome"] == "fail"  # any failure wins


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


def test_a_one_document_period_makes_the_gate_inconclusive(eval_runs, pair, tmp_path, capsys):
    from tests.eval.measure.test_ppl import _one_document_corpus

    corpus, _, _ = _one_document_corpus(eval_runs, tmp_path)
    arm, _ = pair
    argv = ["eval", "temporal", arm, "--corpus", corpus, *ARGS, "--max-degradation", "100"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 3 and "INCONCLUSIVE" in err
    report = json.loads((arm / "eval" / "temporal" / "temporal.json").read_text())
    verdicts = {r["period"]: r for r in report["gate"]["periods"]}
    assert verdicts["holdout_one"]["outcome"] == "inconclusive"
    assert "too few documents (1 < 5)" in verdicts["holdout_one"]["reason"]
    assert verdicts["holdout_2021"]["outcome"] == "pass"  # the others decide
    assert "no interval: holdout_one: too few documents" in out


def test_runs_on_different_corpora_are_refused_unless_mixed(eval_runs, pair, tmp_path, capsys):
    import shutil

    from tests.eval.conftest import add_split

    arm, mdm = pair
    other = shutil.copytree(eval_runs.corpus, tmp_path / "other")
    add_split(other, "holdout_extra", [[5] * 33], [0])  # another manifest, same tokenizer
    for path in (mdm / "config.yaml", mdm / "export" / "config.json"):
        if path.is_file():
            path.write_text(path.read_text().replace(str(eval_runs.corpus), str(other)))
    code, _, err = run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS)
    assert code == 2 and str(arm) in err and str(mdm) in err and "corpus manifests" in err
    assert not (arm / "eval").exists()  # refused before anything was computed
    assert run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS, "--allow-mixed")[0] == 0


def test_paired_difference_of_degradation_between_the_families(pair, capsys):
    arm, mdm = pair
    code, out, _ = run_cli(capsys, "eval", "temporal", arm, mdm, *ARGS)
    assert code == 0
    report = _report(arm)
    (paired,) = report["pairs"]
    assert (paired["arm"], paired["mdm"]) == ("arm", "mdm")
    degr = {(r["run"], p["split"]): p for r in report["runs"] for p in r["periods"]}
    for row in paired["periods"]:
        split = row["split"]
        want = degr[("mdm", split)]["degradation"] - degr[("arm", split)]["degradation"]
        assert row["difference"] == pytest.approx(want, abs=1e-12)
        lo, hi = row["difference_ci"]
        assert lo <= row["difference"] <= hi
        # pairing: narrower than what two independent intervals would allow together
        a, m = degr[("arm", split)]["degradation_ci"], degr[("mdm", split)]["degradation_ci"]
        assert hi - lo < (a[1] - a[0]) + (m[1] - m[0])
    assert "MDM `mdm` - ARM `arm` degradation (paired bootstrap" in out
    assert set(report["settings"]) == {"arm", "mdm"}  # every run's settings, not the first's
