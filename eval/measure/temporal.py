"""``maskscale eval temporal``: how much worse runs get on later-dated text, with a CI gate.

For each holdout period in date order and each run: the period's loss, its *degradation*
(holdout loss - validation loss, nats/token) and the perplexity ratio exp(degradation). The
intervals come from a bootstrap of the difference over *documents* (``resample``): validation
and holdout documents are independent samples, so each draw resamples both and takes the
difference of their per-token losses. A split with too few documents (``--min-docs``) gets no
interval, and the report says so.

Only comparable runs are compared: runs evaluated on different corpus manifests or tokenizers
are refused (exit 2, naming them) unless ``--allow-mixed``. Runs scored on the same rows share
their resampled documents, so for every ARM/MDM pair a *paired* bootstrap gives an interval
for the difference of their degradations (MDM - ARM) per period.

Periods are ordered by the dates they cover: the corpus's ``split.holdout_ranges`` (recorded in
its manifest) where a holdout is named there, else the year in ``holdout_YYYY`` /
``holdout_YYYYs``; anything else comes last, by name.

The per-row losses come from ``maskscale eval ppl`` (:mod:`eval.measure.ppl`): a run whose
``RUN_DIR/eval/ppl.json`` was made with the same settings (corpus, rows, seed, MC samples,
bootstrap, dtype, weights) is not evaluated again. ``--match`` keeps, among the ARM and MDM
runs given, the pair whose validation losses are closest (the paper compares the two families
at matched validation loss). ``--max-degradation NATS`` is a release gate with three outcomes
(``gate``): pass (exit 0), fail (exit 1), inconclusive (exit 3; ``--inconclusive pass|fail``
maps it), with the verdict and its reason per (run, period) in the report.

Outputs (rank 0): ``temporal.json``, ``temporal.md`` and ``temporal.png`` in the report folder,
also logged to every reported run's MLflow run with ``eval/temporal/<period>/...`` metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from eval.measure.gate import check_threshold, gate, gate_lines
from eval.measure.loading import EvalError, load_model, open_corpus, resolve_splits
from eval.measure.outputs import (
    log_to_mlflow,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)
from eval.measure.ppl import run_ppl
from eval.measure.resample import interval, ratio_samples, why_no_interval
from eval.measure.rows import split_seed
from pipeline.shards import MANIFEST

FORMAT = "maskscale-eval-temporal/2"
"""2: intervals over documents, three-outcome gate, paired ARM/MDM differences."""
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


def _split_samples(r: dict, n_boot: int, seed, docs: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap samples of a split's loss; ``docs``: resample these document ids (absent
    ones count zero tokens), so two runs resample the very same documents."""
    sums, counts = np.asarray(r["doc_loss_sum"]), np.asarray(r["doc_tokens"])
    if docs is not None:
        where = np.searchsorted(docs, r["doc_id"])
        sums, counts = np.zeros(len(docs)), np.zeros(len(docs), np.int64)
        sums[where], counts[where] = r["doc_loss_sum"], r["doc_tokens"]
    return ratio_samples(sums, counts, n_boot, seed)


def degradation_samples(
    result: dict, split: str, n_boot: int, seed: int, docs: dict | None = None
) -> np.ndarray:
    """Bootstrap samples of holdout - validation loss (documents resampled in each split,
    with seeds that depend only on the split names: equal for every run, hence paired when
    ``docs`` gives both runs the same documents per split)."""
    docs = docs or {}
    hold = _split_samples(result["splits"][split], n_boot, split_seed(seed, split, "degradation"),
                          docs.get(split))  # fmt: skip
    val_seed = split_seed(seed, BASELINE, "degradation", split)
    return hold - _split_samples(result["splits"][BASELINE], n_boot, val_seed, docs.get(BASELINE))


def no_interval(result: dict, split: str, min_docs: int) -> str | None:
    """Why the degradation of ``split`` gets no interval (either split), or None."""
    reasons = [
        f"{s}: {why}"
        for s in (BASELINE, split)
        if (
            why := why_no_interval(
                result["splits"][s]["documents"], result["splits"][s]["loss"], min_docs
            )
        )  # fmt: skip
    ]
    return "; ".join(reasons) or None


def degradation(result: dict, split: str, settings: dict) -> dict:
    """Holdout ``split`` against validation for one run's ppl result."""
    r, v = result["splits"][split], result["splits"][BASELINE]
    diff = float(r["loss"] - v["loss"])
    reason = no_interval(result, split, settings["min_docs"])
    ci = None
    if reason is None:
        ci = interval(degradation_samples(result, split, settings["bootstrap"], settings["seed"]))
    return {
        "split": split,
        "rows": r["rows"],
        "documents": r["documents"],
        "tokens": r["tokens"],
        "loss": r["loss"],
        "loss_ci": r["loss_ci"],
        "ppl": r["ppl"],
        "degradation": diff,
        "degradation_ci": ci,
        "no_interval": reason,
        "ppl_ratio": _exp(diff),
        "ppl_ratio_ci": None if ci is None else [_exp(ci[0]), _exp(ci[1])],
    }


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0)) if math.isfinite(x) else x


