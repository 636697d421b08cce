"""``maskscale corpus overlap`` throughput against the exact-dedup signature stage, same input.

    python benchmarks/overlap_bench.py [--size-mb 40] [--files 4] [--repeats 3] [--workers 2]

Input: a synthetic SlimPajama dump (``benchmarks/synth_dump.py``: Zipfian words, lognormal
lengths, planted exact/near duplicates), laid out as the split stage leaves it: every tenth
document in ``holdout_x``, the rest in ``train``, one file per task. Prints documents/s of

  A. datatrove's exact-dedup signature stage (``ExactDedupSignature``, our date priority)
     reading the same documents through the same reader (the baseline: one hash per document),
  B. the overlap signature stage (every word 13-gram of every document hashed, by slice),
  C. the overlap find stage (one task per hash slice),
  D. B + C + the report (``run_overlap``, what the command costs on a built corpus),

and B/A, D/A (medians over ``--repeats`` runs, wall-clock, ``--workers`` processes); then the
CPU time per document of each signature computation alone in one process, which a loaded
machine disturbs far less than the wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("LOGURU_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import zstandard  # noqa: E402
from synth_dump import DumpParams, ensure_dump  # noqa: E402


def split_layout(dump: Path, out: Path) -> tuple[int, int]:
    """The dump as a split stage's ``data/<split>/<rank>.jsonl.zst`` (one task per dump file),
    plus the same documents in ``all/`` for the exact-dedup baseline; (documents, tasks)."""
    files = sorted(dump.rglob("*.jsonl.zst"))
    cctx, docs = zstandard.ZstdCompressor(level=3), 0
    for rank, path in enumerate(files):
        lines = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().splitlines()
        by_split: dict[str, list[bytes]] = {"train": [], "holdout_x": []}
        for line in lines:
            rec = orjson.loads(line)
            doc = {"text": rec["text"], "id": str(docs), "metadata": {"source": "synth"}}
            by_split["holdout_x" if docs % 10 == 9 else "train"].append(orjson.dumps(doc))
            docs += 1
        for split, recs in [*by_split.items(), ("all", by_split["train"] + by_split["holdout_x"])]:
            folder = out / ("all" if split == "all" else f"data/{split}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{rank:05d}.jsonl.zst").write_bytes(cctx.compress(b"\n".join(recs) + b"\n"))
    return docs, len(files)


def timed(stages, workers: int) -> float:
    from pipeline.build import run_local

    start = time.perf_counter()
    run_local(stages, progress=False)
    return time.perf_counter() - start


def bench_exact(root: Path, tasks: int, workers: int) -> float:
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature

    from pipeline.build import Stage
    from pipeline.dedup import DatePriority, doc_text
    from pipeline.steps import RankFileReader

    out = root / "exact"
    cfg = ExactDedupConfig(content_getter=doc_text, document_priority=DatePriority({}))
    pipe = [RankFileReader(str(root / "all")), ExactDedupSignature(str(out / "data"), cfg)]
    elapsed = timed([Stage("exact-signatures", str(out), pipe, tasks, min(workers, tasks))],
                    workers)  # fmt: skip
    shutil.rmtree(out)
    return elapsed


def bench_overlap(root: Path, tasks: int, workers: int, slices: int) -> tuple[float, float, float]:
    """(signature s, find s, whole command s) on a fake built corpus in ``root``."""
    from pipeline.overlap_run import plan_overlap, run_overlap

    manifest = {"stages": {"split": "split"}, "splits": {"train": {"documents": 0}}}
    (root / "split" / "logs" / "completions").mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    stages, _ = plan_overlap(str(root), manifest, [], 13, slices, workers)
    sig_s = timed(stages[:1], workers)
    find_s = timed(stages[1:], workers)
    for st in stages:
        shutil.rmtree(st.folder)
    start = time.perf_counter()
    run_overlap(str(root), [], 13, slices, workers, progress=False)
    whole = time.perf_counter() - start
    for st in stages:
        shutil.rmtree(st.folder)
    return sig_s, find_s, whole


def cpu_per_doc(root: Path) -> tuple[float, float, int]:
    """CPU seconds of (exact-dedup signature, overlap signature) work per document, one process,
    reading excluded: stable under a loaded machine where the wall-clock rates are not."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature

    from pipeline.dedup import DatePriority, doc_text
    from pipeline.ngrams import ngram_hashes, sorted_unique, words
    from pipeline.steps import read_rank_file

    docs = [d for p in sorted((root / "all").glob("*.jsonl.zst")) for d in read_rank_file(str(p))]
    cfg = ExactDedupConfig(content_getter=doc_text, document_priority=DatePriority({}))
    exact = ExactDedupSignature(str(root / "unused"), cfg)
    start = time.process_time()
    sigs = [s for i, d in enumerate(docs) for s in exact.get_hashes(d, i)]
    exact.save_hashes(0, sigs)
    a = time.process_time() - start
    start = time.process_time()
    sorted_unique(np.concatenate([ngram_hashes(words(d.text), 13) for d in docs]))
    b = time.process_time() - start
    shutil.rmtree(root / "unused")
    return a / len(docs), b / len(docs), len(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=40)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slices", type=int, default=2, help="finder workers (hash slices)")
    args = ap.parse_args()
    dump, meta = ensure_dump(DumpParams(args.size_mb, args.files), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        split_dir = root / "split"
        docs, tasks = split_layout(dump, split_dir)
        # the split folder doubles as the corpus's split stage (manifest.stages.split)
        exact, sig, find, whole = [], [], [], []
        for _ in range(args.repeats):
            exact.append(bench_exact(split_dir, tasks, args.workers))
            s, f, w = bench_overlap(root, tasks, args.workers, args.slices)
            sig.append(s), find.append(f), whole.append(w)
        cpu_exact, cpu_overlap, _ = cpu_per_doc(split_dir)
    med = {k: statistics.median(v) for k, v in
           {"exact": exact, "sig": sig, "find": find, "whole": whole}.items()}  # fmt: skip
    print(f"input: {docs:,} documents, {meta['bytes_uncompressed'] / 1e6:.1f} MB, {tasks} tasks, "
          f"{args.workers} workers, {args.slices} slices, median of {args.repeats}")  # fmt: skip
    print(f"A exact-dedup signatures  {docs / med['exact']:>10,.0f} docs/s")
    print(
        f"B overlap signatures      {docs / med['sig']:>10,.0f} docs/s  B/A {med['exact'] / med['sig']:.2f}"
    )
    print(f"C overlap find            {docs / med['find']:>10,.0f} docs/s")
    print(
        f"D whole overlap command   {docs / med['whole']:>10,.0f} docs/s  D/A {med['exact'] / med['whole']:.2f}"
    )

    print(f"CPU per document, one process, reading excluded: exact-dedup signature "
          f"{cpu_exact * 1e6:,.0f} us, overlap signature {cpu_overlap * 1e6:,.0f} us "
          f"({cpu_overlap / cpu_exact:.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
