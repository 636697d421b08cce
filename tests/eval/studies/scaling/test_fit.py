"""`maskscale sweep fit`: IsoFLOP optima with uncertainty, power laws, the ARM/MDM compute gap,
and missing/failed runs listed instead of fitted around.

The study-level test plans the paper's grid with the real planner, then gives every planned run
a summary.json whose loss is a parabola in ln N around an optimum on the paper's optimal-loss
curve (paper-notes.md, claim 1); the fit must recover the paper's exponents and its ~16x gap.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from eval.studies.scaling.laws import fit_isoflop
from tests.eval.conftest import ROOT, run_cli

PAPER_BUDGETS = [6e18, 1e19, 3e19, 6e19, 1e20]
PAPER_L_OPT = {"mdm": [3.37, 3.26, 3.04, 2.92, 2.83], "arm": [2.85, 2.75, 2.56, 2.45, 2.38]}
CURVATURE = 0.04  # nats per (ln N)^2 around the optimum


def n_opt(family: str, c: float) -> float:
    """A planted N_opt(C) = k C^0.5: ~200M (ARM) at 6e18; the MDM's half the ARM's."""
    return (0.0816 if family == "arm" else 0.0408) * c**0.5


def test_parabola_recovers_a_planted_optimum():
    rng = np.random.default_rng(0)
    n = np.geomspace(2e7, 2e9, 9)
    true_n, true_l, sigma = 3.1e8, 2.9, 0.003
    loss = true_l + 0.05 * (np.log(n) - math.log(true_n)) ** 2 + rng.normal(0, sigma, n.size)
    opt = fit_isoflop(1e19, n.tolist(), loss.tolist())
    assert opt.fitted and not opt.extrapolated and opt.N_opt_log_std is not None
    assert abs(math.log(opt.N_opt / true_n)) < 3 * opt.N_opt_log_std
    assert opt.N_opt_log_std < 0.3  # a usable interval: within x/÷ 1.35
    assert abs(opt.L_opt - true_l) < 3 * opt.L_opt_std + 1e-9


def test_parabola_edge_cases():
    exact = fit_isoflop(1e19, [1e7, 1e8, 1e9], [3.1, 3.0, 3.1])
    assert exact.N_opt == pytest.approx(1e8) and exact.N_opt_log_std is None
    assert "exactly 3 points" in exact.note
    assert not fit_isoflop(1e19, [1e7, 1e8, 1e9], [3.0, 3.1, 3.0]).fitted  # no minimum
    assert not fit_isoflop(1e19, [1e7, 1e8], [3.0, 2.9]).fitted  # too few points
    edge = fit_isoflop(1e19, [1e7, 1e8, 1e9, 1e10], [3.3, 3.1, 3.0, 2.95])
    assert edge.extrapolated and "outside the sampled sizes" in edge.note


def plant_losses(sweep_dir):
    """summary.json for every planned run: a parabola in ln N around the paper's L_opt(C)."""
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    for p in sweep["points"]:
        if p["C"] not in PAPER_BUDGETS:
            continue
        l_opt = PAPER_L_OPT[p["family"]][PAPER_BUDGETS.index(p["C"])]
        loss = l_opt + CURVATURE * math.log(p["N"] / n_opt(p["family"], p["C"])) ** 2
        summary = {"model": p["size"], "N": p["N"], "val": {"val/validation/loss": loss}}
        (sweep_dir / "runs" / p["name"] / "summary.json").write_text(json.dumps(summary))
    return sweep