def shared_rows(a: dict, b: dict, split: str) -> bool:
    """Whether two runs' ppl results scored the same rows of ``split``."""
    ra, rb = a["splits"].get(split), b["splits"].get(split)
    return bool(ra and rb) and ra["row_index"] == rb["row_index"]


def _union_docs(a: dict, b: dict, split: str) -> np.ndarray:
    """The documents either run scored on ``split`` (an ARM scores a row's tokens 1..T, an
    MDM 0..T-1, so a document touching only a row's edge may be scored by one of them)."""
    return np.union1d(a["splits"][split]["doc_id"], b["splits"][split]["doc_id"])


def paired_differences(results: list[dict], periods: list[dict], settings: dict) -> list[dict]:
    """For every (ARM, MDM) pair: per period, MDM degradation - ARM degradation with a paired
    interval (the same resampled documents for both), when both scored the same rows."""
    n_boot, seed, min_docs = settings["bootstrap"], settings["seed"], settings["min_docs"]
    out = []
    for arm in (r for r in results if r["family"] == "arm"):
        for mdm in (r for r in results if r["family"] == "mdm"):
            rows = []
            for p in periods:
                split = p["split"]
                if split not in arm["splits"] or split not in mdm["splits"]:
                    continue
                diff = (mdm["splits"][split]["loss"] - mdm["splits"][BASELINE]["loss"]) - (
                    arm["splits"][split]["loss"] - arm["splits"][BASELINE]["loss"])  # fmt: skip
                reason = None
                if not (shared_rows(arm, mdm, split) and shared_rows(arm, mdm, BASELINE)):
                    reason = "the runs did not score the same rows"
                reason = reason or no_interval(arm, split, min_docs) or no_interval(mdm, split, min_docs)  # fmt: skip
                ci = None
                if reason is None:
                    docs = {s: _union_docs(arm, mdm, s) for s in (split, BASELINE)}
                    samples = degradation_samples(mdm, split, n_boot, seed, docs)
                    ci = interval(samples - degradation_samples(arm, split, n_boot, seed, docs))
                rows.append({"split": split, "difference": float(diff), "difference_ci": ci,
                             "no_interval": reason})  # fmt: skip
            out.append({"arm": arm["run"], "mdm": mdm["run"], "periods": rows})
    return out


def match_pair(results: list[dict]) -> dict:
    """The (ARM, MDM) pair with the closest validation loss among the given runs."""
    val = {r["run"]: r["splits"][BASELINE]["loss"] for r in results}
    arms = [r["run"] for r in results if r["family"] == "arm"]
    mdms = [r["run"] for r in results if r["family"] == "mdm"]
    if not arms or not mdms:
        raise EvalError("--match needs at least one ARM run and one MDM run")
    arm, mdm = min(((a, m) for a in arms for m in mdms), key=lambda p: abs(val[p[0]] - val[p[1]]))
    return {"arm": arm, "mdm": mdm, "difference": abs(val[arm] - val[mdm]), "val_loss": val}


def comparable(results: list[dict], allow_mixed: bool = False) -> None:
    """EvalError naming two runs evaluated on different corpus manifests or tokenizers."""
    first = results[0]
    for r in results[1:]:
        for key, what in (("corpus_manifest_sha256", "corpus manifests"),
                          ("tokenizer_sha256", "tokenizers")):  # fmt: skip
            if r["settings"].get(key) != first["settings"].get(key) and not allow_mixed:
                raise EvalError(
                    f"runs {first['run']} and {r['run']} were evaluated with different {what} "
                    f"({first['settings'].get(key)} vs {r['settings'].get(key)}); their losses "
                    "are not comparable. Evaluate them on one corpus (--corpus DIR) or pass "
                    "--allow-mixed"
                )


