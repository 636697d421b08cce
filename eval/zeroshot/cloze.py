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
words whose last one is the target and whose earlier words are the context,
whitespace-normalised. One passage per row, from the last such window of its longest usable
piece. Rows without one are counted by reason, never silently dropped.

**Targets are words**: letters only (any script), at least ``min_target_chars`` long. Years
and other numbers are facts about a period, not its language (a model trained before 1990 cannot
know "1995"), so they never count towards the task's accuracy: from the same rows, the last
window ending in a number (digits, with ``,`` or ``.`` between groups) is kept apart as a
*number passage* (``temporal_cloze_numbers_<split>``), counted in ``cloze.json`` and scored
separately when asked (``maskscale eval cloze --numbers``). Words mixing letters and digits
("1990s", "COVID19") and words with punctuation attached are neither.

Documents: every passage comes from a different row, but rows are slices of documents (a long
speech fills many rows), so several passages may come from one document. Each passage records
the ``document`` it was cut from, recovered exactly from the packed streams
(``eval/measure/documents.py``); ``whole_documents`` counts passages whose piece is a complete
document (EOS on both sides inside the row).

Output (written to a temporary folder, then renamed: nothing half-written): per split
``temporal_cloze_<split>.jsonl`` (``{context, target, split, row, whole_document}``) and a
harness task YAML of the same name (tag ``temporal_cloze``), the same for number passages (tag
``temporal_cloze_numbers``), plus ``cloze.json`` describing the build (``format`` 2: letter-only
targets; a folder of an older format is rebuilt). The harness runs the YAMLs with
``--include-path DIR --tasks temporal_cloze``; ``maskscale eval cloze`` scores the JSONL
directly.

Intervals (``evaluate_cloze``): 95% percentile bootstrap over *documents* (each resample draws
documents with replacement and takes all their passages: accuracy = hits / passages of the
drawn documents), per period, and for the difference of each period's accuracy from the
reference period's (``validation``, else the first), the two periods resampled independently
(their documents are distinct); seeded. A period with fewer than 5 documents gets no interval
(``acc_ci_reason`` says so): a percentile over a handful of values means nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eval.zeroshot.tasks import ScoreFn, TaskError, mean_stderr

TAG = "temporal_cloze"
NUMBERS_TAG = "temporal_cloze_numbers"
INFO = "cloze.json"
FORMAT = 3
"""cloze.json format: 3 = passages carry their document id; 2 = letter-only targets plus number
passages (1 took any \\w+ word)."""
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


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


def _pieces(ids: np.ndarray, eos_id: int) -> list[tuple[np.ndarray, bool, bool, int]]:
    """(token ids, starts a document, ends a document, start position) for each EOS-separated
    piece of a row."""
    cuts = np.flatnonzero(ids == eos_id)
    out, start = [], 0
    for end in [*cuts.tolist(), len(ids)]:
        if end > start:
            out.append((ids[start:end], start > 0, end < len(ids), start))
        start = end + 1
    return out


def is_word(word: str, min_chars: int = 1) -> bool:
    """A target word: letters only, at least ``min_chars`` of them."""
    return word.isalpha() and len(word) >= min_chars


def is_number(word: str) -> bool:
    """A number target: digit groups joined by ``,`` or ``.`` (1990, 2,000, 3.5)."""
    return _NUMBER.fullmatch(word) is not None


def _best_piece(
    ids: np.ndarray, eos_id: int, tokenizer, words: int
) -> tuple[list, bool, int] | None:
    """(words, whole document?, position of its first token in the row) of a row's longest
    piece with at least ``words`` words."""
    best: tuple[list[str], bool, int] | None = None
    for piece, starts, ends, at in _pieces(ids, eos_id):
        ws = tokenizer.decode(piece.tolist(), skip_special_tokens=False).split()
        ws = ws[(0 if starts else 1) : (len(ws) if ends else len(ws) - 1)]
        if len(ws) >= words and (best is None or len(ws) > len(best[0])):
            best = (ws, starts and ends, at)
    return best


def _last_window(ws: list[str], words: int, accept) -> dict | None:
    for k in range(len(ws) - 1, words - 2, -1):
        if accept(ws[k]):
            return {"context": " ".join(ws[k - words + 1 : k]), "target": ws[k]}
    return None


