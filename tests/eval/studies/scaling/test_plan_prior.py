"""`maskscale sweep plan --prior`: each budget's sizes spaced around a prior optimum (an anchor
scaled as C^0.5, or a previous fit.json's N_opt laws), and runs under 200 steps warned about.

A pool of tiny presets (N: 0.03M 32,928; 0.07M 73,968; 0.13M 131,392; 0.3M 295,392; 1M 1,049,728;
3M 2,951,232) and no corpus, so planning takes no data.
"""

from __future__ import annotations

import json

from tests.eval.conftest import ROOT, run_cli

TINY_CPU = str(ROOT / "configs/train/tiny-cpu.yaml")
# A fixed pool, so that adding a tiny preset does not move these picks.
POOL = "tiny-0.03M,tiny-0.07M,tiny-0.13M,tiny-0.3M,tiny-1M,tiny-3M"


def plan(capsys, out, *args):
    return run_cli(capsys, "sweep", "plan", "--sizes", POOL, "--config", TINY_CPU,
                   "--out", out, *args)  # fmt: skip


def sizes_by_budget(out, family: str) -> dict[float, list[str]]:
    sweep = json.loads((out / "sweep.json").read_text())
    got: dict[float, list[str]] = {}
    for p in sweep["points"]:
        if p["family"] == family:
            got.setdefault(p["C"], []).append(p["size"])
    return got


def test_anchor_prior_moves_the_sizes_with_the_budget(tmp_path, capsys):
    """N_opt = 7e4 at 2e12, x2 per 4x compute; window x/÷4, 3 sizes: the picks follow it."""
    out = tmp_path / "s"
    code, stdout, err = plan(capsys, out, "--budgets", "2e12,8e12,3.2e13", "--families", "arm",
                             "--prior", "7e4@2e12", "--window", "4", "--per-budget", "3")  # fmt: skip
    assert code == 0, err
    assert sizes_by_budget(out, "arm") == {
        2e12: ["tiny-0.03M", "tiny-0.07M", "tiny-0.13M"],
        8e12: ["tiny-0.07M", "tiny-0.13M", "tiny-0.3M"],
        3.2e13: ["tiny-0.07M", "tiny-0.3M", "tiny-1M"],
    }
    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["prior"]["budgets"]
    assert [round(r["N_opt"]) for r in rows] == [70_000, 140_000, 280_000]
    assert sweep["plan"]["prior"] == "7e4@2e12" and sweep["prior"]["window"] == 4.0
    assert "arm C=8e+12: N_opt ~ 140K -> tiny-0.07M, tiny-0.13M, tiny-0.3M" in stdout
    assert "N_opt ~ C^0.5" in stdout


def test_fit_json_prior_gives_each_family_its_own_sizes(tmp_path, capsys):
    prior = tmp_path / "fit.json"
    laws = {"arm": 2.8e5 / 2e12**0.5, "mdm": 1.4e5 / 2e12**0.5}  # the MDM's optimum half the ARM's
    prior.write_text(json.dumps({"families": {f: {"size_law": {"coef": k, "exponent": 0.5}}
                                              for f, k in laws.items()}}))  # fmt: skip
    out = tmp_path / "s"
    code, _, err = plan(capsys, out, "--budgets", "2e12", "--prior", prior, "--per-budget", "3")
    assert code == 0, err
    assert sizes_by_budget(out, "arm") == {2e12: ["tiny-0.07M", "tiny-0.3M", "tiny-1M"]}
    assert sizes_by_budget(out, "mdm") == {2e12: ["tiny-0.07M", "tiny-0.13M", "tiny-0.3M"]}

    code, _, err = plan(capsys, tmp_path / "narrow", "--budgets", "2e12", "--prior", prior,
                        "--window", "2", "--per-budget", "3")  # fmt: skip
    assert code == 0, err
    assert ("warning: arm C=2e+12: 1 preset(s) of --sizes within 1.4e+05..5.6e+05 around the "
            "prior N_opt 2.8e+05; fewer than 3, so this budget cannot be fitted") in err  # fmt: skip


def test_bad_priors_are_refused_with_what_to_give(tmp_path, capsys):
    no_law = tmp_path / "fit.json"
    no_law.write_text(json.dumps({"families": {"arm": {"size_law": {"coef": 1, "exponent": 0.5}},
                                               "mdm": {"size_law": None}}}))  # fmt: skip
    for prior, message in (
        (no_law, "family mdm has no N_opt law (fewer than 2 budgets with an in-range optimum)"),
        ("abc", "--prior 'abc': give N_OPT@C (e.g. 2e8@6e18) or a fit.json"),
        ("x@6e18", "--prior: N_opt 'x' is not a positive number, e.g. 2e8@6e18"),
        (tmp_path / "gone.json", "gone.json: no such file"),
    ):
        code, _, err = plan(capsys, tmp_path / "s", "--budgets", "2e12", "--prior", prior)
        assert code == 2 and message in err, err
    code, _, err = plan(capsys, tmp_path / "s", "--budgets", "2e12", "--prior", "7e4@2e12",
                        "--per-budget", "2")  # fmt: skip
    assert code == 2 and "--per-budget: at least 3" in err


def test_runs_under_200_steps_are_warned_about(tmp_path, capsys):
    code, _, err = plan(capsys, tmp_path / "s", "--budgets", "2e12", "--families", "arm")
    assert code == 0, err
    # 2e12 / (6 N x 16 x 2048): 0.03M 309 steps, 0.07M 138, 0.13M 77, 0.3M 34, 1M 10, 3M 3
    assert ("warning: 5 run(s) train fewer than 200 steps: arm-tiny-0.07M-C2e12 (138), "
            "arm-tiny-0.13M-C2e12 (77), arm-tiny-0.3M-C2e12 (34), arm-tiny-1M-C2e12 (10) and "
            "1 more; their warm-up and cosine schedule differ") in err  # fmt: skip
    assert "arm-tiny-0.03M" not in err.split("fewer than 200 steps")[1].split(";")[0]
