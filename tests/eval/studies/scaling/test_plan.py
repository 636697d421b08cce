"""`maskscale sweep plan`: the IsoFLOP grid resolves steps as the trainer does, writes loadable
configs, shows epochs of the corpus, and refuses points with less than one step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.configlib import ConfigError
from tests.eval.conftest import ROOT, run_cli
from tests.trainer.conftest import make_corpus

TINY_03M_N = 295_392  # configs/model/tiny-0.3M.yaml: 2 x (4*96^2 + 3*96*384 + 2*96) + 96
TINY_CPU = str(ROOT / "configs/train/tiny-cpu.yaml")  # global_batch 16


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=16, splits={"train": 64,
                       "validation": 16})  # fmt: skip


def test_plan_grid_steps_epochs_and_refusals(corpus, tmp_path, capsys):
    per_step = 6 * TINY_03M_N * 16 * 16  # 6 N x global_batch x seq_len
    budgets = [3 * per_step, 20 * per_step]
    out = tmp_path / "sweep"
    code, stdout, stderr = run_cli(
        capsys, "sweep", "plan", "--budgets", ",".join(f"{c:.6e}" for c in budgets),
        "--sizes", "tiny-0.3M,tiny-3M", "--families", "arm,mdm", "--corpus", corpus,
        "--config", TINY_CPU, "--out", out, "--tokens-per-s", "1000", "optim.lr=2e-3",
    )  # fmt: skip
    assert code == 0, stderr
    sweep = json.loads((out / "sweep.json").read_text())
    small = {(p["family"], round(p["C"] / per_step)): p for p in sweep["points"]
             if p["size"] == "tiny-0.3M"}  # fmt: skip
    assert small[("arm", 3)]["steps"] == 3 and small[("mdm", 20)]["steps"] == 20
    assert small[("arm", 20)]["tokens"] == 20 * 16 * 16
    assert small[("arm", 20)]["epochs"] == pytest.approx(20 * 16 / 64)  # 5 epochs
    assert small[("arm", 3)]["est_s"] == pytest.approx(3 * 16 * 16 / 1000)
    # tiny-3M has ~10x the parameters: the smallest budget is less than one step there
    refused = {(r["family"], r["size"], round(r["C"] / per_step)) for r in sweep["refused"]}
    assert refused == {("arm", "tiny-3M", 3), ("mdm", "tiny-3M", 3)}
    assert "refused arm-tiny-3M-C" in stderr and "(< 1 step)" in stderr
    assert "5.00 epochs of the corpus (> 1)" in stderr
    assert "mdm    tiny-0.3M" in stdout and "epochs" in stdout
    assert len(sweep["points"]) == 6

    from trainer.cli import load_train_config

    for p in sweep["points"]:
        cfg = load_train_config(p["config"], [])
        assert Path(cfg.run_dir) == Path(p["config"]).parent == out / "runs" / p["name"]
        assert cfg.objective == p["family"] and cfg.model == p["size"]
        assert cfg.budget.flops == p["C"] and cfg.optim.lr == 2e-3
        assert cfg.corpus == str(corpus.resolve())
        assert cfg.tracking.tags == {"sweep": "sweep", "sweep.C": cfg.tracking.tags["sweep.C"],
                                     "sweep.point": p["name"]}  # fmt: skip
        assert cfg.tracking.experiment == "sweep"


def test_plan_refuses_overrides_the_sweep_sets(corpus, tmp_path):
    from eval.studies.scaling.plan import PlanConfig, make_plan

    plan = PlanConfig(budgets=[1e12], sizes=["tiny-0.3M"], out=str(tmp_path / "s"),
                      corpus=str(corpus), overrides=["steps=10"])  # fmt: skip
    with pytest.raises(ConfigError, match="sets objective, model, run_dir and the budget"):
        make_plan(plan)


def test_plan_unknown_size_names_the_valid_ones(capsys):
    code, _, err = run_cli(capsys, "sweep", "plan", "--budgets", "1e12", "--sizes", "7M")
    assert code == 2 and "unknown model preset '7M'" in err and "tiny-0.3M" in err


def test_replan_refuses_changing_a_started_run(corpus, tmp_path, capsys):
    args = ["sweep", "plan", "--budgets", "5e9", "--sizes", "tiny-0.3M", "--families", "arm",
            "--corpus", corpus, "--config", TINY_CPU, "--out", tmp_path / "s"]  # fmt: skip
    assert run_cli(capsys, *args)[0] == 0
    (tmp_path / "s/runs/arm-tiny-0.3M-C5e9/checkpoints").mkdir()
    assert run_cli(capsys, *args)[0] == 0  # same config: fine
    code, _, err = run_cli(capsys, *args, "optim.lr=1e-2")
    assert code == 2 and "already started with another config" in err


def test_plans_per_family_add_up_to_one_sweep(corpus, tmp_path, capsys):
    """Planning the ARM, then the MDM into the same folder keeps the ARM's points (the second
    plan used to replace sweep.json, so `sweep run` silently trained only the MDM); --replace
    makes the sweep the last plan alone; another sweep's folder is refused."""
    base = ["sweep", "plan", "--budgets", "5e9", "--sizes", "tiny-0.3M", "--corpus", corpus,
            "--config", TINY_CPU, "--out", tmp_path / "s"]  # fmt: skip
    assert run_cli(capsys, *base, "--families", "arm")[0] == 0
    code, out, err = run_cli(capsys, *base, "--families", "mdm", "--budgets", "1e10")
    assert code == 0, err
    sweep = json.loads((tmp_path / "s/sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == ["arm-tiny-0.3M-C5e9", "mdm-tiny-0.3M-C1e10"]
    assert set(sweep["configs"]) == {"arm-tiny-0.3M-C5e9", "mdm-tiny-0.3M-C1e10"}
    assert [p["families"] for p in sweep["plans"]] == [["arm"], ["mdm"]]
    assert "kept 1 point(s) of earlier plans" in out and "2 runs (1 from this plan)" in out

    # the same plan again replaces its own points instead of doubling them
    assert run_cli(capsys, *base, "--families", "mdm", "--budgets", "1e10")[0] == 0
    sweep = json.loads((tmp_path / "s/sweep.json").read_text())
    assert len(sweep["points"]) == 2 and len(sweep["plans"]) == 3

    code, out, _ = run_cli(capsys, *base, "--families", "mdm", "--budgets", "1e10", "--replace")
    assert code == 0 and "dropped 1 point(s) of earlier plans" in out
    sweep = json.loads((tmp_path / "s/sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == ["mdm-tiny-0.3M-C1e10"]

    code, _, err = run_cli(capsys, *base, "--families", "arm", "--name", "other")
    assert code == 2 and "sweep 's' lives here" in err


def test_time_estimates_follow_the_measured_rates_by_size(corpus, tmp_path, capsys):
    """An unmeasured size gets FLOP/s from a power law through the measured sizes around it
    (or the two nearest beyond them), not their median: tiny models run at a fraction of a
    larger one's FLOP/s. Numbers from the CPU study: 0.019M and 0.03M measured, 0.008M ran at
    2.35e9 FLOP/s, and the median of the 7 measured sizes said 1.33e10."""
    from eval.studies.scaling.plan import rate_at

    by_n = {18_552: 5.20e9, 32_928: 8.24e9}
    assert rate_at(8_272, by_n) == pytest.approx(2.72e9, rel=0.01)  # measured: 2.35e9
    assert rate_at(18_552, by_n) == 5.20e9 and rate_at(1e5, {5e4: 3e9}) == 3e9
    slope = math.log(8.24 / 5.20) / math.log(32_928 / 18_552)
    assert rate_at(25_000, by_n) == pytest.approx(5.20e9 * (25_000 / 18_552) ** slope)
    assert rate_at(1e6, {1e4: 1e9, 2e4: 8e9}) == pytest.approx(1e9 * 100)  # exponent clamped to 1
    assert rate_at(1e3, {1e4: 5e9, 2e4: 1e9}) == 5e9  # clamped to 0: never faster when smaller
    assert rate_at(1e4, {}) is None

    runs = []
    for size, n, tps in (("tiny-0.3M", 295_392, 1000.0), ("tiny-3M", 2_951_232, 400.0)):
        runs.append(tmp_path / size)
        runs[-1].mkdir()
        (runs[-1] / "summary.json").write_text(json.dumps({"model": size, "N": n,
                                                           "tokens_per_s": tps}))  # fmt: skip
    out = tmp_path / "s"
    code, _, err = run_cli(capsys, "sweep", "plan", "--budgets", "1e12", "--sizes", "tiny-1M",
                           "--families", "arm", "--corpus", corpus, "--config", TINY_CPU,
                           "--out", out, "--measured", *runs)  # fmt: skip
    assert code == 0, err
    sweep = json.loads((out / "sweep.json").read_text())
    lo, hi = 6 * 295_392 * 1000.0, 6 * 2_951_232 * 400.0
    rate = lo * (1_049_728 / 295_392) ** (math.log(hi / lo) / math.log(2_951_232 / 295_392))
    (point,) = sweep["points"]
    assert point["est_s"] == pytest.approx(point["flops"] / rate)
    assert sweep["throughput"]["measured_flops_per_s"] == {"tiny-0.3M": lo, "tiny-3M": hi}