def passage_from_row(
    ids: np.ndarray, eos_id: int, tokenizer, words: int, min_chars: int = 1, kind: str = "word"
) -> dict | str:
    """{context, target, whole_document} from one packed row, or the reason there is none;
    ``kind`` ``word`` (the task) or ``number`` (kept apart)."""
    best = _best_piece(ids, eos_id, tokenizer, words)
    if best is None:
        return "too_short"
    accept = (lambda w: is_word(w, min_chars)) if kind == "word" else is_number
    got = _last_window(best[0], words, accept)
    if got is None:
        return "no_target_word" if kind == "word" else "no_number"
    return {**got, "whole_document": best[1]}


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
    """Word passages of one split, number passages of the same rows (at most ``n``), the rows
    scanned and the count of rows without a word passage by reason."""
    from eval.measure.documents import DocumentIndex
    from eval.measure.rows import SplitLayout

    rows = _Rows(corpus, manifest["splits"][split]["shards"])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())])
    eos_id = int(manifest["tokenizer"]["eos_id"])
    index = DocumentIndex(SplitLayout.from_manifest(corpus, manifest, split), manifest, eos_id)
    docs, numbers, skipped, scanned = [], [], {}, 0
    for i in rng.permutation(len(rows)):
        if len(docs) == cfg.n:
            break
        scanned += 1
        row = np.asarray(rows[int(i)])
        best = _best_piece(row, eos_id, tokenizer, cfg.words)
        where = {"split": split, "row": int(i), "whole_document": bool(best and best[1])}
        if best:
            ids = index.token_ids(np.array([int(i)]), row[None, :])
            where["document"] = int(ids[0, best[2]])
        word = best and _last_window(best[0], cfg.words, lambda w: is_word(w, cfg.min_target_chars))
        number = best and _last_window(best[0], cfg.words, is_number)
        if number and len(numbers) < cfg.n:
            numbers.append({**number, **where})
        if not word:
            reason = "too_short" if best is None else "no_target_word"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        docs.append({**word, **where})
    return {"docs": docs, "numbers": numbers, "rows": len(rows), "scanned": scanned,
            "skipped": skipped, "documents": index.documents}  # fmt: skip


# ----------------------------------------------------------------------------- build


