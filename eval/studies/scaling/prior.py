"""Sizes per budget around a prior optimum, for ``maskscale sweep plan --prior``.

Why: an IsoFLOP budget yields an optimum only when its sizes bracket it; otherwise the fit can
give no more than a bound (``laws``). One fixed grid of sizes for every budget either spends
runs far from the optimum at the small budgets or misses it at the large ones, because the
optimum moves with compute, roughly as N_opt ~ C^0.5 (Hoffmann et al.; the paper's fits). So
the plan centres each budget's sizes on a prior N_opt(C):

- an anchor ``N0@C0``: N_opt(C) = N0 (C / C0)^g with g = ``--prior-exponent`` (0.5), the same
  for every family; or
- a previous ``fit.json``: each family's own fitted N_opt(C) = k C^g.

Per (family, budget) it takes, from the pool of presets (``--sizes``), the presets closest in
ln N to ``per_budget`` points evenly spaced in ln N over [N_opt / window, N_opt x window]; only
presets inside that window are used. A budget left with fewer than three sizes (the pool is too
coarse, or the window reaches past its largest or smallest preset) is named in a note.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.configlib import ConfigError

MIN_SIZES = 3
"""A parabola needs three sizes per budget."""


@dataclass
class Prior:
    """N_opt(C) = coef * C^exponent per family, and where it came from."""

    source: str
    laws: dict[str, tuple[float, float]]

    def n_opt(self, family: str, c: float) -> float:
        coef, exponent = self.laws[family]
        return coef * c**exponent


def _positive(text: str, what: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--prior: {what} {text!r} is not a positive number, e.g. {example}")
    return value


def from_anchor(text: str, families: list[str], exponent: float) -> Prior:
    """``N0@C0`` -> N_opt(C) = N0 (C / C0)^exponent for every family."""
    n_text, _, c_text = text.partition("@")
    n0 = _positive(n_text, "N_opt", "2e8@6e18")
    c0 = _positive(c_text, "budget", "2e8@6e18")
    coef = n0 / c0**exponent
    source = f"anchor N_opt = {n0:.4g} at C = {c0:.4g}, N_opt ~ C^{exponent:g}"
    return Prior(source, {f: (coef, exponent) for f in families})


def from_fit(path: Path, families: list[str]) -> Prior:
    """Each family's N_opt law of a previous ``maskscale sweep fit`` (its fit.json)."""
    try:
        data = json.loads(path.read_text())
        fams = data["families"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--prior {path}: not a fit.json of `maskscale sweep fit` ({e})") from e
    laws = {}
    for f in families:
        law = (fams.get(f) or {}).get("size_law")
        if not law:
            raise ConfigError(f"--prior {path}: family {f} has no N_opt law (fewer than 2 "
                              "budgets with an in-range optimum); give an anchor instead, "
                              "e.g. --prior 2e8@6e18")  # fmt: skip
        laws[f] = (float(law["coef"]), float(law["exponent"]))
    text = ", ".join(f"{f} N_opt = {k:.4g} C^{g:.4g}" for f, (k, g) in laws.items())
    return Prior(f"{path.name}: {text}", laws)


def parse_prior(text: str, families: list[str], exponent: float) -> Prior:
    """An anchor ``N0@C0`` or the path of a fit.json."""
    path = Path(text)
    if path.is_file() or text.endswith(".json"):
        if not path.is_file():
            raise ConfigError(f"--prior {text}: no such file")
        return from_fit(path, families)
    if "@" not in text:
        raise ConfigError(f"--prior {text!r}: give N_OPT@C (e.g. 2e8@6e18) or a fit.json")
    return from_anchor(text, families, exponent)


def pick_sizes(pool: dict[str, int], centre: float, window: float, k: int) -> list[str]:
    """Up to ``k`` presets of ``pool`` (name -> N) inside [centre / window, centre x window],
    each the closest unused one in ln N to k points evenly spaced in ln N over the window;
    ordered by N."""
    lo, hi = centre / window, centre * window
    inside = [(n, s) for s, n in pool.items() if lo * (1 - 1e-9) <= n <= hi * (1 + 1e-9)]
    chosen: list[str] = []
    for target in np.geomspace(lo, hi, k) if k > 1 else [centre]:
        free = [(n, s) for n, s in inside if s not in chosen]
        if free:
            chosen.append(min(free, key=lambda ns: abs(math.log(ns[0] / target)))[1])
    return sorted(chosen, key=lambda s: pool[s])


def spaced_grid(
    prior: Prior, pool: dict[str, int], families: list[str], budgets: list[float],
    window: float, k: int,
) -> tuple[dict[tuple[str, float], list[str]], dict]:  # fmt: skip
    """The sizes per (family, budget) and the record for sweep.json (prior, window, the
    centre and sizes of every budget, notes on budgets left with too few sizes)."""
    sizes, rows, notes = {}, [], []
    smallest, largest = min(pool.values()), max(pool.values())
    for f in families:
        for c in budgets:
            centre = prior.n_opt(f, c)
            picked = pick_sizes(pool, centre, window, k)
            sizes[(f, c)] = picked
            rows.append({"family": f, "C": c, "N_opt": centre, "window": [centre / window,
                         centre * window], "sizes": picked})  # fmt: skip
            if len(picked) < MIN_SIZES:
                beyond = ""
                if centre * window > largest or centre / window < smallest:
                    beyond = f" (the window reaches past the pool's {smallest:,}..{largest:,})"
                notes.append(f"{f} C={c:.3g}: {len(picked)} preset(s) of --sizes within "
                             f"{centre / window:.3g}..{centre * window:.3g} around the prior "
                             f"N_opt {centre:.3g}{beyond}; fewer than {MIN_SIZES}, so this "
                             "budget cannot be fitted: widen --window or add presets")  # fmt: skip
    record = {"source": prior.source, "window": window, "per_budget": k, "budgets": rows,
              "notes": notes}  # fmt: skip
    return sizes, record
