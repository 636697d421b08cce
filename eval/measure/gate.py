"""The quality-degradation gate: pass, fail, or say it cannot tell.

Why three outcomes: a gate that passes whenever the interval's lower bound is under the
threshold passes exactly when the data are too thin to show anything (a wide interval) -- and
passes NaN losses. A release gate must *decide* only when the evidence decides:

- **pass**: the whole 95% interval of the degradation is at or below the threshold;
- **fail**: the whole interval is above it;
- **inconclusive**: the interval straddles it, a loss is not finite, or a split has too few
  documents for an interval (``--min-docs``).

Overall: fail if any (run, period) fails, else inconclusive if any is, else pass. Exit codes:
0 pass, 1 fail, 3 inconclusive (2 stays the usage error of every maskscale command);
``--inconclusive pass|fail`` maps the third outcome for CI jobs that must be binary.
"""

from __future__ import annotations

import math

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
EXIT = {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}


def check_threshold(threshold: float) -> float:
    """A finite number of nats, else ValueError (a usage error)."""
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ValueError(f"--max-degradation must be a finite number of nats, got {threshold}")
    return float(threshold)


def verdict(period: dict, threshold: float) -> tuple[str, str]:
    """(outcome, reason) of one (run, period) row of the temporal report."""
    ci = period.get("degradation_ci")
    if ci is None:
        return INCONCLUSIVE, period.get("no_interval") or "no interval"
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, f"interval is not finite ([{lo}, {hi}])"
    if hi <= threshold:
        return PASS, f"whole interval [{lo:+.4f}, {hi:+.4f}] <= {threshold}"
    if lo > threshold:
        return FAIL, f"whole interval [{lo:+.4f}, {hi:+.4f}] > {threshold}"
    return INCONCLUSIVE, f"interval [{lo:+.4f}, {hi:+.4f}] straddles {threshold}"


def gate(runs: list[dict], threshold: float, inconclusive_as: str | None = None) -> dict:
    """The gate over every run's periods (``runs`` as in the temporal report)."""
    rows = []
    for run in runs:
        for p in run["periods"]:
            outcome, reason = verdict(p, threshold)
            rows.append({"run": run["run"], "period": p["split"], "outcome": outcome,
                         "reason": reason, "degradation": p["degradation"],
                         "degradation_ci": p["degradation_ci"]})  # fmt: skip
    outcomes = {r["outcome"] for r in rows}
    overall = FAIL if FAIL in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else PASS
    decided = overall
    if overall == INCONCLUSIVE and inconclusive_as is not None:
        decided = inconclusive_as
    return {
        "max_degradation": threshold,
        "outcome": overall,
        "decided": decided,
        "inconclusive_as": inconclusive_as,
        "exit_code": EXIT[decided],
        "passed": decided == PASS,
        "periods": rows,
        "failures": [r for r in rows if r["outcome"] == FAIL],
    }


def gate_lines(g: dict) -> list[str]:
    """Markdown lines of the gate's verdict, one per (run, period)."""
    head = f"Quality-degradation gate (max {g['max_degradation']} nats): **{g['outcome'].upper()}**"
    if g["decided"] != g["outcome"]:
        head += f" (counted as {g['decided']}: --inconclusive {g['inconclusive_as']})"
    return [head, *(f"- {r['run']} / {r['period']}: {r['outcome']} ({r['reason']})"
                    for r in g["periods"])]  # fmt: skip
