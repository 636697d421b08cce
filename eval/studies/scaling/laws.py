"""Scaling-law fits of an IsoFLOP study: per-budget optima, power laws and the compute gap.

Why: the study's headline numbers (MDMs follow L_opt(C) = a C^-b with an exponent like the
ARM's, yet need ~16x its compute for the same loss) are fits, and a fit is only as good as the
data and the uncertainty it reports. So this module is plain numpy with nothing hidden, and it
never turns a lack of data into a number:

1. Per budget and family, a parabola L = a x^2 + b x + c in x = ln N through the IsoFLOP
   points (Hoffmann et al.'s approach 2). A vertex inside the sampled sizes gives N_opt and
   L_opt; their standard errors follow from the fit covariance by the delta method (needs >= 4
   points; through exactly 3 the parabola is exact and the error unknown).
2. A budget without such a vertex (it lies beyond the sizes, the points do not bend upwards,
   or the vertex's loss is not positive) reports a **bound**, never a number: N_opt > N_max
   (or < N_min) on the side the loss still falls, and L_opt <= the best measured loss (true of
   any budget). Bounds stay out of the power laws and the gap.
3. Per family, least squares in log-log space over the in-range optima: L_opt(C) = a C^-b and
   N_opt(C) = k C^g.
4. The compute gap: at each ARM budget with an optimum, the compute C' at which the MDM's law
   reaches the ARM's L_opt there; the multiple is C'/C.

Compute is the *realised* compute of the runs (C = 6 N D with D the tokens actually trained,
``C_real`` of each point; the nominal budget when a point has none). Runs are grouped into
IsoFLOP lines by their nominal budget ``C`` (the plan's line; realised C differ within a line
only by each size's rounding of steps); a line's compute for the laws and the gap is the
geometric mean of its runs' realised C, and its spread (max/min) is recorded.

The envelope, beside the parabolas: per budget the best *measured* point (Hoffmann et al.'s
approach 1 reads the same lower envelope off training curves) at that run's own realised C, its
power law L_env(C) and the gap between the two families' envelope laws. It needs no vertex, so
it stays available when the optimum lies outside the sampled sizes (small CPU studies, where
steps are few and the smallest model often wins); it overestimates L_opt by how far the best
size is from the optimum.

Any finite points with positive N and C fit without an exception; points that are not that
are refused by :func:`check_points` with the point and field named.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

MIN_POINTS = 3
"""A parabola needs three points; fewer and the budget is reported as not fittable."""
FAMILIES = ("arm", "mdm")


@dataclass
class Optimum:
    """The vertex of one IsoFLOP parabola, or the bound a budget gives without one."""

    C: float
    """The nominal budget (the IsoFLOP line)."""
    n_points: int
    N_opt: float | None
    """Compute-optimal size (None unless the vertex lies inside the sampled sizes)."""
    N_opt_log_std: float | None
    """Standard error of ln N_opt (None when unknown: exactly 3 points)."""
    L_opt: float | None
    L_opt_std: float | None
    coeffs: tuple[float, float, float] | None
    """(a, b, c) of L = a x^2 + b x + c with x = ln N - x0."""
    x0: float
    """Centre of x (mean ln N of the points) for numerical conditioning."""
    extrapolated: bool = False
    """The parabola's vertex lies outside the sampled sizes (then only a bound is given)."""
    note: str = ""
    C_real: float | None = None
    """Realised compute of the line: geometric mean of its runs' 6 N D."""
    C_real_spread: float = 1.0
    """Largest over smallest realised C of the line's runs."""
    N_bound: str | None = None
    """Without an optimum: ">" (N_opt > N_edge, the largest size) or "<" (below the smallest),
    None when the side is unknown."""
    N_edge: float | None = None
    L_upper: float | None = None
    """The best measured loss: L_opt <= L_upper holds for every budget with points."""

    @property
    def fitted(self) -> bool:
        return self.N_opt is not None

    @property
    def status(self) -> str:
        """optimum (in-range vertex), bound (points enough, no vertex) or not fittable."""
        if self.fitted:
            return "optimum"
        return "bound" if self.coeffs is not None else "not fittable"

    def as_dict(self) -> dict:
        return {**asdict(self), "fitted": self.fitted, "status": self.status}