def build_report(
    results: list[dict],
    match: bool,
    max_degradation: float | None,
    inconclusive_as: str | None = None,
    allow_mixed: bool = False,
) -> dict:
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
    comparable(results, allow_mixed)
    runs = []
    for r in results:
        rows = [degradation(r, p["split"], r["settings"]) for p in periods if p["split"] in r["splits"]]  # fmt: skip
        v = r["splits"][BASELINE]
        runs.append({
            "run": r["run"], "family": r["family"], "step": r["step"], "run_dir": r["run_dir"],
            "validation": {k: v[k] for k in ("loss", "loss_ci", "ppl", "rows", "documents",
                                             "tokens", "no_interval")},
            "periods": rows,
        })  # fmt: skip
    keys = ("rows", "mc_samples", "seed", "bootstrap", "min_docs", "dtype", "corpus",
            "corpus_manifest_sha256", "tokenizer_sha256")  # fmt: skip
    per_run = {r["run"]: {k: r["settings"].get(k) for k in keys} for r in results}
    resampling = {(s["seed"], s["bootstrap"], s["min_docs"]) for s in per_run.values()}
    report = {
        "format": FORMAT,
        "settings": per_run,
        "periods": periods,
        "runs": runs,
        "pairs": paired_differences(results, periods, results[0]["settings"])
        if len(resampling) == 1
        else [],
        "match": pair,
        "gate": None,
    }
    if max_degradation is not None:
        report["gate"] = gate(runs, max_degradation, inconclusive_as)
    return report


# ----------------------------------------------------------------------------- outputs


def _ci(ci: list[float] | None, fmt: str = ".3f") -> str:
    return "(no interval)" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def settings_lines(report: dict) -> list[str]:
    """What every run's numbers rest on; one line when all runs share their settings (the MC
    samples, an MDM-only setting, are compared among the MDM runs only)."""

    def line(s: dict) -> str:
        return (f"{s['rows'] or 'all'} rows per split (seed {s['seed']}), {s['dtype']}; 95% "
                f"intervals from {s['bootstrap']} bootstrap resamples over documents (none "
                f"below {s['min_docs']} documents); corpus manifest "
                f"{str(s['corpus_manifest_sha256'])[:12]}")  # fmt: skip

    per_run = report["settings"]
    texts = {run: line(s) for run, s in per_run.items()}
    mc = {s["mc_samples"] for s in per_run.values() if s["mc_samples"]}
    if len(set(texts.values())) == 1 and len(mc) <= 1:
        extra = f", {mc.pop()} MC samples per row (MDM)" if mc else ""
        return [next(iter(texts.values())) + extra + "."]
    return ["Settings differ between runs:"] + [
        f"- `{run}`: {text}" + (f", {per_run[run]['mc_samples']} MC samples per row" if per_run[run]["mc_samples"] else "")
        for run, text in texts.items()
    ]  # fmt: skip