def test_fit_recovers_paper_exponents_gap_and_lists_missing_runs(tmp_path, capsys):
    out = tmp_path / "paper"
    budgets = ",".join(f"{c:g}" for c in [*PAPER_BUDGETS, 2e18])
    code, _, err = run_cli(
        capsys, "sweep", "plan", "--budgets", budgets, "--sizes", "paper", "--config",
        ROOT / "configs/train/paper.yaml", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    plant_losses(out)
    runs = out / "runs"
    (runs / "arm-6M-C1e19/summary.json").unlink()  # not run
    (runs / "mdm-2121M-C6e19/summary.json").unlink()
    (runs / "mdm-2121M-C6e19/failed.json").write_text('{"returncode": 1}')
    for name in ("arm-19M-C2e18", "arm-34M-C2e18"):  # only 2 finished points at 2e18
        (runs / name / "summary.json").write_text(
            json.dumps({"val": {"val/validation/loss": 3.0 + len(name) / 100}})
        )

    code, stdout, err = run_cli(capsys, "sweep", "fit", out, "--no-mlflow")
    assert code == 0, err
    fit = json.loads((out / "fit/fit.json").read_text())
    mdm, arm = fit["families"]["mdm"], fit["families"]["arm"]
    assert -mdm["loss_law"]["exponent"] == pytest.approx(0.0625, abs=0.002)
    assert -arm["loss_law"]["exponent"] == pytest.approx(0.0642, abs=0.002)
    assert mdm["loss_law"]["coef"] == pytest.approx(50.3, rel=0.05)
    assert arm["loss_law"]["coef"] == pytest.approx(45.6, rel=0.05)
    assert arm["size_law"]["exponent"] == pytest.approx(0.5, abs=0.01)
    gaps = {g["C"]: g["multiple"] for g in fit["gap"]}
    for c in (1e19, 3e19, 6e19, 1e20):
        assert 14 < gaps[c] < 18, gaps
    assert 14 < fit["gap_geomean"] < 18
    for r in fit["size_ratio"]:
        assert r["mdm_over_arm_N_opt"] == pytest.approx(0.5, rel=0.05)
    for family, fitted in (("arm", arm), ("mdm", mdm)):  # planted parabolas: exact vertices
        for o in fitted["optima"]:
            if o["C"] in PAPER_BUDGETS:
                assert o["N_opt"] == pytest.approx(n_opt(family, o["C"]), rel=1e-3)
    report = (out / "fit/report.md").read_text()
    assert "| arm-6M-C1e19 | not run |" in report
    assert "| mdm-2121M-C6e19 | failed |" in report
    assert "| arm | 2e+18 | 2 | - | - | not fittable: 2 finished points (< 3) |" in report
    assert "not run" in stdout
    for png in ("isoflop.png", "scaling.png"):
        assert (out / "fit" / png).stat().st_size > 10_000


TINY_03M_N = 295_392


def tiny_sweep(tmp_path, capsys, corpus, mlflow: bool = False):
    """A planned 3-budget x 2-family sweep on ``corpus`` (tiny-0.3M) whose run folders hold
    the summary.json and eval_rows.json of the fixture's trained ARM or MDM."""
    budgets = ",".join(f"{s * 6 * TINY_03M_N * 16 * 32:.6e}" for s in (20, 40, 80))
    extra = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"] if mlflow else []
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        capsys, "sweep", "plan", "--budgets", budgets, "--sizes", "tiny-0.3M", "--corpus",
        corpus, "--out", out, "--config", ROOT / "configs/train/tiny-cpu.yaml",
        "eval.max_rows=32", *extra,
    )  # fmt: skip
    assert code == 0, err
    return out, json.loads((out / "sweep.json").read_text())


def fill_runs(sweep: dict, eval_runs) -> None:
    for p in sweep["points"]:
        src = eval_runs.arm if p["family"] == "arm" else eval_runs.mdm
        for name in ("summary.json", "eval_rows.json"):
            shutil.copy(src / name, Path(p["run_dir"]) / name)


def validated_rows(run_dir) -> np.ndarray:
    record = json.loads((Path(run_dir) / "eval_rows.json").read_text())
    return np.asarray(record["splits"]["validation"]["row_index"], dtype=np.int64)


def direct_unigram(corpus, rows=None) -> float:
    from eval.measure.unigram import unigram_baseline

    return unigram_baseline(corpus, ["validation"], {"validation": rows} if rows is not None
                            else None)["validation"]  # fmt: skip


