"""``maskscale eval temporal``: how much worse runs get on later-dated text, with a CI gate.

For each holdout period in date order and each run: the period's loss, its *degradation*
(holdout loss - validation loss, nats/token) and the perplexity ratio exp(degradation). The
intervals come from a bootstrap of the difference: validation rows and holdout rows are
independent samples, so each bootstrap draw resamples both and takes the difference of means.

Periods are ordered by the dates they cover: the corpus's ``split.holdout_ranges`` (recorded in
its manifest) where a holdout is named there, else the year in ``holdout_YYYY`` /
``holdout_YYYYs``; anything else comes last, by name.

The per-row losses come from ``maskscale eval ppl`` (:mod:`eval.measure.ppl`): a run whose
``RUN_DIR/eval/ppl.json`` was made with the same settings (corpus, rows, seed, MC samples,
bootstrap, dtype, weights) is not evaluated again. ``--match`` keeps, among the ARM and MDM
runs given, the pair whose validation losses are closest (the paper compares the two families
at matched validation loss). ``--max-degradation NATS`` is a release gate: exit code 1, naming
every (run, period) whose degradation's *lower* 95% bound exceeds NATS.

Outputs (rank 0): ``temporal.json``, ``temporal.md`` and ``temporal.png`` in the report folder,
also logged to every reported run's MLflow run with ``eval/temporal/<period>/...`` metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from eval.measure.loading import EvalError, load_model, open_corpus, resolve_splits
from eval.measure.outputs import (
    log_to_mlflow,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)
from eval.measure.ppl import bootstrap_means, interval, run_ppl
from eval.measure.rows import split_seed
from pipeline.shards import MANIFEST

FORMAT = "maskscale-eval-temporal/1"
BASELINE = "validation"
_YEAR = re.compile(r"(\d{4})")


# ----------------------------------------------------------------------------- periods


def period_dates(split: str, ranges: dict[str, list[str]]) -> tuple[str | None, str | None]:
    """(first day, last day) a holdout covers, from the ranges or the year in its name."""
    if split in ranges:
        start, end = ranges[split]
        return str(start), str(end)
    match = _YEAR.search(split.removeprefix("holdout_"))
    if match is None:
        return None, None
    year = int(match.group(1))
    last = year + 9 if split.endswith(f"{year}s") else year
    return f"{year:04d}-01-01", f"{last:04d}-12-31"


def order_periods(holdouts: list[str], ranges: dict[str, list[str]]) -> list[dict]:
    """[{split, label, start, end}] in date order (undated holdouts last, by name)."""
    periods = []
    for split in holdouts:
        start, end = period_dates(split, ranges)
        periods.append({"split": split, "label": split.removeprefix("holdout_"),
                        "start": start, "end": end})  # fmt: skip
    return sorted(periods, key=lambda p: (p["start"] is None, p["start"] or "", p["split"]))


def _ranges(corpus: str) -> dict[str, list[str]]:
    manifest = json.loads((Path(corpus) / MANIFEST).read_text())
    split_cfg = (manifest.get("config") or {}).get("split") or {}
    return dict(split_cfg.get("holdout_ranges") or {})


# ----------------------------------------------------------------------------- numbers


def degradation(result: dict, split: str, n_boot: int, seed: int) -> dict:
    """Holdout ``split`` against validation for one run's ppl result."""
    val = np.asarray(result["splits"][BASELINE]["row_loss"])
    hold = np.asarray(result["splits"][split]["row_loss"])
    diff = float(hold.mean() - val.mean())
    boots = bootstrap_means(hold, n_boot, split_seed(seed, split, "degradation"))
    boots -= bootstrap_means(val, n_boot, split_seed(seed, BASELINE, "degradation", split))
    ci = interval(boots)
    r = result["splits"][split]
    return {
        "split": split,
        "rows": r["rows"],
        "loss": r["loss"],
        "loss_ci": r["loss_ci"],
        "ppl": r["ppl"],
        "degradation": diff,
        "degradation_ci": ci,
        "ppl_ratio": math.exp(diff),
        "ppl_ratio_ci": [math.exp(ci[0]), math.exp(ci[1])],
    }


def match_pair(results: list[dict]) -> dict:
    """The (ARM, MDM) pair with the closest validation loss among the given runs."""
    val = {r["run"]: r["splits"][BASELINE]["loss"] for r in results}
    arms = [r["run"] for r in results if r["family"] == "arm"]
    mdms = [r["run"] for r in results if r["family"] == "mdm"]
    if not arms or not mdms:
        raise EvalError("--match needs at least one ARM run and one MDM run")
    arm, mdm = min(((a, m) for a in arms for m in mdms), key=lambda p: abs(val[p[0]] - val[p[1]]))
    return {"arm": arm, "mdm": mdm, "difference": abs(val[arm] - val[mdm]), "val_loss": val}


