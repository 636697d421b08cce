"""The unigram baseline of a sweep: the loss every run of a scaling study must clearly beat.

Why: an MDM that has only learned token frequencies still shows a falling loss curve and a
tidy IsoFLOP profile (issue 10); its points sit on the unigram plateau. So ``maskscale sweep
fit`` puts the unigram loss of the runs' training split next to every run's validation loss,
counts the points below it per family and draws it into the IsoFLOP figure.

The comparison must be on the *same rows* the runs were scored on: each run records its
validation sample in ``run_dir/eval_rows.json`` (trainer/validation.py). Runs on one corpus
with the same ``eval.max_rows`` share that sample, so the baseline is computed once; runs whose
rows differ get one baseline each. A run without the record is compared with the unigram on
every row of the split, and the report says so. For an MDM the validation loss is an
estimate of an expectation whose value for a context-free model is this same cross-entropy,
so one baseline serves both families (eval/measure/unigram.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml

from eval.measure.unigram import split_loss, token_counts, unigram_log_probs
from pipeline.shards import read_manifest

EVAL_ROWS = "eval_rows.json"  # trainer/validation.py's record (not imported: keeps torch out)
ALPHA = 1.0
"""Add-alpha smoothing of the training split's counts (eval/measure/unigram.py's default)."""


def train_splits(value) -> list[str]:
    """data.split of a config (str, list, or MLflow's string of a list) as a list of names."""
    if isinstance(value, str) and value.startswith("["):
        value = yaml.safe_load(value)
    if value is None:
        return ["train"]
    return [value] if isinstance(value, str) else [str(v) for v in value]


def read_eval_rows(point: dict, split: str) -> tuple[np.ndarray | None, str]:
    """(row indices or None = every row, how they were found) of ``split`` for one run."""
    record = None
    path = Path(point["run_dir"]) / EVAL_ROWS if point.get("run_dir") else None
    if path is not None and path.is_file():
        record = json.loads(path.read_text())
    elif point.get("run_id") and point.get("tracking_uri"):
        record = _mlflow_eval_rows(point["tracking_uri"], point["run_id"])
    if record is None:
        return None, f"every row: no {EVAL_ROWS}"
    entry = record.get("splits", {}).get(split)
    if entry is None:
        return None, f"every row: {EVAL_ROWS} has no {split!r}"
    if "row_index" in entry:
        return np.asarray(entry["row_index"], dtype=np.int64), f"sample from {EVAL_ROWS}"
    return None, f"every row, per {EVAL_ROWS}"


def _mlflow_eval_rows(uri: str, run_id: str) -> dict | None:
    """The run's eval_rows.json artifact, when its run directory is not on this machine."""
    import tempfile

    from mlflow.tracking import MlflowClient

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = MlflowClient(tracking_uri=uri).download_artifacts(run_id, EVAL_ROWS, tmp)
            return json.loads(Path(local).read_text())
    except Exception:  # no such artifact (or store unreachable): fall back to every row
        return None


def rows_digest(rows: np.ndarray) -> str:
    """sha256 of the sorted int64 rows, as trainer.data.EvalSample.describe() writes it."""
    return hashlib.sha256(np.sort(rows).astype("<i8").tobytes()).hexdigest()


class _Baselines:
    """Unigram log-probabilities per (corpus, training splits), counted once each."""

    def __init__(self, alpha: float):
        self.alpha, self._cache = alpha, {}

    def loss(self, corpus: str, trains: list[str], split: str, rows: np.ndarray | None) -> float:
        key = (corpus, tuple(trains))
        if key not in self._cache:
            counts = sum(token_counts(corpus, s) for s in trains)
            self._cache[key] = unigram_log_probs(counts, self.alpha)
        return split_loss(self._cache[key], corpus, split, rows)


def _group_runs(points: list[dict], split: str, notes: list[str]) -> dict[tuple, dict]:
    """Runs grouped by (corpus, training splits, scored rows); runs without a usable corpus
    become notes (one per reason, naming the runs)."""
    groups: dict[tuple, dict] = {}
    problems: dict[str, list[str]] = {}
    for p in points:
        corpus = p.get("corpus")
        if not corpus:
            problems.setdefault("no corpus in the config or MLflow params", []).append(p["name"])
            continue
        if not (Path(corpus) / "manifest.json").is_file():
            why = f"corpus {corpus} not found on disk (no manifest.json)"
            problems.setdefault(why, []).append(p["name"])
            continue
        rows, how = read_eval_rows(p, split)
        if rows is None:
            split_rows = read_manifest(corpus)["splits"].get(split, {}).get("rows", 0)
            rows_key = ("all", int(split_rows))
        else:
            rows_key = ("sample", rows_digest(rows))
        trains = train_splits(p.get("train_split"))
        key = (corpus, tuple(trains), rows_key)
        group = groups.setdefault(key, {"corpus": corpus, "train_split": trains, "rows": rows,
                                        "rows_source": how, "runs": []})  # fmt: skip
        group["runs"].append(p["name"])
    for why, names in problems.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        notes.append(f"no unigram baseline: {why}; {len(names)} run(s): {shown}")
    return groups


def _family_summary(points: list[dict]) -> dict[str, dict]:
    """Per family: points with a baseline, how many sit below it, the smallest margin."""
    out = {}
    for fam in ("arm", "mdm"):
        pts = [p for p in points if p["family"] == fam and p.get("below_unigram") is not None]
        if not pts:
            continue
        low = min(pts, key=lambda p: p["below_unigram"])
        out[fam] = {"points": len(pts), "below": sum(p["below_unigram"] > 0 for p in pts),
                    "min_margin": low["below_unigram"], "min_margin_run": low["name"],
                    "at_or_above": [p["name"] for p in pts if p["below_unigram"] <= 0]}  # fmt: skip
    return out


def sweep_unigram(points: list[dict], split: str, alpha: float = ALPHA) -> dict:
    """Attach ``unigram`` and ``below_unigram`` (unigram - loss, nats) to every point with a
    loss; return the baseline record for fit.json (``value`` when all runs share one)."""
    scored = [p for p in points if p.get("loss") is not None]
    notes: list[str] = []
    groups = _group_runs(scored, split, notes)
    baselines, by_name, out_groups = _Baselines(alpha), {p["name"]: p for p in scored}, []
    for g in groups.values():
        try:
            loss = baselines.loss(g["corpus"], g["train_split"], split, g["rows"])
        except (KeyError, ValueError, OSError) as e:
            notes.append(f"{g['corpus']}: no unigram baseline on {split}: {e}")
            continue
        n_rows = len(g["rows"]) if g["rows"] is not None else _split_rows(g["corpus"], split)
        for name in g["runs"]:
            by_name[name]["unigram"] = loss
            by_name[name]["below_unigram"] = loss - by_name[name]["loss"]
        out_groups.append({"corpus": g["corpus"], "train_split": g["train_split"],
                           "rows": n_rows, "rows_source": g["rows_source"], "loss": loss,
                           "runs": g["runs"]})  # fmt: skip
    if not scored:
        notes.append("no finished run with a loss: nothing to compare with the unigram")
    values = {round(g["loss"], 12) for g in out_groups}
    missing = [p["name"] for p in scored if p.get("unigram") is None]
    return {
        "split": split,
        "alpha": alpha,
        "value": out_groups[0]["loss"] if len(values) == 1 and not missing else None,
        "groups": out_groups,
        "families": _family_summary(scored),
        "without_baseline": missing,
        "notes": notes,
    }


def _split_rows(corpus: str, split: str) -> int:
    return int(read_manifest(corpus)["splits"][split]["rows"])


def skipped(split: str, why: str) -> dict:
    """The record when no baseline is computed (``--no-unigram``)."""
    return {"split": split, "alpha": ALPHA, "value": None, "groups": [], "families": {},
            "without_baseline": [], "notes": [why], "skipped": True}  # fmt: skip


def report_lines(unigram: dict) -> list[str]:
    """Markdown lines under the Runs table: the baseline(s) and who sits below it."""
    lines = []
    for g in unigram["groups"]:
        runs = "all runs" if unigram["value"] is not None else ", ".join(g["runs"])
        lines.append(f"- Unigram baseline of {'+'.join(g['train_split'])} on {unigram['split']}: "
                     f"**{g['loss']:.4f}** nats over {g['rows']} rows ({g['rows_source']}; "
                     f"{runs}; corpus {g['corpus']})")  # fmt: skip
    for fam, s in unigram["families"].items():
        line = (f"- {fam.upper()}: {s['below']} of {s['points']} points below the unigram; "
                f"smallest margin {s['min_margin']:+.4f} nats ({s['min_margin_run']})")  # fmt: skip
        if s["at_or_above"]:
            line += f"; at or above it: {', '.join(s['at_or_above'])}"
        lines.append(line)
    if unigram["without_baseline"]:
        lines.append(f"- No unigram baseline for: {', '.join(unigram['without_baseline'])}")
    lines += [f"- Note: {n}" for n in unigram["notes"]]
    return lines


def mlflow_metrics(unigram: dict) -> dict[str, float]:
    """What the sweep-fit MLflow run records of the baseline."""
    out = {} if unigram["value"] is None else {"unigram_loss": unigram["value"]}
    for fam, s in unigram["families"].items():
        out[f"{fam}_points_below_unigram"] = float(s["below"])
        out[f"{fam}_min_margin_below_unigram"] = s["min_margin"]
    return out