def test_fit_reports_the_unigram_on_the_runs_rows(eval_runs, tmp_path, capsys):
    out, sweep = tiny_sweep(tmp_path, capsys, eval_runs.corpus, mlflow=True)
    fill_runs(sweep, eval_runs)
    rows = validated_rows(eval_runs.arm)
    assert len(rows) == 32 and np.array_equal(rows, validated_rows(eval_runs.mdm))
    expected = direct_unigram(eval_runs.corpus, rows)

    code, stdout, err = run_cli(capsys, "sweep", "fit", out)
    assert code == 0, err
    fit = json.loads((out / "fit/fit.json").read_text())
    uni = fit["unigram"]
    assert uni["value"] == pytest.approx(expected, abs=1e-12)
    assert [(g["rows"], g["rows_source"], len(g["runs"])) for g in uni["groups"]] == [
        (32, "sample from eval_rows.json", 6)
    ]
    for p in fit["points"]:
        assert p["unigram"] == pytest.approx(expected, abs=1e-12)
        assert p["below_unigram"] == pytest.approx(expected - p["loss"], abs=1e-12)
    planned = {p["name"]: Path(p["run_dir"]) for p in sweep["points"]}
    for p in fit["points"]:  # folders relative to the fit folder: no path of this machine
        assert not Path(p["run_dir"]).is_absolute() and not Path(p["corpus"]).is_absolute()
        assert (out / "fit" / p["run_dir"]).resolve() == planned[p["name"]].resolve()
        assert (out / "fit" / p["corpus"]).resolve() == Path(eval_runs.corpus).resolve()
    assert str(tmp_path) not in (out / "fit/fit.json").read_text()
    report = (out / "fit/report.md").read_text()
    assert str(tmp_path) not in report and report.startswith(f"# Scaling-law fit: sweep {out.name}")
    assert "| family | size | N | C | loss | unigram | below unigram | status |" in report
    mdm_loss = json.loads((eval_runs.mdm / "summary.json").read_text())["val"]
    mdm_loss = mdm_loss["val/validation/loss"]
    assert f"| {mdm_loss:.4f} | {expected:.4f} | {expected - mdm_loss:+.4f} | finished |" in report
    below = 3 if mdm_loss < expected else 0
    assert f"- MDM: {below} of 3 points below the unigram; smallest margin" in report
    assert f"**{expected:.4f}** nats over 32 rows (sample from eval_rows.json; all runs" in stdout
    assert (out / "fit/isoflop.png").stat().st_size > 10_000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep["tracking"]["experiment"])
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.fit` = '1'")
    assert run.data.metrics["unigram_loss"] == pytest.approx(expected, abs=1e-12)
    assert run.data.metrics["mdm_points_below_unigram"] == below


def test_unigram_per_run_when_rows_differ_and_all_rows_without_a_record(
    eval_runs, tmp_path, capsys
):
    out, sweep = tiny_sweep(tmp_path, capsys, eval_runs.corpus)
    fill_runs(sweep, eval_runs)
    mdm = [p for p in sweep["points"] if p["family"] == "mdm"]
    other = Path(mdm[0]["run_dir"]) / "eval_rows.json"  # another sample of 10 rows
    record = json.loads(other.read_text())
    record["splits"]["validation"]["row_index"] = list(range(0, 100, 10))
    other.write_text(json.dumps(record))
    (Path(mdm[1]["run_dir"]) / "eval_rows.json").unlink()

    code, stdout, err = run_cli(capsys, "sweep", "fit", out, "--no-mlflow")
    assert code == 0, err
    fit = json.loads((out / "fit/fit.json").read_text())
    assert fit["unigram"]["value"] is None and len(fit["unigram"]["groups"]) == 3
    got = {p["name"]: p["unigram"] for p in fit["points"]}
    assert got[mdm[0]["name"]] == pytest.approx(
        direct_unigram(eval_runs.corpus, np.arange(0, 100, 10)), abs=1e-12
    )
    assert got[mdm[1]["name"]] == pytest.approx(direct_unigram(eval_runs.corpus), abs=1e-12)
    shared = direct_unigram(eval_runs.corpus, validated_rows(eval_runs.arm))
    assert got[mdm[2]["name"]] == pytest.approx(shared, abs=1e-12)
    assert "over 100 rows (every row: no eval_rows.json; " + mdm[1]["name"] in stdout


def test_missing_corpus_is_a_note_and_no_unigram_skips(eval_runs, tmp_path, capsys):
    corpus = shutil.copytree(eval_runs.corpus, tmp_path / "gone")
    out, sweep = tiny_sweep(tmp_path, capsys, corpus)
    fill_runs(sweep, eval_runs)
    shutil.rmtree(corpus)
    code, stdout, err = run_cli(capsys, "sweep", "fit", out, "--no-mlflow")
    assert code == 0, err
    assert f"corpus {corpus} not found on disk (no manifest.json); 6 run(s)" in stdout
    fit = json.loads((out / "fit/fit.json").read_text())
    assert fit["unigram"]["value"] is None and len(fit["unigram"]["without_baseline"]) == 6
    assert "| - | - | finished |" in (out / "fit/report.md").read_text()

    code, stdout, err = run_cli(capsys, "sweep", "fit", out, "--no-mlflow", "--no-unigram")
    assert code == 0, err
    assert "unigram" not in (out / "fit/report.md").read_text()
    assert json.loads((out / "fit/fit.json").read_text())["unigram"]["skipped"]


def test_envelope_law_and_gap_when_the_optimum_is_below_the_smallest_size():
    """Losses that grow with N at every budget (the smallest size wins, as in small CPU
    studies): the parabola's vertex is extrapolated, the envelope still gives the planted
    exponent and the compute gap (45/40)^(1/0.06)."""
    from eval.studies.scaling.laws import fit_study, to_json

    sizes, budgets = (7e4, 1.3e5, 3e5), (2e12, 2.8e12, 4e12)
    points = [
        {"family": fam, "N": n, "C": c, "loss": a * c**-0.06 + 0.1 * np.log(n / sizes[0]) ** 2
         + 0.05 * np.log(n / sizes[0])}
        for fam, a in (("arm", 40.0), ("mdm", 45.0)) for c in budgets for n in sizes
    ]  # fmt: skip
    data = to_json(fit_study(points))
    for fam, a in (("arm", 40.0), ("mdm", 45.0)):
        fit = data["families"][fam]
        assert all(o["extrapolated"] or not o["fitted"] for o in fit["optima"])
        assert fit["loss_law"] is None  # no in-range vertex to fit
        assert [e["N"] for e in fit["envelope"]] == [7e4] * 3
        assert all(e["at_edge"] for e in fit["envelope"])
        assert fit["envelope_law"]["exponent"] == pytest.approx(-0.06, abs=1e-9)
        assert fit["envelope_law"]["coef"] == pytest.approx(a, rel=1e-9)
    for g in data["envelope_gap"]:
        assert g["multiple"] == pytest.approx((45 / 40) ** (1 / 0.06), rel=1e-6)
    assert data["envelope_gap_geomean"] == pytest.approx((45 / 40) ** (1 / 0.06), rel=1e-6)
