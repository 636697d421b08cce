"""Bootstrap intervals for a scaling fit: resample the runs, refit, read off percentiles.

Why: the delta-method errors of ``laws`` describe one budget's parabola, not how far the
exponents and the compute gap would move with other runs. A scaling claim ("the MDM needs ~16x
the compute") rests on a handful of runs per budget, so the interval that matters is the one
over the runs themselves: each resample draws, within every (family, nominal budget) line, as
many runs as it has *with replacement*, refits the whole study (``laws.fit_study``: parabolas,
bounds, power laws, gaps) and records the exponents and gap multiples. The interval of a
quantity is the central ``level`` percentile range of its resampled values (percentile
bootstrap), seeded so a rerun gives the same numbers.

A resample can lose a quantity: a line drawn with fewer than three distinct sizes is not
fittable, a vertex can move beyond the sizes (a bound), a law can be left with fewer than two
budgets. Such a resample is counted as failed for that quantity, and the interval is read from
the others; both counts are reported, because many failures mean the interval describes the
lucky resamples only.
"""

from __future__ import annotations

import math

import numpy as np

from eval.studies.scaling.laws import FAMILIES, check_points, fit_study, geomean

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
LAW_KEYS = ("loss_law", "size_law", "envelope_law")


def quantities(study: dict) -> dict[str, float]:
    """The numbers the bootstrap tracks, by a flat key (``arm.loss_law.exponent``,
    ``gap_geomean``, ``gap@1e+19`` per ARM budget, ``size_ratio_geomean``, ...); missing ones
    are left out."""
    out = {}
    for fam in FAMILIES:
        for key in LAW_KEYS:
            law = study["families"][fam][key]
            if law is not None:
                out[f"{fam}.{key}.exponent"] = law.exponent
    for name, rows in (("gap", study["gap"]), ("envelope_gap", study["envelope_gap"])):
        value = geomean([g["multiple"] for g in rows])
        if value is not None:
            out[f"{name}_geomean"] = value
        for g in rows:
            out[gap_key(name, g["C"])] = g["multiple"]
    ratios = study["size_ratio"] or []
    value = geomean([r["mdm_over_arm_N_opt"] for r in ratios])
    if value is not None:
        out["size_ratio_geomean"] = value
    for r in ratios:
        out[gap_key("size_ratio", r["C"])] = r["mdm_over_arm_N_opt"]
    return {k: v for k, v in out.items() if math.isfinite(v)}


def gap_key(name: str, c: float) -> str:
    """The key of one budget's gap multiple: ``gap@1e+19``, ``envelope_gap@2e+12``."""
    return f"{name}@{c:.6g}"


def resample(groups: list[list[dict]], rng: np.random.Generator) -> list[dict]:
    """One draw: within each line, as many runs as it has, with replacement."""
    return [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]


def bootstrap(
    points: list[dict], n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
    level: float = LEVEL, reference: dict | None = None,
) -> dict:  # fmt: skip
    """Percentile intervals of :func:`quantities` over ``n_resamples`` refits.

    ``reference``: the quantities of the full fit (computed when not given); every one of them
    gets an entry, also when no resample produced it. Returns {"resamples", "seed", "level",
    "method", "quantities": {key: {"lo", "hi", "n_ok", "n_failed"}}}."""
    check_points(points)
    if reference is None:
        reference = quantities(fit_study(points, check=False))
    lines: dict[tuple, list[dict]] = {}
    for p in points:
        lines.setdefault((p["family"], p["C"]), []).append(p)
    groups = [lines[k] for k in sorted(lines)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in reference}
    for _ in range(n_resamples):
        for key, value in quantities(fit_study(resample(groups, rng), check=False)).items():
            if key in draws:
                draws[key].append(value)
    tail = (1 - level) / 2 * 100
    out = {}
    for key, values in draws.items():
        lo, hi = np.percentile(values, [tail, 100 - tail]) if values else (None, None)
        out[key] = {"lo": None if lo is None else float(lo), "hi": None if hi is None else float(hi),
                    "n_ok": len(values), "n_failed": n_resamples - len(values)}  # fmt: skip
    return {"resamples": n_resamples, "seed": seed, "level": level,
            "method": "percentile bootstrap over runs, resampled with replacement within "
                      "each (family, nominal budget) line; the whole study refitted per draw",
            "quantities": out}  # fmt: skip


def interval(boot: dict | None, key: str) -> dict | None:
    """The interval of one quantity, None when it was not bootstrapped or never fitted."""
    q = (boot or {}).get("quantities", {}).get(key)
    return q if q and q["lo"] is not None else None


def interval_text(boot: dict | None, key: str, fmt: str = "{:.4g}") -> str:
    """'[lo, hi] (n_failed of B failed)' or '-'."""
    q = interval(boot, key)
    if q is None:
        return "-"
    failed = f"; {q['n_failed']} of {boot['resamples']} failed" if q["n_failed"] else ""
    return f"[{fmt.format(q['lo'])}, {fmt.format(q['hi'])}]{failed}"