def markdown(report: dict, png_name: str) -> str:
    lines = ["# Temporal degradation report", "", *settings_lines(report), "",
             "Degradation = holdout loss - validation loss (nats/token, padding never scored); "
             "ppl ratio = exp(degradation). MDM losses are ELBO bounds, ARM losses exact.", ""]  # fmt: skip
    if report["match"]:
        m = report["match"]
        lines += [
            f"Matched at validation loss: ARM `{m['arm']}` ({m['val_loss'][m['arm']]:.4f}) and "
            f"MDM `{m['mdm']}` ({m['val_loss'][m['mdm']]:.4f}), |difference| = "
            f"{m['difference']:.4f} nats; candidates: "
            + ", ".join(f"`{k}` {v:.4f}" for k, v in m["val_loss"].items()),
            "",
        ]
    lines += ["| run | family | step | validation loss | rows | documents | tokens |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in report["runs"]:
        v = run["validation"]
        lines.append(f"| {run['run']} | {run['family'].upper()} | {run['step']} | "
                     f"{v['loss']:.4f} {_ci(v['loss_ci'])} | {v['rows']} | {v['documents']} | "
                     f"{v['tokens']} |")  # fmt: skip
    lines += ["", "| period | dates | run | rows | documents | tokens | loss | degradation (nats) "
              "| ppl ratio |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    dates = {p["split"]: f"{p['start']} .. {p['end']}" if p["start"] else "?" for p in report["periods"]}  # fmt: skip
    notes = []
    for p in report["periods"]:
        for run in report["runs"]:
            for row in (r for r in run["periods"] if r["split"] == p["split"]):
                lines.append(
                    f"| {p['label']} | {dates[p['split']]} | {run['run']} | {row['rows']} | "
                    f"{row['documents']} | {row['tokens']} | {row['loss']:.4f} | "
                    f"{row['degradation']:+.4f} {_ci(row['degradation_ci'], '+.4f')} | "
                    f"{row['ppl_ratio']:.3f} {_ci(row['ppl_ratio_ci'])} |"
                )
                if row["no_interval"]:
                    notes.append(
                        f"- {run['run']} / {p['label']}: no interval: {row['no_interval']}"
                    )
    lines += ["", *notes] if notes else []
    lines += pair_lines(report)
    if report["gate"] is not None:
        lines += ["", *gate_lines(report["gate"])]
    lines += ["", f"![degradation by period]({png_name})", ""]
    return "\n".join(lines)


def pair_lines(report: dict) -> list[str]:
    """The paired ARM/MDM differences of degradation, one table per pair."""
    out = []
    labels = {p["split"]: p["label"] for p in report["periods"]}
    for pair in report["pairs"]:
        out += ["", f"MDM `{pair['mdm']}` - ARM `{pair['arm']}` degradation (paired bootstrap: "
                "the same resampled documents for both runs):", "",
                "| period | difference (nats) |", "|---|---|"]  # fmt: skip
        for row in pair["periods"]:
            why = f" ({row['no_interval']})" if row["no_interval"] else ""
            out.append(f"| {labels[row['split']]} | {row['difference']:+.4f} "
                       f"{_ci(row['difference_ci'], '+.4f')}{why} |")  # fmt: skip
    return out


def _series(ax, rows: list[dict], key: str, index: dict, label: str, marker: str) -> None:
    """One line of ``key`` by period, shaded with its 95% interval where it has one."""
    xs = [index[r["split"]] for r in rows]
    line = ax.plot(xs, [r[key] for r in rows], marker=marker, label=label)[0]
    have = [(x, r[f"{key}_ci"]) for x, r in zip(xs, rows) if r[f"{key}_ci"] is not None]
    if have:
        ax.fill_between([x for x, _ in have], [c[0] for _, c in have], [c[1] for _, c in have],
                        color=line.get_color(), alpha=0.2)  # fmt: skip


def plot(report: dict, path: Path) -> Path:
    """Degradation (y) by period (x, date order), one line per run with its 95% band; a second
    panel with the paired MDM - ARM differences when there are pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p["label"] for p in report["periods"]]
    index = {p["split"]: i for i, p in enumerate(report["periods"])}
    panels = 2 if report["pairs"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for run in report["runs"]:
        label = f"{run['run']} ({run['family'].upper()})"
        _series(ax, run["periods"], "degradation", index, label, "o")
    ax.axhline(0.0, color="gray", lw=0.8)
    if report["gate"] is not None:
        ax.axhline(report["gate"]["max_degradation"], color="red", ls="--", lw=1, label="gate")
    ax.set_ylabel("holdout - validation loss (nats/token)")
    ax.set_title("Temporal degradation (95% bands, documents resampled)")
    if panels == 2:
        bx = axes[0][1]
        for pair in report["pairs"]:
            label = f"{pair['mdm']} - {pair['arm']}"
            _series(bx, pair["periods"], "difference", index, label, "s")
        bx.axhline(0.0, color="gray", lw=0.8)
        bx.set_ylabel("MDM - ARM degradation (nats/token)")
        bx.set_title("Paired difference (same resampled documents)")
    for a in axes[0]:
        a.set_xticks(range(len(labels)), labels)
        a.set_xlabel("holdout period")
        a.grid(alpha=0.3)
        a.legend()
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
                if p[f"{key}_ci"] is not None:
                    metrics[base + "_lo"], metrics[base + "_hi"] = p[f"{key}_ci"]
        run_dir = Path(run["run_dir"]) if run["run_dir"] else None
        log_to_mlflow(run_dir, metrics, run["step"] or 0, list(paths.values()))
    return paths


# ----------------------------------------------------------------------------- command


def precheck(args: argparse.Namespace) -> None:
    """Refuse what would fail after the (long) evaluation: a bad threshold, a run whose corpus
    lacks validation or holdouts, runs on different corpora or tokenizers (without
    --allow-mixed), --match without both families."""
    if args.max_degradation is not None:
        try:
            check_threshold(args.max_degradation)
        except ValueError as e:
            raise EvalError(str(e)) from None
    families, seen = set(), {}
    for path in args.runs:
        info = load_model(path, args.checkpoint, args.device, args.dtype, weights=False)
        corpus_dir, manifest = open_corpus(info, args.corpus)
        identity = (hashlib.sha256((corpus_dir / MANIFEST).read_bytes()).hexdigest(),
                    info.tokenizer_sha256)  # fmt: skip
        for other, other_identity in seen.items():
            if other_identity != identity and not args.allow_mixed:
                what = "corpus manifests" if other_identity[0] != identity[0] else "tokenizers"
                raise EvalError(
                    f"runs {other} and {path} would be evaluated with different {what}; their "
                    "losses are not comparable. Pass --corpus DIR (one corpus for all) or "
                    "--allow-mixed"
                )
        seen[path] = identity
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
        report = build_report(
            results, args.match, args.max_degradation, args.inconclusive, args.allow_mixed
        )
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
    if g is None:
        return 0
    if g["outcome"] != "pass":
        named = {o: ", ".join(f"{r['run']}/{r['period']}" for r in g["periods"] if r["outcome"] == o)
                 for o in ("fail", "inconclusive")}  # fmt: skip
        parts = "; ".join(f"{o}: {names}" for o, names in named.items() if names)
        print(f"quality-degradation gate {g['outcome'].upper()} (max {g['max_degradation']} "
              f"nats): {parts}", file=sys.stderr)  # fmt: skip
    return g["exit_code"]