@dataclass
class PowerLaw:
    """y = coef * C^exponent, fitted in log-log space."""

    coef: float
    exponent: float
    exponent_std: float | None
    n_points: int

    def __call__(self, c):
        with np.errstate(over="ignore"):
            return self.coef * np.asarray(c, dtype=float) ** self.exponent

    def inverse(self, y: float) -> float:
        """The C at which the law reaches y; inf where it never does (y <= 0, a flat law) or
        only beyond float range (a near-flat law)."""
        if not (y > 0 and math.isfinite(y)) or self.exponent == 0 or not self.coef > 0:
            return math.inf
        log_c = (math.log(y) - math.log(self.coef)) / self.exponent
        return math.exp(log_c) if log_c < 700 else math.inf

    def as_dict(self) -> dict:
        return asdict(self)


def check_points(points: list[dict]) -> None:
    """Refuse points the fit cannot take: N and C (and C_real) positive finite numbers, a
    finite loss, family arm or mdm. The error names the point and the field."""
    for i, p in enumerate(points):
        who = p.get("name") or f"point {i + 1}"
        for key in ("N", "C", "C_real", "loss"):
            value = p.get(key)
            if value is None and key == "C_real":
                continue
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
            if not ok or (key != "loss" and value <= 0):
                need = "a finite number" if key == "loss" else "a positive finite number"
                raise ValueError(f"{who}: {key} must be {need}, got {value!r}")
        if p.get("family") not in FAMILIES:
            raise ValueError(f"{who}: family must be arm or mdm, got {p.get('family')!r}")


def lstsq(x: np.ndarray, y: np.ndarray, deg: int):
    """Polynomial least squares (highest power first, as np.polyfit) and its covariance
    (np.polyfit's scaling; None with no degrees of freedom left), through one SVD. (None,
    None) when the x are too close together for the degree (rank-deficient)."""
    design = np.vander(x, deg + 1)
    with np.errstate(all="ignore"):
        u, sv, vt = np.linalg.svd(design, full_matrices=False)
        if not (sv[-1] > sv[0] * max(design.shape) * np.finfo(float).eps):
            return None, None
        coeffs = vt.T @ ((u.T @ y) / sv)
        if not np.all(np.isfinite(coeffs)):
            return None, None
        dof = len(x) - (deg + 1)
        if dof <= 0:
            return coeffs, None
        resid = y - design @ coeffs
        cov = float(resid @ resid) / dof * ((vt.T / sv**2) @ vt)
    return coeffs, cov if np.all(np.isfinite(cov)) else None


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _realised(c: float, c_real: list[float] | None, n: int) -> tuple[float, float]:
    values = np.asarray(c_real if c_real is not None else [c] * max(n, 1), dtype=float)
    if np.all(values == values[0]):
        return float(values[0]), 1.0
    return float(np.exp(np.log(values).mean())), float(values.max() / values.min())


def _bound(out: Optimum, side: str | None, n: list[float], why: str) -> Optimum:
    """Fill ``out`` as a bound on the given side of the sampled sizes."""
    out.N_bound = side
    out.N_edge = float(max(n) if side == ">" else min(n)) if side else None
    n_text = "N_opt unknown"
    if side:
        where = "largest" if side == ">" else "smallest"
        n_text = f"N_opt {side} {out.N_edge:.4g} ({where} size)"
    out.note = f"{why}; bound: {n_text}, L_opt <= {out.L_upper:.4f} (best measured)"
    return out