def task_yaml(name: str, data_file: Path, tag: str = TAG) -> str:
    """A harness task over one JSONL file: loglikelihood of " " + target after the context."""
    return (
        f"tag: {tag}\n"
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
    info = {"format": FORMAT, "corpus": str(corpus.resolve()), "config": asdict(cfg)}
    info["splits"] = {}
    info["tokenizer_sha256"] = manifest["tokenizer"]["sha256"]
    for split in splits:
        drawn = draw_split(corpus, manifest, split, tokenizer, cfg)
        name, numbers = f"{TAG}_{split}", f"{NUMBERS_TAG}_{split}"
        for task, tag, docs in (
            (name, TAG, drawn["docs"]),
            (numbers, NUMBERS_TAG, drawn["numbers"]),
        ):
            with (tmp / f"{task}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
            (tmp / f"{task}.yaml").write_text(task_yaml(task, out / f"{task}.jsonl", tag))
        start = period_dates(split, _ranges(manifest))[0]
        info["splits"][split] = {
            "task": name,
            "file": f"{name}.jsonl",
            "passages": len(drawn["docs"]),
            "whole_documents": sum(d["whole_document"] for d in drawn["docs"]),
            "documents": len({d["document"] for d in drawn["docs"]}),
            "split_documents": drawn["documents"],
            "number_task": numbers,
            "number_file": f"{numbers}.jsonl",
            "number_passages": len(drawn["numbers"]),
            "rows": drawn["rows"],
            "rows_scanned": drawn["scanned"],
            "skipped": drawn["skipped"],
            "period_start": start,
        }
    (tmp / INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return info


# ----------------------------------------------------------------------------- evaluate


def read_cloze(cloze_dir: str | Path, numbers: bool = False) -> tuple[dict, dict[str, list[dict]]]:
    """(cloze.json, {split: passages}) of a built task folder; ``numbers``: the number passages."""
    cloze_dir = Path(cloze_dir)
    if not (cloze_dir / INFO).is_file():
        raise TaskError(f"{cloze_dir}: no {INFO}; build the task first (maskscale eval cloze)")
    info = json.loads((cloze_dir / INFO).read_text())
    if info.get("format") != FORMAT:
        raise TaskError(
            f"{cloze_dir}: built by an older maskscale (targets were not letter-only words); "
            "rebuild it (maskscale eval cloze --rebuild)"
        )
    docs = {}
    for split, entry in info["splits"].items():
        path = cloze_dir / entry["number_file" if numbers else "file"]
        with path.open(encoding="utf-8") as f:
            docs[split] = [json.loads(line) for line in f if line.strip()]
    return info, docs


def evaluate_cloze(
    docs: dict[str, list[dict]], score: ScoreFn, n_boot: int = 1000, seed: int = 0,
    guided: bool = False,
) -> dict[str, dict]:  # fmt: skip
    """Per split: accuracy (the target is the greedy continuation) with its stderr and 95%
    bootstrap interval over documents (none, with ``acc_ci_reason``, under 5 documents), the
    difference from the reference period with its interval, the mean
    log-likelihood and perplexity of the targets (``cfg_``-prefixed when ``guided``: scores
    under classifier-free guidance are not the model's likelihood), counts and per-passage
    hits and log-likelihoods. Seeded: the same seed gives the same intervals."""
    pairs = [(d["context"], " " + d["target"]) for split in docs for d in docs[split]]
    results = score(pairs) if pairs else []
    out, pos, prefix = {}, 0, "cfg_" if guided else ""
    for split, split_docs in docs.items():
        chunk = results[pos : pos + len(split_docs)]
        pos += len(split_docs)
        hits = [float(bool(greedy)) for _, greedy in chunk]
        lls = [float(ll) for ll, _ in chunk]
        groups = _documents(split_docs)
        ci, reason = _interval((hits, groups), None, n_boot, seed, split)
        out[split] = {
            "n": len(chunk),
            "documents": len(set(groups.tolist())),
            "whole_documents": sum(bool(d.get("whole_document")) for d in split_docs),
            "acc": sum(hits) / len(hits) if hits else float("nan"),
            "acc_stderr": mean_stderr(hits),
            "acc_ci": ci,
            "acc_ci_reason": reason,
            "resampled": "documents",
            prefix + "mean_logprob": sum(lls) / len(lls) if lls else float("nan"),
            prefix + "perplexity": float(np.exp(-np.mean(lls))) if lls else float("nan"),
            "hits": hits,
            "logprobs": lls,
            "passage_documents": groups.tolist(),
        }
    ref = "validation" if "validation" in out else next(iter(out), None)
    for split, r in out.items():
        r["reference"] = ref
        same = split == ref
        r["acc_delta"] = None if same else r["acc"] - out[ref]["acc"]
        r["acc_delta_ci"], r["acc_delta_ci_reason"] = None, None
        if not same:
            mine = (r["hits"], np.asarray(r["passage_documents"]))
            theirs = (out[ref]["hits"], np.asarray(out[ref]["passage_documents"]))
            r["acc_delta_ci"], r["acc_delta_ci_reason"] = _interval(
                mine, theirs, n_boot, seed, split
            )
    return out


def _documents(passages: list[dict]) -> np.ndarray:
    """int64[passages]: each passage's document id; a passage without one (built by hand, or
    an older task file) is its own document."""
    ids = [d.get("document") for d in passages]
    fresh = iter(range(-2, -2 - len(ids), -1))  # never a real id (those are >= 0)
    return np.array([next(fresh) if i is None else int(i) for i in ids], dtype=np.int64)


def _interval(
    mine: tuple[list, np.ndarray], ref: tuple[list, np.ndarray] | None, n_boot: int, seed: int,
    split: str,
) -> tuple[list[float], str | None]:  # fmt: skip
    """(95% bootstrap interval of the accuracy (minus the reference's, resampled
    independently), reason there is none). Units: documents, each carrying all its passages
    (hits / passages of the drawn documents, ``eval/measure/resample.py``)."""
    from eval.measure.defaults import MIN_DOCS
    from eval.measure.resample import interval, ratio_samples
    from eval.measure.rows import split_seed

    def accuracy(hits_groups: tuple[list, np.ndarray], *names: str) -> np.ndarray:
        hits, groups = np.asarray(hits_groups[0], float), hits_groups[1]
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=hits)
        counts = np.bincount(inverse).astype(float)
        return ratio_samples(sums, counts, n_boot, split_seed(seed, *names))

    nan = [float("nan"), float("nan")]
    if n_boot < 1:
        return nan, "no bootstrap resamples asked for"
    for label, part in (("this period", mine), ("the reference period", ref)):
        if part is None:
            continue
        documents = len(np.unique(part[1]))
        if documents < MIN_DOCS:
            return nan, f"too few documents in {label} ({documents} < {MIN_DOCS})"
    boots = accuracy(mine, split, "cloze")
    if ref is not None:
        boots -= accuracy(ref, split, "cloze-ref")
    return interval(boots), None


def plot_cloze(
    results: dict[str, dict], png: str | Path, title: str, ppl: dict[str, float] | None = None
) -> Path:
    """Accuracy per period with its 95% interval and passage count; perplexity (of ``maskscale
    eval ppl``) on a second axis if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(results)
    x = np.arange(len(splits))
    acc = np.array([results[s]["acc"] for s in splits], dtype=float)
    ci = np.array([results[s].get("acc_ci") or [np.nan, np.nan] for s in splits], dtype=float)
    err = np.nan_to_num(np.abs(ci - acc[:, None]).T)  # [2, periods]: below, above
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(splits)), 3.6))
    ax.errorbar(x, acc, yerr=err, marker="o", capsize=3, color="tab:blue", label="cloze accuracy")
    ax.set_ylabel("last-word accuracy (95% CI)", color="tab:blue")
    ax.set_xticks(x, [f"{s}\nn={results[s]['n']}" for s in splits], rotation=20)
    top = np.nanmax(np.append(acc + err[1], 0.0))
    ax.set_ylim(0, min(1.05, max(0.05, top * 1.15)))
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