def build_report(results: list[dict], match: bool, max_degradation: float | None) -> dict:
    """The whole temporal report (JSON-able) from the runs' ppl results."""
    for r in results:
        if BASELINE not in r["splits"]:
            raise EvalError(f"run {r['run']}: its corpus has no {BASELINE} split with rows")
    pair = match_pair(results) if match else None
    if pair is not None:
        results = [r for r in results if r["run"] in (pair["arm"], pair["mdm"])]
    ranges: dict[str, list[str]] = {}
    for r in results:
        ranges.update(_ranges(r["settings"]["corpus"]))
    holdouts = sorted({s for r in results for s in r["splits"] if s != BASELINE})
    if not holdouts:
        raise EvalError("no holdout split to compare with validation (the corpus has none)")
    periods = order_periods(holdouts, ranges)
    settings = results[0]["settings"]
    runs = []
    for r in results:
        rows = [
            degradation(r, p["split"], settings["bootstrap"], settings["seed"])
            for p in periods
            if p["split"] in r["splits"]
        ]
        v = r["splits"][BASELINE]
        runs.append({
            "run": r["run"], "family": r["family"], "step": r["step"], "run_dir": r["run_dir"],
            "validation": {"loss": v["loss"], "loss_ci": v["loss_ci"], "ppl": v["ppl"],
                           "rows": v["rows"]},
            "periods": rows,
        })  # fmt: skip
    keys = ("rows", "mc_samples", "seed", "bootstrap", "dtype")
    report = {
        "format": FORMAT,
        "settings": {k: settings[k] for k in keys},
        "periods": periods,
        "runs": runs,
        "match": pair,
        "gate": None,
    }
    if max_degradation is not None:
        report["gate"] = gate(report, max_degradation)
    return report


def gate(report: dict, threshold: float) -> dict:
    """Every (run, period) whose degradation's lower 95% bound exceeds ``threshold``."""
    failures = [
        {"run": run["run"], "period": p["split"], "degradation": p["degradation"],
         "degradation_ci": p["degradation_ci"]}
        for run in report["runs"]
        for p in run["periods"]
        if p["degradation_ci"][0] > threshold
    ]  # fmt: skip
    return {"max_degradation": threshold, "passed": not failures, "failures": failures}


# ----------------------------------------------------------------------------- outputs