def fit_isoflop(
    c: float, n: list[float], loss: list[float], c_real: list[float] | None = None
) -> Optimum:
    """The parabola-in-ln-N optimum of one budget's points, or its bound (module docstring)."""
    x_raw = np.log(np.asarray(n, dtype=float))
    y = np.asarray(loss, dtype=float)
    x0 = float(x_raw.mean()) if len(x_raw) else 0.0
    out = Optimum(c, len(y), None, None, None, None, None, x0)
    out.C_real, out.C_real_spread = _realised(c, c_real, len(y))
    if len(y):
        out.L_upper = float(y.min())
    distinct = len(set(x_raw.tolist()))
    if distinct < MIN_POINTS:
        out.note = f"{distinct} distinct sizes; a parabola needs {MIN_POINTS}"
        return out
    x = x_raw - x0
    coeffs, cov = lstsq(x, y, 2)
    if coeffs is None:
        out.note = "sizes too close together to fit a parabola"
        return out
    a, b, c0 = (float(v) for v in coeffs)
    out.coeffs = (a, b, c0)
    best = x_raw[int(np.argmin(y))]
    edge = ">" if best == x_raw.max() else "<" if best == x_raw.min() else None
    if a <= 0:
        return _bound(out, edge, n, "no minimum (the points do not bend upwards)")
    with np.errstate(all="ignore"):
        xv = -b / (2 * a)
        lv = c0 - b * b / (4 * a)
    if not (x.min() <= xv <= x.max()):  # also a vertex beyond float range (nan, inf)
        out.extrapolated = True
        side = "<" if xv < x.min() else ">"
        return _bound(out, side, n, "vertex outside the sampled sizes (add sizes there)")
    if not (lv > 0 and math.isfinite(lv)):
        return _bound(out, None, n, f"vertex loss {lv:.3g} is not a loss (<= 0)")
    out.N_opt, out.L_opt = float(math.exp(xv + x0)), float(lv)
    if cov is not None:
        gx = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])  # d xv / d(a, b, c)
        gl = np.array([b * b / (4 * a * a), -b / (2 * a), 1.0])  # d lv / d(a, b, c)
        out.N_opt_log_std = _finite_or_none(math.sqrt(max(gx @ cov @ gx, 0.0)))
        out.L_opt_std = _finite_or_none(math.sqrt(max(gl @ cov @ gl, 0.0)))
    else:
        out.note = "exactly 3 points: the parabola is exact, its uncertainty unknown"
    return out


def fit_power_law(c: list[float], y: list[float]) -> PowerLaw | None:
    """Least squares of ln y = ln coef + exponent ln C over the pairs with C, y > 0; None
    with fewer than 2 distinct C."""
    pairs = [(ci, yi) for ci, yi in zip(c, y) if ci > 0 and yi > 0]
    pairs = [(ci, yi) for ci, yi in pairs if math.isfinite(ci) and math.isfinite(yi)]
    if len({ci for ci, _ in pairs}) < 2:
        return None
    lc, ly = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    coeffs, cov = lstsq(lc, ly, 1)
    if coeffs is None or abs(coeffs[1]) > 700:  # coef beyond float range: no usable law
        return None
    std = None if cov is None else _finite_or_none(math.sqrt(max(cov[0, 0], 0.0)))
    return PowerLaw(float(math.exp(coeffs[1])), float(coeffs[0]), std, len(pairs))


def _gap_rows(targets: list[tuple[float, float, float]], law: PowerLaw | None, key: str):
    """Per (nominal C, realised C, ARM loss): the compute at which the MDM's ``law`` reaches
    that loss and its multiple of the realised C; none for a law that does not fall, none
    where it never gets there within float range (a near-flat law)."""
    if law is None or not law.exponent < 0:
        return []
    rows = []
    for c, c_real, loss in targets:
        c_mdm = law.inverse(loss)
        if math.isfinite(c_mdm) and math.isfinite(c_mdm / c_real) and c_mdm / c_real > 0:
            rows.append({"C": c, "C_real": c_real, key: loss, "mdm_C": c_mdm,
                         "multiple": c_mdm / c_real})  # fmt: skip
    return rows


