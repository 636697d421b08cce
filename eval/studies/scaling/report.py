"""``report.md`` of ``maskscale sweep fit``: every number with what it rests on.

Why: a scaling law read without its basis is how a fit over three budgets, or a vertex beyond
the sampled sizes, passes for a result. So each figure here states the budgets and runs it
rests on and, where bootstrapped, the interval with the number of resamples (and how many of
them failed to give it); a budget without an in-range optimum shows its bound ("N_opt > N_max;
L_opt <= best measured loss"), never a vertex; and the compute the laws are fitted on (the
runs' realised C = 6 N D) is said up front with where it came from.
"""

from __future__ import annotations

import numpy as np

from eval.studies.scaling.baseline import report_lines, skipped
from eval.studies.scaling.bootstrap import gap_key, interval_text
from eval.studies.scaling.laws import MIN_POINTS

SOURCES = {
    "summary.json": "summary.json (tokens trained)",
    "MLflow tokens": "MLflow (last `tokens` metric)",
    "MLflow resolved.flops": "MLflow (resolved.flops param: the planned steps)",
    "plan": "sweep.json (the planned steps; no flops in summary.json)",
    "table": "the table's C_real column",
    "nominal": "nominal C (no record of the tokens trained)",
}


def _pm(value, std, fmt="{:.4g}") -> str:
    if value is None:
        return "-"
    return fmt.format(value) + ("" if std is None else " ± " + fmt.format(std))


def basis_lines(points: list[dict], data: dict) -> list[str]:
    """How compute was taken and how the intervals were made."""
    fitted = [p for p in points if p["status"] == "finished" and p.get("loss") is not None]
    counts: dict[str, int] = {}
    for p in fitted:
        source = p.get("C_source") or "nominal"
        counts[source] = counts.get(source, 0) + 1
    order = [*SOURCES, *sorted(set(counts) - set(SOURCES))]
    where = "; ".join(f"{counts[k]} from {SOURCES.get(k, k)}" for k in order if k in counts)
    where = where or "none"
    lines = [f"Compute: each run's realised C = 6 N D (D = tokens actually trained): {where}. "
             "Runs are grouped into IsoFLOP lines by their nominal budget C; a line's "
             "compute in the laws and the gap is the geometric mean of its runs' realised C "
             "(column `realised C`; spread = largest / smallest)."]  # fmt: skip
    boot = data.get("bootstrap")
    if boot:
        lines += ["", f"Intervals: {boot['level']:.0%} {boot['method']}; {boot['resamples']} "
                  f"resamples, seed {boot['seed']}. A resample that cannot give a quantity "
                  "(a line left with < 3 distinct sizes, a vertex beyond the sizes) counts "
                  "as failed for it."]  # fmt: skip
    else:
        lines += ["", "Intervals: no bootstrap (--bootstrap 0)."]
    return lines


