"""Scaling-law fits of an IsoFLOP study: per-budget optima, power laws and the compute gap.

Why: the study's headline numbers (MDMs follow L_opt(C) = a C^-b with an exponent like the
ARM's, yet need ~16x its compute for the same loss) are fits, and a fit is only as good as the
data and the uncertainty it reports. So this module is plain numpy with nothing hidden:

1. Per budget and family, a parabola L = a x^2 + b x + c in x = ln N through the IsoFLOP
   points (Hoffmann et al.'s approach 2). Its vertex gives N_opt and L_opt; their standard
   errors follow from the fit covariance by the delta method (needs >= 4 points; through
   exactly 3 the parabola is exact and the error unknown). A parabola that opens downwards
   has no optimum, and a vertex outside the sampled sizes is flagged as extrapolated.
2. Per family, least squares in log-log space: L_opt(C) = a C^-b and N_opt(C) = k C^g.
3. The compute gap: at each ARM budget C, the compute C' at which the MDM's power law reaches
   the ARM's optimal loss there; the multiple is C'/C.

Budgets with fewer than ``MIN_POINTS`` finished runs are not fitted; the caller reports them.

The envelope, beside the parabolas: per budget the best *measured* point (Hoffmann et al.'s
approach 1 reads the same lower envelope off training curves), its power law L_env(C) and the
gap between the two families' envelope laws. It needs no vertex, so it stays available when the
optimum lies outside the sampled sizes (small CPU studies, where steps are few and the smallest
model often wins); it overestimates L_opt by how far the best size is from the optimum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MIN_POINTS = 3
"""A parabola needs three points; fewer and the budget is reported as not fittable."""


@dataclass
class Optimum:
    """The vertex of one IsoFLOP parabola."""

    C: float
    n_points: int
    N_opt: float | None
    """Compute-optimal size (None when the parabola has no minimum)."""
    N_opt_log_std: float | None
    """Standard error of ln N_opt (None when unknown: exactly 3 points)."""
    L_opt: float | None
    L_opt_std: float | None
    coeffs: tuple[float, float, float] | None
    """(a, b, c) of L = a x^2 + b x + c with x = ln N - x0."""
    x0: float
    """Centre of x (mean ln N of the points) for numerical conditioning."""
    extrapolated: bool = False
    """The vertex lies outside the sampled sizes: N_opt is a guess beyond the data."""
    note: str = ""

    @property
    def fitted(self) -> bool:
        return self.N_opt is not None

    def as_dict(self) -> dict:
        return {**asdict(self), "fitted": self.fitted}


@dataclass
class PowerLaw:
    """y = coef * C^exponent, fitted in log-log space."""

    coef: float
    exponent: float
    exponent_std: float | None
    n_points: int

    def __call__(self, c):
        return self.coef * np.asarray(c, dtype=float) ** self.exponent

    def inverse(self, y: float) -> float:
        """The C at which the law reaches y (inf when beyond float range, e.g. a near-flat law)."""
        log_c = math.log(y / self.coef) / self.exponent
        return math.exp(log_c) if log_c < 700 else math.inf

    def as_dict(self) -> dict:
        return asdict(self)


def fit_isoflop(c: float, n: list[float], loss: list[float]) -> Optimum:
    """The parabola-in-ln-N optimum of one budget's points (see the module docstring)."""
    x_raw = np.log(np.asarray(n, dtype=float))
    y = np.asarray(loss, dtype=float)
    x0 = float(x_raw.mean()) if len(x_raw) else 0.0
    empty = Optimum(c, len(y), None, None, None, None, None, x0)
    if len(y) < MIN_POINTS or len(set(x_raw.tolist())) < MIN_POINTS:
        empty.note = f"{len(set(x_raw.tolist()))} distinct sizes; a parabola needs {MIN_POINTS}"
        return empty
    x = x_raw - x0
    if len(y) > MIN_POINTS:
        coeffs, cov = np.polyfit(x, y, 2, cov=True)
    else:
        coeffs, cov = np.polyfit(x, y, 2), None
    a, b, c0 = (float(v) for v in coeffs)
    if a <= 0:
        empty.coeffs, empty.note = (a, b, c0), "no minimum: the points do not bend upwards"
        return empty
    xv = -b / (2 * a)
    lv = c0 - b * b / (4 * a)
    x_std = l_std = None
    if cov is not None:
        gx = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])  # d xv / d(a, b, c)
        gl = np.array([b * b / (4 * a * a), -b / (2 * a), 1.0])  # d lv / d(a, b, c)
        x_std = float(math.sqrt(max(gx @ cov @ gx, 0.0)))
        l_std = float(math.sqrt(max(gl @ cov @ gl, 0.0)))
    out = Optimum(c, len(y), float(math.exp(xv + x0)), x_std, lv, l_std, (a, b, c0), x0)
    out.extrapolated = not (x.min() <= xv <= x.max())
    if out.extrapolated:
        out.note = "optimum outside the sampled sizes (extrapolated): add sizes on that side"
    elif cov is None:
        out.note = "exactly 3 points: the parabola is exact, its uncertainty unknown"
    return out