def compute_gap(arm: list[Optimum], mdm_loss_law: PowerLaw | None) -> list[dict]:
    """Per ARM budget with an in-range optimum: the compute at which the MDM's L_opt law
    reaches the ARM's L_opt (bounds stay out)."""
    targets = [(o.C, o.C_real or o.C, o.L_opt) for o in arm if o.fitted]
    return _gap_rows(targets, mdm_loss_law, "arm_L_opt")


def envelope_gap(arm_env: list[dict], mdm_law: PowerLaw | None) -> list[dict]:
    """Per ARM budget: the compute at which the MDM's envelope law reaches the ARM's best
    measured loss there."""
    targets = [(e["C"], e.get("C_real", e["C"]), e["loss"]) for e in arm_env]
    return _gap_rows(targets, mdm_law, "arm_loss")


def fit_family(points: list[dict]) -> dict:
    """Optima (or bounds) per budget, the two power laws and the envelope of one family's
    finished points."""
    budgets = sorted({p["C"] for p in points})
    optima, envelope = [], []
    for c in budgets:
        pts = sorted((p for p in points if p["C"] == c), key=lambda p: p["N"])
        reals = [p.get("C_real") or c for p in pts]
        optima.append(fit_isoflop(c, [p["N"] for p in pts], [p["loss"] for p in pts], reals))
        best = min(pts, key=lambda p: p["loss"])
        edge = best is pts[0] or best is pts[-1]
        envelope.append({"C": c, "C_real": best.get("C_real") or c, "N": best["N"],
                         "loss": best["loss"], "n_points": len(pts),
                         "at_edge": bool(edge and len(pts) > 1)})  # fmt: skip
    good = [o for o in optima if o.fitted]
    loss_law = fit_power_law([o.C_real for o in good], [o.L_opt for o in good])
    size_law = fit_power_law([o.C_real for o in good], [o.N_opt for o in good])
    env_law = fit_power_law([e["C_real"] for e in envelope], [e["loss"] for e in envelope])
    return {"optima": optima, "loss_law": loss_law, "size_law": size_law,
            "envelope": envelope, "envelope_law": env_law,
            "law_budgets": [o.C for o in good]}  # fmt: skip


def fit_study(points: list[dict], check: bool = True) -> dict:
    """Both families' fits and the gap. ``points``: finished runs {family, N, C, loss} and
    optionally C_real (realised compute) and name; see :func:`check_points` (skipped with
    ``check=False``, for points already checked)."""
    if check:
        check_points(points)
    fits = {f: fit_family([p for p in points if p["family"] == f]) for f in FAMILIES}
    gap = compute_gap(fits["arm"]["optima"], fits["mdm"]["loss_law"])
    size_ratio = None
    arm_size, mdm_size = fits["arm"]["size_law"], fits["mdm"]["size_law"]
    if arm_size and mdm_size:
        budgets = [(o.C, o.C_real) for o in fits["arm"]["optima"] if o.fitted]
        size_ratio = [{"C": c, "C_real": cr, "mdm_over_arm_N_opt": ratio}
                      for c, cr in budgets
                      if math.isfinite(ratio := float(mdm_size(cr) / arm_size(cr)))]  # fmt: skip
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
            "law_budgets": fit["law_budgets"],
        }
    gap, env_gap = study["gap"], study["envelope_gap"]
    return {
        "families": fams,
        "gap": gap,
        "gap_geomean": geomean([g["multiple"] for g in gap]),
        "size_ratio": study["size_ratio"],
        "size_ratio_geomean": geomean([r["mdm_over_arm_N_opt"] for r in study["size_ratio"] or []]),
        "envelope_gap": env_gap,
        "envelope_gap_geomean": geomean([g["multiple"] for g in env_gap]),
    }


def geomean(values: list[float]) -> float | None:
    """Geometric mean of positive values; None for none (or one beyond float range)."""
    if not values or min(values) <= 0:
        return None
    return _finite_or_none(float(np.exp(np.mean(np.log(values)))))