def runs_lines(points: list[dict], unigram: dict) -> list[str]:
    shown = not unigram.get("skipped")
    extra = " unigram | below unigram |" if shown else ""
    lines = ["## Runs", "", "| family | size | N | C | loss |" + extra + " status | realised C |",
             "|---|---|---|---|---|" + ("---|---|" if shown else "") + "---|---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: (p["family"], p["C"], p["N"])):
        loss = "-" if p.get("loss") is None else f"{p['loss']:.4f}"
        cells = ""
        if shown:
            base, margin = p.get("unigram"), p.get("below_unigram")
            cells = (f" {'-' if base is None else f'{base:.4f}'} |"
                     f" {'-' if margin is None else f'{margin:+.4f}'} |")  # fmt: skip
        real = "-" if p.get("C_real") is None else f"{p['C_real']:.4g}"
        lines.append(f"| {p['family']} | {p.get('size', '-')} | {p['N']:,} | {p['C']:.3g} | "
                     f"{loss} |{cells} {p['status']} | {real} |")  # fmt: skip
    if shown:
        lines += ["", *report_lines(unigram)]
    return lines


def optimum_cells(o: dict) -> tuple[str, str, str]:
    """(N_opt, L_opt, note) cells of one budget: a value, a bound or '-'."""
    note = o["note"] or ("" if o["fitted"] else "not fittable")
    if o["n_points"] < MIN_POINTS:
        return "-", "-", f"not fittable: {o['n_points']} finished points (< {MIN_POINTS})"
    if o["fitted"]:
        s = o["N_opt_log_std"]
        n_opt = f"{o['N_opt']:.4g}" + ("" if s is None else f" (×/÷ {np.exp(min(s, 700)):.3g})")
        return n_opt, _pm(o["L_opt"], o["L_opt_std"]), note
    if o.get("status") == "bound":
        side = o.get("N_bound")
        n_opt = f"{side} {o['N_edge']:.4g}" if side else "?"
        return n_opt, f"<= {o['L_upper']:.4f}", note
    return "-", "-", note


def optima_lines(data: dict) -> list[str]:
    lines = ["## IsoFLOP optima (parabola in ln N)", "",
             "A budget whose vertex lies outside its sizes, or whose points do not bend "
             "upwards, gives a bound (N_opt beyond the largest or smallest size, L_opt <= its "
             "best measured loss) and stays out of the power laws and the gap.", "",
             "| family | C | points | N_opt | L_opt | note | realised C (spread) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for fam, fit in data["families"].items():
        for o in fit["optima"]:
            n_opt, l_opt, note = optimum_cells(o)
            real = o.get("C_real")
            real = "-" if real is None else f"{real:.4g} ({o.get('C_real_spread', 1):.3g}×)"
            lines.append(f"| {fam} | {o['C']:.3g} | {o['n_points']} | {n_opt} | {l_opt} | "
                         f"{note} | {real} |")  # fmt: skip
    return lines


def law_line(fam: str, sym: str, law: dict | None, basis: str, boot, key: str) -> str:
    """One power law with the budgets and runs it rests on and its exponent's interval;
    ``basis`` continues the parenthesis after the number of budgets."""
    if law is None:
        return f"- {fam.upper()} {sym}(C): not fittable (fewer than 2 budgets{basis})"
    ci = interval_text(boot, key)
    ci = "" if ci == "-" else f"; exponent {boot['level']:.0%} interval {ci}"
    return (f"- {fam.upper()} {sym}(C) = {law['coef']:.4g} · C^"
            f"{_pm(law['exponent'], law['exponent_std'])} (rests on {law['n_points']} "
            f"budgets{basis}{ci})")  # fmt: skip


def laws_lines(data: dict) -> list[str]:
    boot = data.get("bootstrap")
    lines = ["## Power laws (log-log least squares over in-range optima)", ""]
    for fam, fit in data["families"].items():
        used = fit.get("law_budgets") or []
        runs = sum(o["n_points"] for o in fit["optima"] if o["C"] in used)
        bounds = [o["C"] for o in fit["optima"] if o.get("status") == "bound"]
        basis = f", {runs} runs" if used else " with an in-range optimum"
        if bounds:
            basis += "; left out as bounds: C=" + ", ".join(f"{c:.3g}" for c in bounds)
        for key, sym in (("loss_law", "L_opt"), ("size_law", "N_opt")):
            lines.append(law_line(fam, sym, fit[key], basis, boot, f"{fam}.{key}.exponent"))
    return lines


def gap_lines(data: dict) -> list[str]:
    boot = data.get("bootstrap")
    lines = ["## Compute gap: MDM compute for the ARM's optimal loss", ""]
    mdm_law = data["families"]["mdm"]["loss_law"]
    if not data["gap"]:
        return lines + ["Not available: needs ARM budgets with an in-range optimum and an MDM "
                        "loss power law (bounds are never used)."]  # fmt: skip
    lines += ["| ARM budget C | realised C | ARM L_opt | MDM compute | multiple | interval |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for g in data["gap"]:
        ci = interval_text(boot, gap_key("gap", g["C"]), "{:.3g}")
        lines.append(f"| {g['C']:.3g} | {g['C_real']:.4g} | {g['arm_L_opt']:.4f} | "
                     f"{g['mdm_C']:.3g} | {g['multiple']:.3g}× | {ci} |")  # fmt: skip
    ci = interval_text(boot, "gap_geomean", "{:.3g}")
    lines += ["", f"Geometric mean multiple: {data['gap_geomean']:.3g}× over {len(data['gap'])} "
              f"ARM budgets, the MDM law resting on {mdm_law['n_points']} budgets"
              + ("" if ci == "-" else f"; {boot['level']:.0%} interval {ci}")]  # fmt: skip
    return lines + size_ratio_lines(data)


def size_ratio_lines(data: dict) -> list[str]:
    """The MDM/ARM compute-optimal size ratio from the two N_opt laws, with intervals."""
    boot, ratios = data.get("bootstrap"), data["size_ratio"] or []
    lines = ["", "## Compute-optimal size: N_opt(MDM) / N_opt(ARM)", ""]
    if not ratios:
        return lines + ["Not available: needs an N_opt law for both families (bounds are never "
                        "used)."]  # fmt: skip
    lines += ["| ARM budget C | ratio | interval |", "|---|---|---|"]
    for r in ratios:
        ci = interval_text(boot, gap_key("size_ratio", r["C"]), "{:.3g}")
        lines.append(f"| {r['C']:.3g} | {r['mdm_over_arm_N_opt']:.3g} | {ci} |")
    ci = interval_text(boot, "size_ratio_geomean", "{:.3g}")
    rests = {f: len(data["families"][f]["law_budgets"]) for f in ("arm", "mdm")}
    lines += ["", f"Geometric mean ratio: {data['size_ratio_geomean']:.3g} (the N_opt laws rest "
              f"on {rests['arm']} ARM and {rests['mdm']} MDM budgets"
              + (")" if ci == "-" else f"; {boot['level']:.0%} interval {ci})"),
              "", "For reference, Nie et al. (ICLR 2025) report ~16x for the compute gap and ~0.5 "
              "for this ratio (SlimPajama, 1e18-1e20 FLOPs)."]  # fmt: skip
    return lines


def envelope_lines(data: dict) -> list[str]:
    """The envelope section: best measured point per budget, its power law and gap."""
    boot = data.get("bootstrap")
    lines = ["## Envelope: the best measured size per budget", "",
             "No vertex needed, so it stands when the optimum lies outside the sizes (an upper",
             "bound on L_opt where the best size is at the edge of the grid).", "",
             "| family | C | best N | loss | note |", "|---|---|---|---|---|"]  # fmt: skip
    for fam, fit in data["families"].items():
        for e in fit.get("envelope", []):
            note = "smallest or largest size: the optimum may lie beyond" if e["at_edge"] else ""
            lines.append(f"| {fam} | {e['C']:.3g} | {e['N']:,} | {e['loss']:.4f} | {note} |")
    lines.append("")
    for fam, fit in data["families"].items():
        law = fit.get("envelope_law")
        basis = f", {len(fit.get('envelope', []))} best runs"
        key = f"{fam}.envelope_law.exponent"
        lines.append(law_line(fam, "L_env", law, basis, boot, key))
    if data.get("envelope_gap"):
        lines += ["", "| ARM budget C | ARM best loss | MDM compute (envelope law) | multiple |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {g['C']:.3g} | {g['arm_loss']:.4f} | {g['mdm_C']:.3g} | "
                  f"{g['multiple']:.3g}× |" for g in data["envelope_gap"]]  # fmt: skip
        ci = interval_text(boot, "envelope_gap_geomean", "{:.3g}")
        lines += ["", f"Geometric mean multiple (envelope): {data['envelope_gap_geomean']:.3g}× "
                  f"over {len(data['envelope_gap'])} ARM budgets"
                  + ("" if ci == "-" else f"; {boot['level']:.0%} interval {ci}")]  # fmt: skip
    return lines


def report_markdown(source: str, points: list[dict], data: dict) -> str:
    lines = [f"# Scaling-law fit: {source}", ""]
    bad = [p for p in points if p["status"] != "finished" or p.get("loss") is None]
    if source.startswith("table "):  # sweep fit --points: measured rows, nothing was planned
        lines += [f"{len(points) - len(bad)} of {len(points)} rows of the table have a loss.", ""]
    else:
        lines += [f"{len(points) - len(bad)} of {len(points)} planned runs finished with a loss.",
                  ""]  # fmt: skip
    lines += basis_lines(points, data)
    if bad:
        lines += ["", "## Missing or failed runs (not fitted)", "", "| run | status |", "|---|---|"]
        lines += [f"| {p['name']} | {p['status']} |" for p in bad]
    unigram = data.get("unigram") or skipped("", "")
    for section in (runs_lines(points, unigram), optima_lines(data), laws_lines(data),
                    gap_lines(data), envelope_lines(data)):  # fmt: skip
        lines += ["", *section]
    lines += ["", "![IsoFLOP profiles](isoflop.png)", "", "![Scaling laws](scaling.png)", ""]
    return "\n".join(lines)
