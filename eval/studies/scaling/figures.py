"""The two figures of ``maskscale sweep fit``: IsoFLOP profiles and the scaling laws.

Why a module of its own: the fit (``laws``), the report (``report``) and the plots change for
different reasons, and the plots are the only part that needs matplotlib. ``isoflop.png``
shows every fitted point per family and budget with its parabola, a star at an in-range
optimum (with its ln N error bar) and, where a budget only gives a bound, a hollow triangle at
the best measured point pointing to the side the optimum lies on; the unigram baseline is a
dashed line. ``scaling.png`` plots the in-range optima and the envelope against the realised
compute with their power laws; bounds are not drawn as optima.
"""

from __future__ import annotations

import numpy as np

FAMILIES = ("arm", "mdm")
BOUND_MARKER = {">": ">", "<": "<", None: "v"}
"""Matplotlib marker of a bound: the side of the sizes N_opt lies on (v: side unknown)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_budget(ax, pts: list[dict], o, color) -> None:
    """One budget's parabola and its optimum (star) or bound (triangle at the best point)."""
    if o is None:
        return
    if o.coeffs is not None:
        xs = np.linspace(np.log(pts[0]["N"]), np.log(pts[-1]["N"]), 100) - o.x0
        a, b, c0 = o.coeffs
        ax.plot(np.exp(xs + o.x0), a * xs**2 + b * xs + c0, color=color, lw=1)
    if o.fitted:
        err = None
        if o.N_opt_log_std is not None:
            s = min(o.N_opt_log_std, 50.0)
            err = [[o.N_opt * (1 - np.exp(-s))], [o.N_opt * (np.exp(s) - 1)]]
        ax.errorbar([o.N_opt], [o.L_opt], xerr=err, color=color, marker="*", ms=12)
    elif o.status == "bound":
        best = min(pts, key=lambda p: p["loss"])
        ax.scatter([best["N"]], [best["loss"]], marker=BOUND_MARKER[o.N_bound], s=120,
                   facecolors="none", edgecolors=color, linewidths=1.5)  # fmt: skip


def isoflop_figure(points: list[dict], result: dict, unigram: dict | None = None):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    budgets = sorted({p["C"] for p in points})
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(budgets), 1)))
    for ax, fam in zip(axes, FAMILIES):
        optima = {o.C: o for o in result["families"][fam]["optima"]}
        for color, c in zip(colors, budgets):
            pts = sorted((p for p in points if p["family"] == fam and p["C"] == c),
                         key=lambda p: p["N"])  # fmt: skip
            if not pts:
                continue
            ax.scatter([p["N"] for p in pts], [p["loss"] for p in pts], color=color,
                       label=f"C={c:.2g}")  # fmt: skip
            _draw_budget(ax, pts, optima.get(c), color)
        draw_unigram(ax, unigram, {p["name"] for p in points if p["family"] == fam})
        ax.set_xscale("log")
        ax.set_title(f"{fam.upper()}: IsoFLOP profiles (star: optimum; triangle: bound)")
        ax.set_xlabel("non-embedding parameters N")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss (nats)")
    fig.tight_layout()
    return fig


def draw_unigram(ax, unigram: dict | None, names: set[str]) -> None:
    """A dashed line at each unigram baseline that some of the panel's points are scored on."""
    groups = [g for g in (unigram or {}).get("groups", []) if names & set(g["runs"])]
    for i, g in enumerate(groups):
        label = f"unigram {g['loss']:.3f}" + (
            f" ({len(g['runs'])} runs)" if len(groups) > 1 else ""
        )
        ax.axhline(g["loss"], color="grey", ls="--", lw=1, label=label if i < 4 else None)


def _draw_family(ax_l, ax_n, fam: str, fit: dict, color, reach: float) -> None:
    env, env_law = fit.get("envelope") or [], fit.get("envelope_law")
    if env:  # the best measured point per budget: hollow markers, dashed law
        env_c = np.array([e.get("C_real", e["C"]) for e in env])
        loss = np.array([e["loss"] for e in env])
        keep = loss > 0  # a log axis shows positive losses only
        ax_l.scatter(env_c[keep], loss[keep], facecolors="none", edgecolors=color)
        if env_law is not None:
            label = (f"{fam.upper()}: L_env = {env_law.coef:.3g} C^{env_law.exponent:.4f} "
                     f"({env_law.n_points} budgets)")  # fmt: skip
            ax_l.plot(env_c, env_law(env_c), color=color, ls="--", label=label)
    good = [o for o in fit["optima"] if o.fitted]
    if not good:
        return
    cs = np.array([o.C_real for o in good])
    ax_l.scatter(cs, [o.L_opt for o in good], color=color)
    ax_n.scatter(cs, [o.N_opt for o in good], color=color)
    grid = np.geomspace(cs.min(), max(cs.max(), reach), 50)
    for ax, law, sym in ((ax_l, fit["loss_law"], "L"), (ax_n, fit["size_law"], "N")):
        if law is not None:
            label = (f"{fam.upper()}: {sym}_opt = {law.coef:.3g} C^{law.exponent:.4f} "
                     f"({law.n_points} budgets)")  # fmt: skip
            ax.plot(grid, law(grid), color=color, label=label)


def scaling_figure(result: dict):
    import matplotlib.ticker

    plt = _pyplot()
    fig, (ax_l, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5))
    for fam, color in zip(FAMILIES, ("tab:blue", "tab:red")):
        # the MDM's law is drawn on to where it reaches the ARM's losses (the compute gap)
        reach = max([g["mdm_C"] for g in result["gap"]], default=0) if fam == "mdm" else 0
        _draw_family(ax_l, ax_n, fam, result["families"][fam], color, reach)
    for ax, ylabel in ((ax_l, "optimal validation loss (nats)"), (ax_n, "optimal N")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("realised training compute C = 6ND (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_l.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_l.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    fig.tight_layout()
    return fig
