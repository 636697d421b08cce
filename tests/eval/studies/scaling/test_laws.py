"""The scaling fit never invents an optimum: bounds instead of off-grid vertices, no crash on
any finite points, laws on realised compute.

Planted points as in test_fit.py: losses on a parabola in ln N around a known optimum, so what
the fit must give is known exactly; plus random finite points (many seeds) that must fit, give
valid JSON and a report without an exception.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from eval.studies.scaling.laws import PowerLaw, fit_isoflop, fit_study, to_json

SIZES = (1e7, 3e7, 1e8, 3e8, 1e9, 3e9)


def parabola(n, n_opt: float, l_opt: float, curvature: float = 0.04) -> list[float]:
    return [l_opt + curvature * math.log(x / n_opt) ** 2 for x in n]


def test_near_straight_budget_is_a_bound_not_a_crash():
    """Losses falling almost linearly in ln N: the vertex is ~1e7 e-folds away (today:
    OverflowError in math.exp)."""
    loss = [3.0, 2.9, 2.8000001, 2.7000003]
    opt = fit_isoflop(1e19, [1e7, 1e8, 1e9, 1e10], loss)
    assert opt.status == "bound" and opt.N_opt is None and opt.L_opt is None
    assert opt.N_bound == ">" and opt.N_edge == 1e10 and opt.L_upper == min(loss)
    assert "bound: N_opt > 1e+10 (largest size), L_opt <= 2.7000 (best measured)" in opt.note


def test_off_grid_vertex_gives_a_bound_and_stays_out_of_the_laws_and_the_gap():
    """At 1e21 the ARM's sizes all lie below its optimum: the parabola's vertex (a loss far
    below every measured one) must be neither an optimum, nor a point of the power law, nor a
    budget of the compute gap."""
    points = []
    for fam, k, a, b in (("arm", 0.0816, 45.6, 0.0642), ("mdm", 0.0408, 50.3, 0.0625)):
        for c in (1e19, 1e20, 1e21):
            sizes = SIZES if not (fam == "arm" and c == 1e21) else (1e6, 2e6, 4e6, 8e6)
            loss = parabola(sizes, k * c**0.5, a * c**-b, curvature=0.3)
            points += [{"family": fam, "N": n, "C": c, "loss": v} for n, v in zip(sizes, loss)]
    data = to_json(fit_study(points))
    arm = data["families"]["arm"]
    (off,) = [o for o in arm["optima"] if o["C"] == 1e21]
    assert off["status"] == "bound" and off["N_opt"] is None and off["L_opt"] is None
    assert off["N_bound"] == ">" and off["N_edge"] == 8e6 and off["extrapolated"]
    assert off["L_upper"] == pytest.approx(min(p["loss"] for p in points
                                               if p["family"] == "arm" and p["C"] == 1e21))  # fmt: skip
    assert arm["law_budgets"] == [1e19, 1e20] and arm["loss_law"]["n_points"] == 2
    assert [g["C"] for g in data["gap"]] == [1e19, 1e20]
    for g in data["gap"]:
        assert 10 < g["multiple"] < 30  # the planted ~16x, not an extrapolated vertex's


def test_points_that_do_not_bend_give_a_bound_on_the_side_the_loss_falls():
    down = fit_isoflop(1e19, [1e7, 1e8, 1e9], [3.0, 3.1, 2.9])  # concave, best the largest
    assert down.status == "bound" and down.N_bound == ">" and down.N_edge == 1e9
    assert "no minimum" in down.note and down.L_upper == 2.9
    hump = fit_isoflop(1e19, [1e7, 1e8, 1e9, 1e10], [3.0, 2.9, 2.9, 3.0001])
    assert hump.status == "optimum"  # bends upwards, vertex inside: a number
    flat = fit_isoflop(1e19, [1e7, 1e8, 1e9, 1e10, 1e11], [3.0, 3.2, 2.9, 3.2, 3.0])
    assert flat.status == "bound" and flat.N_bound is None and "N_opt unknown" in flat.note


def test_a_vertex_loss_at_or_below_zero_is_a_bound():
    """A sharp parabola through noisy points can put its in-range vertex below zero: that is
    not a loss, so no optimum (and nothing for the log-log law)."""
    opt = fit_isoflop(1e19, [1e7, 1e8, 1e9, 1e10], [9.0, 0.01, 0.01, 9.0])
    assert opt.status == "bound" and opt.L_opt is None and "not a loss" in opt.note
    assert opt.L_upper == 0.01


def test_power_law_inverse_never_crashes():
    law = PowerLaw(50.3, -0.0625, None, 5)
    assert math.isinf(law.inverse(-0.5)) and math.isinf(law.inverse(0.0))  # never reached
    assert math.isinf(PowerLaw(3.0, 0.0, None, 2).inverse(2.0))  # a flat law
    assert math.isinf(PowerLaw(50.3, -1e-9, None, 2).inverse(2.0))  # beyond float range
    assert law.inverse(float(law(1e20))) == pytest.approx(1e20, rel=1e-9)


def test_laws_use_realised_compute():
    """Every run of the 1e20 line trained 1.5x its budget (e.g. rescheduled); the losses
    follow the law in realised C, so fitted on it the exponent is exact, while on the nominal
    C it would be off."""
    factor = {1e19: 1.0, 1e20: 1.5, 1e21: 1.0}
    points = []
    for c, f in factor.items():
        loss = parabola(SIZES, 0.0816 * c**0.5 / 4, 45.6 * (c * f) ** -0.0642)
        points += [{"family": "arm", "N": n, "C": c, "C_real": c * f, "loss": v}
                   for n, v in zip(SIZES, loss)]  # fmt: skip
    data = to_json(fit_study(points))
    arm = data["families"]["arm"]
    assert [o["C_real"] for o in arm["optima"]] == pytest.approx([1e19, 1.5e20, 1e21])
    assert arm["loss_law"]["exponent"] == pytest.approx(-0.0642, abs=1e-9)
    assert arm["loss_law"]["coef"] == pytest.approx(45.6, rel=1e-6)
    assert [e["C_real"] for e in arm["envelope"]] == pytest.approx([1e19, 1.5e20, 1e21])


def test_bad_points_are_refused_with_the_point_and_field_named():
    good = {"name": "arm-a", "family": "arm", "N": 1e7, "C": 1e19, "loss": 3.0}
    for key, value in (("N", 0), ("C", -1.0), ("loss", math.nan), ("C_real", math.inf)):
        with pytest.raises(ValueError, match=f"arm-a: {key} must be"):
            fit_study([dict(good, **{key: value})])
    with pytest.raises(ValueError, match="family must be arm or mdm"):
        fit_study([dict(good, family="gpt")])


def random_points(seed: int) -> list[dict]:
    """Finite points of every awkward kind: any sizes (also near-duplicates), any losses (also
    negative), near-straight lines, sharp parabolas with far vertices, near-constant losses,
    realised compute up to 2x off the budget."""
    rng = np.random.default_rng(seed)
    points = []
    for fam in ("arm", "mdm"):
        budgets = rng.choice([1e12, 3e12, 1e13, 1e14, 1e18, 1e20], rng.integers(1, 6), False)
        for c in budgets:
            k = int(rng.integers(1, 8))
            n = [10 ** rng.uniform(3, 10, k), 1e6 * (1 + rng.uniform(0, 1e-9, k)),
                 np.geomspace(10 ** rng.uniform(3, 7), 10 ** rng.uniform(7, 10), k)][
                rng.integers(0, 3)]  # fmt: skip
            x = np.log(n) - np.log(n).mean()
            loss = [rng.uniform(-5, 10, k),
                    3 - 0.1 * x + 10 ** rng.uniform(-12, -3) * x**2,
                    rng.uniform(-1, 3) + 10 ** rng.uniform(-2, 2) * (x - rng.uniform(-8, 8)) ** 2,
                    3 + rng.normal(0, 1e-9, k)][rng.integers(0, 4)]  # fmt: skip
            points += [{"name": f"p{len(points)}", "family": fam, "N": float(ni), "C": float(c),
                        "C_real": float(c * rng.uniform(0.5, 2)), "loss": float(li),
                        "status": "finished", "size": "-"}
                       for ni, li in zip(n, loss)]  # fmt: skip
    return points


def test_random_finite_points_never_crash_the_fit():
    statuses = set()
    for seed in range(80):
        points = random_points(seed)
        data = to_json(fit_study(points))
        json.dumps(data, allow_nan=False)  # fit.json stays valid JSON: no NaN, no Infinity
        for name, fam in data["families"].items():
            statuses |= {o["status"] for o in fam["optima"]}
            for o in fam["optima"]:  # a number only for an in-range, positive vertex
                if o["N_opt"] is not None:
                    sizes = [p["N"] for p in points if p["family"] == name and p["C"] == o["C"]]
                    assert o["status"] == "optimum" and o["L_opt"] > 0
                    assert min(sizes) * (1 - 1e-9) <= o["N_opt"] <= max(sizes) * (1 + 1e-9)
    assert statuses == {"optimum", "bound", "not fittable"}  # the seeds reach every case


def test_random_finite_points_bootstrap_and_report():
    from eval.studies.scaling.baseline import skipped
    from eval.studies.scaling.bootstrap import bootstrap
    from eval.studies.scaling.report import report_markdown

    for seed in range(40):
        points = random_points(seed)
        data = to_json(fit_study(points))
        data |= {"bootstrap": bootstrap(points, 5, seed), "unigram": skipped("validation", "")}
        json.dumps(data, allow_nan=False)
        assert report_markdown("random", points, data).startswith("# Scaling-law fit")


def test_random_points_write_the_whole_report(tmp_path):
    from eval.studies.scaling.fit import fit_and_report

    for seed in (0, 1):  # today these crash the fit (ValueError, OverflowError)
        out = tmp_path / str(seed)
        fit_and_report(random_points(seed), out, "random", unigram=False, resamples=5)
        for name in ("fit.json", "report.md", "isoflop.png", "scaling.png"):
            assert (out / name).stat().st_size > 0
        json.loads((out / "fit.json").read_text(), parse_constant=pytest.fail)


def test_realised_compute_from_mlflow_runs():
    from eval.studies.scaling.fit import mlflow_compute

    run = SimpleNamespace(data=SimpleNamespace(metrics={"tokens": 1000.0}, params={}))
    assert mlflow_compute(run, 7, 1e5) == (6.0 * 7 * 1000, "MLflow tokens")
    run.data.metrics, run.data.params = {}, {"resolved.flops": "43008.0"}
    assert mlflow_compute(run, 7, 1e5) == (43008.0, "MLflow resolved.flops")
    run.data.params = {}
    assert mlflow_compute(run, 7, 1e5) == (1e5, "nominal")


def test_runs_the_fit_cannot_take_are_listed_not_fitted():
    """A sweep or MLflow run with a NaN loss or another family is given a status saying why
    and left out, instead of stopping the whole fit."""
    from eval.studies.scaling.fit import fittable

    ok = {"name": "a", "family": "arm", "N": 10, "C": 1e12, "loss": 3.0, "status": "finished"}
    points = [ok, dict(ok, name="b", loss=math.nan), dict(ok, name="c", family="sft")]
    assert fittable(points) == [ok]
    assert points[1]["status"] == "finished with a non-finite loss (nan)"
    assert points[2]["status"] == "not fitted: family 'sft' is not arm or mdm"
