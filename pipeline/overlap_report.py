"""The contamination report of ``maskscale corpus overlap`` (``overlap.json`` + ``overlap.md``)
from the find stage's matches (see :mod:`pipeline.overlap` for how they are found).

Per split other than train (holdouts, and validation as the same-period reference): documents,
those sharing at least one n-gram with train, and the fraction; words, those covered by a
shared n-gram, and the fraction (a long page quoting one sentence counts as one overlapping
document but few overlapping words, so both are reported). Per task the same over items.
The most frequent shared n-grams (by the number of documents holding them) are listed with
their normalised text, read back from one document that holds each: boilerplate shows up
there first.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from pipeline.ngrams import QUERY, Task, words
from pipeline.steps import read_rank_file

TOP = 10  # shared n-grams listed per split / task
FORMAT = "maskscale-overlap/1"


def _read_words(folder: str) -> dict[str, np.ndarray]:
    if not os.path.isdir(folder):
        return {}
    return {name.split(".")[0]: np.fromfile(os.path.join(folder, name), dtype="<u4")
            for name in sorted(os.listdir(folder)) if name.endswith(".u32")}  # fmt: skip


def _read_matches(matches: str, workers: int, group: str, names) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        parts = [
            np.fromfile(p, dtype=QUERY)
            for r in range(workers)
            if os.path.exists(p := os.path.join(matches, f"{r:04d}", group, f"{name}.sig"))
        ]
        out[name] = np.concatenate(parts) if parts else np.empty(0, dtype=QUERY)  # fmt: skip
    return out


def summarise(counts: dict[str, np.ndarray], matches: dict[str, np.ndarray], n: int) -> dict:
    """Document and word totals and overlaps over the files of one split (or one task), and
    (hash, file, doc, pos) of one occurrence of each of the most shared n-grams."""
    docs = sum(len(c) for c in counts.values())
    total_words = int(sum(int(c.sum()) for c in counts.values()))
    overlapping = covered = 0
    pair_hashes, ordered = [], {}
    for name, rec in matches.items():
        if not len(rec):
            continue
        rec = ordered[name] = rec[np.lexsort((rec["pos"], rec["doc"]))]
        doc, pos = rec["doc"].astype(np.int64), rec["pos"].astype(np.int64)
        same = doc[1:] == doc[:-1]
        n_docs = int(len(doc) - same.sum())
        overlapping += n_docs
        # words covered: each matched n-gram covers n words from its position; sorted per doc,
        # a gap shorter than n only adds the gap
        covered += n * n_docs + int(np.minimum(np.diff(pos)[same], n).sum())
        pairs = np.unique(rec[["hash", "doc"]])
        pair_hashes.append(pairs["hash"])
    top, first = [], {}
    if pair_hashes:
        hashes, n_docs = np.unique(np.concatenate(pair_hashes), return_counts=True)
        order = np.lexsort((hashes, -n_docs))[:TOP]
        top = [(int(hashes[i]), int(n_docs[i])) for i in order]
    wanted = np.array([h for h, _ in top], dtype=np.uint64)
    for name, rec in ordered.items():  # one occurrence of each (the first file's first doc)
        for h in wanted:
            if int(h) not in first and (at := np.flatnonzero(rec["hash"] == h)).size:
                first[int(h)] = (name, int(rec["doc"][at[0]]), int(rec["pos"][at[0]]))
    return {
        "documents": docs,
        "documents_overlapping": overlapping,
        "overlap_fraction": overlapping / docs if docs else 0.0,
        "documents_too_short": int(sum(int((c < n).sum()) for c in counts.values())),
        "words": total_words,
        "words_overlapping": covered,
        "word_overlap_fraction": covered / total_words if total_words else 0.0,
        "top": [(h, k, first[h]) for h, k in top],
    }


def _split_ngram_texts(data: str, split: str, top: list, n: int) -> list[dict]:
    wanted = defaultdict(dict)  # file -> {doc: [(position, rank in top)]}
    for i, (_h, _k, (name, doc, pos)) in enumerate(top):
        wanted[name].setdefault(doc, []).append((pos, i))
    texts = [""] * len(top)
    for name, docs in wanted.items():
        path = os.path.join(data, split, f"{name}.jsonl.zst")
        last = max(docs)
        for idx, doc in enumerate(read_rank_file(path)):
            for pos, i in docs.get(idx, []):
                texts[i] = " ".join(words(doc.text)[pos : pos + n])
            if idx >= last:
                break
    return [{"ngram": t, "documents": k} for t, (_h, k, _o) in zip(texts, top)]


def assemble(where: dict, tasks: list[Task], n: int, workers: int, manifest: dict) -> dict:
    splits = {}
    for split in where["splits"]:
        counts = _read_words(os.path.join(where["signatures"], "words", split))
        s = summarise(counts, _read_matches(where["matches"], workers, f"split/{split}", counts),
                      n)  # fmt: skip
        s["top_ngrams"] = _split_ngram_texts(where["data"], split, s.pop("top"), n)
        splits[split] = s
    out_tasks = {}
    for task in tasks:
        counts = {task.name: np.fromfile(os.path.join(where["tasks"], f"{task.name}.u32"),
                                         dtype="<u4")}  # fmt: skip
        s = summarise(counts, _read_matches(where["matches"], workers, "task", counts), n)
        top = [{"ngram": " ".join(words(task.items[doc])[pos : pos + n]), "documents": k}
               for _h, k, (_name, doc, pos) in s.pop("top")]  # fmt: skip
        out_tasks[task.name] = {
            "items": s["documents"],
            "items_contaminated": s["documents_overlapping"],
            "contaminated_fraction": s["overlap_fraction"],
            "items_too_short": s["documents_too_short"],
            "words": s["words"],
            "words_overlapping": s["words_overlapping"],
            "word_overlap_fraction": s["word_overlap_fraction"],
            "top_ngrams": top,
        }
    return {
        "format": FORMAT,
        "ngram": n,
        "unit": "words of lowercased text, punctuation dropped (pipeline/ngrams.py)",
        "build_key": manifest.get("build_key"),
        "train_documents": manifest.get("splits", {}).get("train", {}).get("documents"),
        "splits": splits,
        "tasks": out_tasks,
    }


def markdown(report: dict) -> str:
    n = report["ngram"]
    lines = [f"# Overlap with train ({n}-grams of words)", "",
             f"Train: {report['train_documents']:,} documents. A document overlaps when it "
             f"shares at least one {n}-gram (lowercased words, punctuation dropped) with a "
             "train document; words overlapping are those inside a shared n-gram.", ""]  # fmt: skip
    if report["splits"]:
        lines += ["| split | documents | overlapping | fraction | words | fraction |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, s in report["splits"].items():
            lines.append(f"| {name} | {s['documents']:,} | {s['documents_overlapping']:,} | "
                         f"{s['overlap_fraction']:.2%} | {s['words']:,} | "
                         f"{s['word_overlap_fraction']:.2%} |")  # fmt: skip
        lines.append("")
    if report["tasks"]:
        lines += ["| task | items | contaminated | fraction | too short to check |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, t in report["tasks"].items():
            lines.append(
                f"| {name} | {t['items']:,} | {t['items_contaminated']:,} | "
                f"{t['contaminated_fraction']:.2%} | {t['items_too_short']:,} |"
            )
        lines.append("")
    for kind, entries in (("split", report["splits"]), ("task", report["tasks"])):
        for name, s in entries.items():
            if s["top_ngrams"]:
                lines += [f"## Most shared n-grams: {kind} {name}", ""]
                lines += [f"- {g['documents']:,} × `{g['ngram']}`" for g in s["top_ngrams"]]
                lines.append("")
    return "\n".join(lines)