def _ci(ci: list[float], fmt: str = ".3f") -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def markdown(report: dict, png_name: str) -> str:
    s = report["settings"]
    mc = f", {s['mc_samples']} MC samples per row (MDM)" if s["mc_samples"] else ""
    lines = [
        "# Temporal degradation report",
        "",
        f"{s['rows'] or 'all'} rows per split (seed {s['seed']}){mc}, {s['dtype']}; 95% "
        f"intervals from {s['bootstrap']} bootstrap resamples over rows. Degradation = holdout "
        "loss - validation loss (nats/token); ppl ratio = exp(degradation). MDM losses are "
        "ELBO bounds, ARM losses exact.",
        "",
    ]
    if report["match"]:
        m = report["match"]
        lines += [
            f"Matched at validation loss: ARM `{m['arm']}` ({m['val_loss'][m['arm']]:.4f}) and "
            f"MDM `{m['mdm']}` ({m['val_loss'][m['mdm']]:.4f}), |difference| = "
            f"{m['difference']:.4f} nats; candidates: "
            + ", ".join(f"`{k}` {v:.4f}" for k, v in m["val_loss"].items()),
            "",
        ]
    lines += ["| run | family | step | validation loss | validation ppl |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        v = run["validation"]
        lines.append(f"| {run['run']} | {run['family'].upper()} | {run['step']} | "
                     f"{v['loss']:.4f} {_ci(v['loss_ci'])} | {v['ppl']:.2f} |")  # fmt: skip
    lines += ["", "| period | dates | run | loss | degradation (nats) | ppl ratio |"]
    lines.append("|---|---|---|---|---|---|")
    dates = {p["split"]: f"{p['start']} .. {p['end']}" if p["start"] else "?" for p in report["periods"]}  # fmt: skip
    for p in report["periods"]:
        for run in report["runs"]:
            for row in run["periods"]:
                if row["split"] == p["split"]:
                    lines.append(
                        f"| {p['label']} | {dates[p['split']]} | {run['run']} | "
                        f"{row['loss']:.4f} | {row['degradation']:+.4f} "
                        f"{_ci(row['degradation_ci'], '+.4f')} | {row['ppl_ratio']:.3f} "
                        f"{_ci(row['ppl_ratio_ci'])} |"
                    )
    if report["gate"] is not None:
        g = report["gate"]
        lines += ["", f"Quality-degradation gate (lower bound > {g['max_degradation']} nats): "
                  + ("passed" if g["passed"] else "FAILED")]  # fmt: skip
        lines += [f"- {f['run']} / {f['period']}: {f['degradation']:+.4f} "
                  f"{_ci(f['degradation_ci'], '+.4f')}" for f in g["failures"]]  # fmt: skip
    lines += ["", f"![degradation by period]({png_name})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Degradation (y) by period (x, date order), one line per run with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p["label"] for p in report["periods"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in report["runs"]:
        pos = {r["split"]: r for r in run["periods"]}
        xs = [i for i, p in enumerate(report["periods"]) if p["split"] in pos]
        rows = [pos[report["periods"][i]["split"]] for i in xs]
        y = [r["degradation"] for r in rows]
        line = ax.plot(xs, y, marker="o", label=f"{run['run']} ({run['family'].upper()})")[0]
        lo = [r["degradation_ci"][0] for r in rows]
        hi = [r["degradation_ci"][1] for r in rows]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="gray", lw=0.8)
    if report["gate"] is not None:
        ax.axhline(report["gate"]["max_degradation"], color="red", ls="--", lw=1, label="gate")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("holdout period")
    ax.set_ylabel("holdout - validation loss (nats/token)")
    ax.set_title("Temporal degradation (95% bootstrap bands)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path


def default_out(results: list[dict]) -> Path:
    """One run: its eval folder; several: ``eval-temporal/`` in their common parent folder."""
    if len(results) == 1:
        return Path(results[0]["out_dir"]) / "temporal"
    dirs = [Path(r["run_dir"] or r["export_dir"]).resolve() for r in results]
    common = Path(os.path.commonpath(dirs))
    return (common if common != Path(common.anchor) else Path.cwd()) / "eval-temporal"


def write_report(report: dict, out: Path) -> dict[str, Path]:
    paths = {"png": plot(report, out / "temporal.png")}
    paths["md"] = write_text_atomic(out / "temporal.md", markdown(report, "temporal.png"))
    paths["json"] = write_json_atomic(out / "temporal.json", report)
    for run in report["runs"]:
        metrics = {}
        for p in run["periods"]:
            for key in ("degradation", "ppl_ratio"):
                base = f"eval/temporal/{p['split']}/{key}"
                metrics[base] = p[key]
                metrics[base + "_lo"], metrics[base + "_hi"] = p[f"{key}_ci"]
        run_dir = Path(run["run_dir"]) if run["run_dir"] else None
        log_to_mlflow(run_dir, metrics, run["step"] or 0, list(paths.values()))
    return paths


# ----------------------------------------------------------------------------- command


def precheck(args: argparse.Namespace) -> None:
    """Refuse what would fail after the (long) evaluation: a run whose corpus lacks validation
    or holdouts, --match without both families."""
    families = set()
    for path in args.runs:
        info = load_model(path, args.checkpoint, args.device, args.dtype, weights=False)
        corpus_dir, manifest = open_corpus(info, args.corpus)
        splits = resolve_splits(manifest, None, corpus_dir)
        if BASELINE not in splits or splits == [BASELINE]:
            raise EvalError(
                f"corpus {corpus_dir} needs a {BASELINE} split and at least one holdout_* split "
                f"with rows for a temporal report (it has {splits})"
            )
        families.add(info.family)
    if args.match and families != {"arm", "mdm"}:
        raise EvalError("--match needs at least one ARM run and one MDM run")


def cmd_temporal(args: argparse.Namespace) -> int:
    try:
        precheck(args)
        results, rank = run_ppl(args, reuse=True)
        if rank != 0:
            return 0
        report = build_report(results, args.match, args.max_degradation)
    except EvalError as e:
        print(f"maskscale eval temporal: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, Path(args.out) if args.out else default_out(results))
    reused = [f"{r['run']}: {', '.join(r['reused'])}" for r in results if r["reused"]]
    if reused:
        print("reused saved ppl results (same settings) for " + "; ".join(reused))
    print(markdown(report, str(paths["png"])))
    print(f"report: {paths['md']}\nplot:   {paths['png']}\njson:   {paths['json']}")
    g = report["gate"]
    if g is not None and not g["passed"]:
        names = ", ".join(f"{f['run']}/{f['period']}" for f in g["failures"])
        print(f"quality-degradation gate FAILED (> {g['max_degradation']} nats): {names}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