def fit_power_law(c: list[float], y: list[float]) -> PowerLaw | None:
    """Least squares of ln y = ln coef + exponent ln C; None with fewer than 2 points."""
    if len(c) < 2:
        return None
    lc, ly = np.log(np.asarray(c, dtype=float)), np.log(np.asarray(y, dtype=float))
    if len(c) > 2:
        (slope, icpt), cov = np.polyfit(lc, ly, 1, cov=True)
        std = float(math.sqrt(max(cov[0, 0], 0.0)))
    else:
        slope, icpt = np.polyfit(lc, ly, 1)
        std = None
    return PowerLaw(float(math.exp(icpt)), float(slope), std, len(c))


def _gap_rows(targets: list[tuple[float, float]], law: PowerLaw | None, key: str) -> list[dict]:
    """Per (ARM budget C, ARM loss): the compute at which the MDM's ``law`` reaches that loss
    and its multiple of C; none for a law that does not fall, none where it never gets there
    within float range (a near-flat law)."""
    if law is None or law.exponent >= 0:
        return []
    rows = []
    for c, loss in targets:
        c_mdm = law.inverse(loss)
        if math.isfinite(c_mdm):
            rows.append({"C": c, key: loss, "mdm_C": c_mdm, "multiple": c_mdm / c})
    return rows


def compute_gap(arm: list[Optimum], mdm_loss_law: PowerLaw | None) -> list[dict]:
    """Per ARM budget: the compute at which the MDM's L_opt law reaches the ARM's L_opt."""
    return _gap_rows([(o.C, o.L_opt) for o in arm if o.fitted], mdm_loss_law, "arm_L_opt")


def envelope_gap(arm_env: list[dict], mdm_law: PowerLaw | None) -> list[dict]:
    """Per ARM budget: the compute at which the MDM's envelope law reaches the ARM's best
    measured loss there."""
    return _gap_rows([(e["C"], e["loss"]) for e in arm_env], mdm_law, "arm_loss")


def fit_family(points: list[dict]) -> dict:
    """Optima per budget, the two power laws and the envelope of one family's finished
    points."""
    budgets = sorted({p["C"] for p in points})
    optima, envelope = [], []
    for c in budgets:
        pts = sorted((p for p in points if p["C"] == c), key=lambda p: p["N"])
        optima.append(fit_isoflop(c, [p["N"] for p in pts], [p["loss"] for p in pts]))
        best = min(pts, key=lambda p: p["loss"])
        edge = best is pts[0] or best is pts[-1]
        envelope.append({"C": c, "N": best["N"], "loss": best["loss"], "n_points": len(pts),
                         "at_edge": bool(edge and len(pts) > 1)})  # fmt: skip
    good = [o for o in optima if o.fitted and not o.extrapolated]
    loss_law = fit_power_law([o.C for o in good], [o.L_opt for o in good])
    size_law = fit_power_law([o.C for o in good], [o.N_opt for o in good])
    env_law = fit_power_law([e["C"] for e in envelope], [e["loss"] for e in envelope])
    return {"optima": optima, "loss_law": loss_law, "size_law": size_law,
            "envelope": envelope, "envelope_law": env_law}  # fmt: skip


def fit_study(points: list[dict]) -> dict:
    """Both families' fits and the gap. ``points``: finished runs {family, N, C, loss}."""
    fits = {f: fit_family([p for p in points if p["family"] == f]) for f in ("arm", "mdm")}
    gap = compute_gap(fits["arm"]["optima"], fits["mdm"]["loss_law"]) if fits["arm"] else []
    size_ratio = None
    arm_size, mdm_size = fits["arm"]["size_law"], fits["mdm"]["size_law"]
    if arm_size and mdm_size:
        budgets = [o.C for o in fits["arm"]["optima"] if o.fitted]
        size_ratio = [
            {"C": c, "mdm_over_arm_N_opt": float(mdm_size(c) / arm_size(c))} for c in budgets
        ]
    env_gap = envelope_gap(fits["arm"]["envelope"], fits["mdm"]["envelope_law"])
    return {"families": fits, "gap": gap, "size_ratio": size_ratio, "envelope_gap": env_gap}


def to_json(study: dict) -> dict:
    """A JSON-able copy of :func:`fit_study`'s result."""
    fams = {}
    for name, fit in study["families"].items():
        fams[name] = {
            "optima": [o.as_dict() for o in fit["optima"]],
            "loss_law": fit["loss_law"].as_dict() if fit["loss_law"] else None,
            "size_law": fit["size_law"].as_dict() if fit["size_law"] else None,
            "envelope": fit["envelope"],
            "envelope_law": fit["envelope_law"].as_dict() if fit["envelope_law"] else None,
        }
    gap, env_gap = study["gap"], study["envelope_gap"]
    return {
        "families": fams,
        "gap": gap,
        "gap_geomean": _geomean([g["multiple"] for g in gap]),
        "size_ratio": study["size_ratio"],
        "envelope_gap": env_gap,
        "envelope_gap_geomean": _geomean([g["multiple"] for g in env_gap]),
    }


def _geomean(values: list[float]) -> float | None:
    return float(np.exp(np.mean(np.log(values)))) if values else None
