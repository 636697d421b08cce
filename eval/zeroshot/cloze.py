"""The temporal cloze task: LAMBADA-style last-word prediction on a corpus's own time periods.

Why: perplexity on the temporal holdouts says how much worse a model models later text; a
zero-shot task says whether that costs *answers*. Public benchmarks are undated, so the task is
built from the corpus itself: passages drawn from ``validation`` (the training period) and from
every holdout period, each ending in a word the model must produce (accuracy = the target is
what greedy decoding gives: ``is_greedy``, greedy unmasking for an MDM) and score (its
log-likelihood). Accuracy per period, plotted next to perplexity, is the temporal degradation of
a task rather than of a loss.

Building: packed rows hold token ids, so passages are decoded text. For each split, rows are
drawn in a seeded random order over *all* of its shards (never a prefix); a row is cut at its EOS
tokens into document pieces; a piece that starts (or ends) at the row boundary may begin (or
end) inside a word, so its first (last) word is dropped. A passage is ``words`` consecutive
words whose last one is a plain word (letters/digits only, at least ``min_target_chars`` long)
- the target - and whose earlier words are the context, whitespace-normalised. One passage per row, from the last such window of
its longest usable piece. Rows without one are counted by reason, never silently dropped.

Output (written to a temporary folder, then renamed: nothing half-written): per split
``temporal_cloze_<split>.jsonl`` (``{context, target, split, row}``) and a harness task YAML of
the same name (tag ``temporal_cloze``), plus ``cloze.json`` describing the build. The harness
runs the YAMLs with ``--include-path DIR --tasks temporal_cloze``; ``maskscale eval cloze``
scores the JSONL directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eval.zeroshot.tasks import ScoreFn, TaskError, mean_stderr

TAG = "temporal_cloze"
INFO = "cloze.json"
_WORD = re.compile(r"\w+")


@dataclass
class ClozeConfig:
    """How passages are drawn from a corpus."""

    n: int = 200
    """Passages per split (fewer if a split runs out of usable rows; the report says so)."""
    words: int = 40
    """Words per passage, the target included (LAMBADA passages average about 75)."""
    min_target_chars: int = 4
    """Shortest target word; 4 skips most function words ("the", "of", "and"), which would make
    the task a test of grammar rather than of content."""
    seed: int = 0
    """Seed of the row order (the same seed and corpus give the same passages)."""
    splits: list[str] | None = None
    """Splits to draw from; None = ``validation`` and every holdout, in period order."""

    def validate(self) -> None:
        if self.n < 1:
            raise TaskError(f"n: passages per split must be >= 1, got {self.n}")
        if self.min_target_chars < 1:
            raise TaskError(f"min_target_chars: must be >= 1, got {self.min_target_chars}")
        if self.words < 2:
            raise TaskError(
                f"words: a passage needs >= 2 words (context + target), got {self.words}"
            )


# ----------------------------------------------------------------------------- periods


def _ranges(manifest: dict) -> dict[str, list[str]]:
    return ((manifest.get("config") or {}).get("split") or {}).get("holdout_ranges") or {}


def period_order(manifest: dict) -> list[str]:
    """``validation`` first, then the other non-train splits in date order (eval.measure.temporal's
    order: named holdout ranges, years or decades in the names; undated last)."""
    from eval.measure.temporal import order_periods

    others = [s for s in manifest["splits"] if s not in ("train", "validation")]
    dated = [p["split"] for p in order_periods(others, _ranges(manifest))]
    return (["validation"] if "validation" in manifest["splits"] else []) + dated


# ----------------------------------------------------------------------------- passages


def _pieces(ids: np.ndarray, eos_id: int) -> list[tuple[np.ndarray, bool, bool]]:
    """(token ids, starts a document, ends a document) for each EOS-separated piece of a row."""
    cuts = np.flatnonzero(ids == eos_id)
    out, start = [], 0
    for end in [*cuts.tolist(), len(ids)]:
        if end > start:
            out.append((ids[start:end], start > 0, end < len(ids)))
        start = end + 1
    return out


def passage_from_row(
    ids: np.ndarray, eos_id: int, tokenizer, words: int, min_chars: int = 1
) -> dict | str:
    """{context, target} from one packed row, or the reason there is none."""
    best: tuple[int, list[str]] | None = None
    for piece, starts, ends in _pieces(ids, eos_id):
        ws = tokenizer.decode(piece.tolist(), skip_special_tokens=False).split()
        ws = ws[(0 if starts else 1) : (len(ws) if ends else len(ws) - 1)]
        if len(ws) >= words and (best is None or len(ws) > best[0]):
            best = (len(ws), ws)
    if best is None:
        return "too_short"
    ws = best[1]
    for k in range(len(ws) - 1, words - 2, -1):
        if len(ws[k]) >= min_chars and _WORD.fullmatch(ws[k]):
            return {"context": " ".join(ws[k - words + 1 : k]), "target": ws[k]}
    return "no_target_word"


class _Rows:
    """Random access to the rows of one split across all its shards."""

    def __init__(self, corpus: Path, shards: list[dict]):
        self.corpus, self.shards = corpus, shards
        self.bounds = np.cumsum([0] + [int(s["rows"]) for s in shards])
        self._open: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        from pipeline.shards import open_shard, shard_tokens

        k = int(np.searchsorted(self.bounds, i, side="right") - 1)
        if k not in self._open:
            self._open[k] = shard_tokens(open_shard(self.corpus / self.shards[k]["path"])[0])
        return self._open[k][i - self.bounds[k]]


def draw_split(corpus: Path, manifest: dict, split: str, tokenizer, cfg: ClozeConfig) -> dict:
    """Passages of one split and the count of rows skipped by reason."""
    rows = _Rows(corpus, manifest["splits"][split]["shards"])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())])
    eos_id = int(manifest["tokenizer"]["eos_id"])
    docs, skipped = [], {}
    for i in rng.permutation(len(rows)):
        row = np.asarray(rows[int(i)])
        got = passage_from_row(row, eos_id, tokenizer, cfg.words, cfg.min_target_chars)
        if isinstance(got, str):
            skipped[got] = skipped.get(got, 0) + 1
            continue
        docs.append({**got, "split": split, "row": int(i)})
        if len(docs) == cfg.n:
            break
    return {"docs": docs, "rows": len(rows), "skipped": skipped}


# ----------------------------------------------------------------------------- build


def task_yaml(name: str, data_file: Path) -> str:
    """A harness task over one JSONL file: loglikelihood of " " + target after the context."""
    return (
        f"tag: {TAG}\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file.resolve()))}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_target: \"{{' ' + target}}\"\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n"
    )


def build_cloze(corpus_dir: str | Path, out_dir: str | Path, cfg: ClozeConfig) -> dict:
    """Draw passages for every split and write JSONL + task YAMLs + cloze.json to ``out_dir``."""
    from tokenizers import Tokenizer

    from eval.measure.temporal import period_dates
    from pipeline.shards import read_manifest

    cfg.validate()
    corpus, out = Path(corpus_dir), Path(out_dir)
    try:
        manifest = read_manifest(corpus)
    except FileNotFoundError as e:
        raise TaskError(str(e)) from None
    order = period_order(manifest)
    splits = cfg.splits or order
    unknown = [s for s in splits if s not in manifest["splits"]]
    if unknown:
        raise TaskError(
            f"{corpus}: no split(s) {unknown}; the corpus has {sorted(manifest['splits'])}"
        )
    tokenizer = Tokenizer.from_file(str(corpus / manifest["tokenizer"]["path"]))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = {"corpus": str(corpus.resolve()), "config": asdict(cfg), "splits": {}}
    info["tokenizer_sha256"] = manifest["tokenizer"]["sha256"]
    for split in splits:
        drawn = draw_split(corpus, manifest, split, tokenizer, cfg)
        name = f"{TAG}_{split}"
        with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for doc in drawn["docs"]:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        (tmp / f"{name}.yaml").write_text(task_yaml(name, out / f"{name}.jsonl"))
        start = period_dates(split, _ranges(manifest))[0]
        info["splits"][split] = {
            "task": name,
            "file": f"{name}.jsonl",
            "passages": len(drawn["docs"]),
            "rows": drawn["rows"],
            "skipped": drawn["skipped"],
            "period_start": start,
        }
    (tmp / INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return info


# ----------------------------------------------------------------------------- evaluate


def read_cloze(cloze_dir: str | Path) -> tuple[dict, dict[str, list[dict]]]:
    """(cloze.json, {split: passages}) of a built task folder."""
    cloze_dir = Path(cloze_dir)
    if not (cloze_dir / INFO).is_file():
        raise TaskError(f"{cloze_dir}: no {INFO}; build the task first (maskscale eval cloze)")
    info = json.loads((cloze_dir / INFO).read_text())
    docs = {}
    for split, entry in info["splits"].items():
        path = cloze_dir / entry["file"]
        with path.open(encoding="utf-8") as f:
            docs[split] = [json.loads(line) for line in f if line.strip()]
    return info, docs


def evaluate_cloze(docs: dict[str, list[dict]], score: ScoreFn) -> dict[str, dict]:
    """Per split: accuracy (target is the greedy continuation), its stderr, target perplexity."""
    pairs = [(d["context"], " " + d["target"]) for split in docs for d in docs[split]]
    results = score(pairs) if pairs else []
    out, pos = {}, 0
    for split, split_docs in docs.items():
        chunk = results[pos : pos + len(split_docs)]
        pos += len(split_docs)
        hits = [float(bool(greedy)) for _, greedy in chunk]
        lls = [float(ll) for ll, _ in chunk]
        out[split] = {
            "n": len(chunk),
            "acc": sum(hits) / len(hits) if hits else float("nan"),
            "acc_stderr": mean_stderr(hits),
            "mean_logprob": sum(lls) / len(lls) if lls else float("nan"),
            "perplexity": float(np.exp(-np.mean(lls))) if lls else float("nan"),
        }
    return out


def plot_cloze(
    results: dict[str, dict], png: str | Path, title: str, ppl: dict[str, float] | None = None
) -> Path:
    """Accuracy per period (error bars = 1 stderr); perplexity on a second axis if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(results)
    x = np.arange(len(splits))
    acc = [results[s]["acc"] for s in splits]
    err = [
        0.0 if math.isnan(results[s]["acc_stderr"]) else results[s]["acc_stderr"] for s in splits
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(splits)), 3.6))
    ax.errorbar(x, acc, yerr=err, marker="o", capsize=3, color="tab:blue", label="cloze accuracy")
    ax.set_ylabel("last-word accuracy", color="tab:blue")
    ax.set_xticks(x, splits, rotation=20)
    ax.set_ylim(0, min(1.05, max(0.05, max(a + e for a, e in zip(acc, err)) * 1.15)))
    if ppl:
        twin = ax.twinx()
        ys = [ppl.get(s, float("nan")) for s in splits]
        twin.plot(x, ys, marker="s", linestyle="--", color="tab:red", label="perplexity")
        twin.set_ylabel("perplexity", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    from eval.measure.outputs import save_figure_atomic

    try:
        return save_figure_atomic(fig, Path(png))
    finally:
        plt.close(fig)
