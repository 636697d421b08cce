"""Bootstrap intervals over runs: they hold the planted exponents and gap, are seeded, count
the resamples that could not give a number, and the report states all of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.studies.scaling.bootstrap import bootstrap, interval_text, quantities
from eval.studies.scaling.laws import fit_study

BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20)
LAW = {"arm": (45.6, 0.0642, 0.0816), "mdm": (50.3, 0.0625, 0.0408)}  # a, b, k: paper-like


def noisy_points(seed: int = 0, sigma: float = 0.01, sizes_per_budget: int = 7) -> list[dict]:
    """Parabolas in ln N around L_opt = a C^-b and N_opt = k C^0.5, with Gaussian noise."""
    rng = np.random.default_rng(seed)
    points = []
    for fam, (a, b, k) in LAW.items():
        for c in BUDGETS:
            n_opt = k * c**0.5
            for n in np.geomspace(n_opt / 8, n_opt * 8, sizes_per_budget):
                loss = a * c**-b + 0.04 * math.log(n / n_opt) ** 2 + rng.normal(0, sigma)
                points.append({"name": f"{fam}-{n:.3g}-{c:.3g}", "family": fam, "N": float(n),
                               "C": c, "loss": loss, "status": "finished", "size": "-"})  # fmt: skip
    return points


def test_intervals_hold_the_planted_exponents_and_gap():
    points = noisy_points()
    boot = bootstrap(points, 300, seed=1)
    q = boot["quantities"]
    for fam, (_, b, _) in LAW.items():
        lo, hi = q[f"{fam}.loss_law.exponent"]["lo"], q[f"{fam}.loss_law.exponent"]["hi"]
        assert lo < -b < hi and hi - lo < 0.01
        size = q[f"{fam}.size_law.exponent"]
        assert size["lo"] < 0.5 < size["hi"]
    # the MDM's law 50.3 C'^-0.0625 reaches the ARM's 45.6 C^-0.0642 at C' = multiple x C
    truth = np.exp(np.mean([math.log((50.3 / (45.6 * c**-0.0642)) ** 16 / c) for c in BUDGETS]))
    assert q["gap_geomean"]["lo"] < truth < q["gap_geomean"]["hi"]
    # planted N_opt: MDM 0.0408 C^0.5, ARM 0.0816 C^0.5, so the size ratio is 0.5 everywhere
    for key in ["size_ratio_geomean"] + [f"size_ratio@{c:.6g}" for c in BUDGETS]:
        assert q[key]["lo"] < 0.5 < q[key]["hi"] and q[key]["hi"] / q[key]["lo"] < 1.5, key
    for key, v in q.items():
        assert v["n_ok"] + v["n_failed"] == 300, key
    assert boot["resamples"] == 300 and boot["seed"] == 1 and boot["level"] == 0.95


def test_bootstrap_is_seeded():
    points = noisy_points()
    a, b = bootstrap(points, 50, seed=3), bootstrap(points, 50, seed=3)
    assert a == b
    assert bootstrap(points, 50, seed=4)["quantities"] != a["quantities"]


def test_resamples_that_cannot_fit_are_counted():
    """Three sizes per budget: a draw with replacement often keeps fewer than three distinct
    sizes, so that budget cannot be fitted in that draw; those draws are counted."""
    points = noisy_points(sizes_per_budget=3)
    boot = bootstrap(points, 100, seed=0)
    law = boot["quantities"]["arm.loss_law.exponent"]
    assert law["n_failed"] > 0 and law["n_ok"] > 0 and law["n_ok"] + law["n_failed"] == 100
    assert interval_text(boot, "arm.loss_law.exponent").endswith(
        f"; {law['n_failed']} of 100 failed"
    )
    assert set(boot["quantities"]) == set(quantities(fit_study(points)))


def test_report_states_budgets_runs_and_resamples(tmp_path):
    from eval.studies.scaling.fit import fit_and_report

    points = noisy_points()
    points[0]["C_real"], points[0]["C_source"] = points[0]["C"] * 1.01, "summary.json"
    data = fit_and_report(points, tmp_path, "planted", unigram=False, resamples=200, seed=2)
    report = (tmp_path / "report.md").read_text()
    assert data["bootstrap"]["resamples"] == 200
    assert "95% percentile bootstrap over runs" in report and "200 resamples, seed 2" in report
    exp = data["bootstrap"]["quantities"]["arm.loss_law.exponent"]
    assert (f"(rests on 5 budgets, 35 runs; exponent 95% interval [{exp['lo']:.4g}, "
            f"{exp['hi']:.4g}])") in report  # fmt: skip
    assert "Geometric mean multiple: " in report and "over 5 ARM budgets, the MDM law resting " \
        "on 5 budgets; 95% interval [" in report  # fmt: skip
    assert "1 from summary.json (tokens trained)" in report
    ratio = data["bootstrap"]["quantities"]["size_ratio_geomean"]
    assert (f"Geometric mean ratio: {data['size_ratio_geomean']:.3g} (the N_opt laws rest on 5 "
            f"ARM and 5 MDM budgets; 95% interval [{ratio['lo']:.3g}, {ratio['hi']:.3g}])"
            ) in report  # fmt: skip
    assert data["families"]["arm"]["optima"][0]["C_real"] == pytest.approx(
        math.exp((math.log(6e18 * 1.01) + 6 * math.log(6e18)) / 7)
    )
