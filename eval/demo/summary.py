"""The demo's last word: one table of unigram / ARM / MDM loss per split, and where to look.

Why one table: the demo's point is a comparison, and a loss means something only next to the
floor of a model that knows token frequencies and nothing else (:mod:`eval.measure.unigram`). Every
number comes from the same rows of each split (the sample ``maskscale eval ppl`` scored), so
the columns compare directly; the MDM's is its ELBO, an upper bound on its loss. Cloze
accuracy per period is added when the cloze task ran.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

FAMILIES = ("arm", "mdm")


def summary_rows(
    ppl: dict[str, dict], unigram: dict[str, float], cloze: dict[str, dict] | None = None
) -> list[dict]:
    """One dict per split: rows, documents, unigram, arm, mdm (losses) and arm_cloze /
    mdm_cloze (acc)."""
    cloze = cloze or {}
    out = []
    for split, base in unigram.items():
        row = {"split": split, "unigram": base, "rows": None, "documents": None}
        for family in FAMILIES:
            result = ppl.get(family, {}).get("splits", {}).get(split)
            row[family] = result["loss"] if result else math.nan
            row["rows"] = row["rows"] or (result["rows"] if result else None)
            row["documents"] = row["documents"] or (result.get("documents") if result else None)
            acc = cloze.get(family, {}).get(split, {}).get("acc")
            row[f"{family}_cloze"] = math.nan if acc is None else float(acc)
        out.append(row)
    return out


def _cell(value: float, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:>{width}{fmt}}"


def format_summary(rows: list[dict]) -> str:
    """The table (plain text, also valid as a markdown code block) and a one-line verdict."""
    with_cloze = any(not math.isnan(r[f"{f}_cloze"]) for r in rows for f in FAMILIES)
    head = f"{'split':<16}{'rows':>6}{'docs':>6}{'unigram':>10}{'ARM':>9}{'MDM':>9}"
    head += f"{'ARM cloze':>11}{'MDM cloze':>11}" if with_cloze else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['split']:<16}{r['rows'] or '-':>6}{r['documents'] or '-':>6}"
        line += _cell(r["unigram"], ".3f", 10)
        line += _cell(r["arm"], ".3f", 9) + _cell(r["mdm"], ".3f", 9)
        if with_cloze:
            line += _cell(r["arm_cloze"], ".3f", 11) + _cell(r["mdm_cloze"], ".3f", 11)
        lines.append(line)
    lines.append("loss in nats/token on the same rows (MDM: ELBO upper bound), padding not scored; "
                 "cloze: accuracy")  # fmt: skip
    lines.append("docs: documents those rows touch; intervals (bootstrap over documents) are in "
                 "each run's eval/ppl.json and the temporal report")  # fmt: skip
    lines.append(verdict(rows))
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """How many splits each family beats the unigram baseline on."""
    parts = []
    for family in FAMILIES:
        beats = sum(1 for r in rows if r[family] < r["unigram"])
        parts.append(f"{family.upper()} below the unigram on {beats}/{len(rows)} splits")
    text = "; ".join(parts)
    mdm_beats = all(r["mdm"] < r["unigram"] for r in rows)
    if rows and not mdm_beats:
        text += (
            " - an MDM at or above the unigram has learned token frequencies and little else: "
            "give it more compute (train.flops in configs/demo.yaml)"
        )
    return text


def mlflow_command(db: Path) -> str:
    """The command that opens the demo's MLflow store in a browser."""
    exe = shutil.which("mlflow")
    if exe is None:
        local = Path(sys.executable).with_name("mlflow")
        exe = str(local) if local.exists() else "mlflow"
    else:
        exe = "mlflow"
    return f"{exe} ui --backend-store-uri sqlite:///{db.resolve()}"


def where_things_are(
    work: Path, runs: dict[str, str], temporal: Path | None, experiment: str
) -> list[str]:
    lines = [f"Open the results: {mlflow_command(work / 'mlflow.db')}",
             f"  then http://127.0.0.1:5000 (experiment {experiment}: both runs, their"
             " metrics, loss curves, eval/ reports and samples)"]  # fmt: skip
    for family, run in runs.items():
        lines.append(f"  {family.upper()} run: {run} (loss_curve.png, export/, eval/)")
    if temporal is not None:
        lines.append(f"  temporal report: {temporal / 'temporal.md'} ({temporal / 'temporal.png'})")
    lines.append(f"  this summary: {work / 'summary.md'} (+ summary.json)")
    return lines
