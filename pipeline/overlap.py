"""``maskscale corpus overlap``: how much of each holdout split, and of each evaluation task,
shares a word n-gram with train (see :mod:`pipeline.ngrams` for what an n-gram is).

Dedup removes copies and near-copies, but a holdout page can still quote a train page, carry
the same boilerplate, or be a near-copy MinHash missed; a benchmark item can sit verbatim in
a crawled page. Either makes a "held-out" loss or a zero-shot score partly a memory test, so
the report says per split the fraction of documents (and of words) covered by an n-gram that
also occurs in train, and per task the fraction of items.

**What is read.** The split stage's documents (``.work/*-split-*/data/<split>/*.jsonl.zst``):
exactly the deduplicated, split text that was tokenized, without decoding packed rows (and
``pipeline/`` may not import ``eval/``'s document index). ``--clean-work`` deletes them; the
command then says so and how to get them back.

**Bounded at SlimPajama scale**, the exact-dedup way (datatrove's signature + finder stages,
the hash range cut into ``finder_workers`` slices):

1. ``overlap-signatures`` (one task per split-stage task, in parallel): every document's n-gram
   hashes. Train hashes are made unique per buffer of :data:`CHUNK` hashes and appended to
   one file per hash slice (8 bytes per n-gram, the same order of size as the corpus's
   tokens); every other split's n-grams are stored as (hash, document, word position).
2. ``overlap-find`` (one task per slice): holds the *query* hashes of its slice (holdouts and
   tasks: the small side) as one sorted array and streams the slice's train files through a
   binary search, one file at a time, so its memory is the query slice plus one train file,
   never the train n-grams. The matched query records are written out.
3. The report (this process) reads the matches, each split's word counts and, for the most
   frequent shared n-grams, the text of one document that holds each.

Both stages are datatrove executors with folders keyed like the build's stages (signatures:
the split stage's folder, the n-gram size, the hash scheme, the slices; find: that + the
tasks' content), so a rerun with another task list reuses the train signatures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from pipeline.ngrams import (
    QUERY,
    hash_range,
    ngram_hashes,
    sorted_unique,
    words,
)
from pipeline.overlap_report import markdown
from pipeline.steps import INTERMEDIATE, read_rank_file

CHUNK = 1 << 24  # hashes buffered per train file before one unique + write (128 MiB)


class OverlapError(RuntimeError):
    """The corpus cannot be checked as it is; the message says what to do."""


def _slice_paths(base: str, workers: int, name: str) -> list[str]:
    return [os.path.join(base, f"{r:04d}", name) for r in range(workers)]


def _append_by_slice(paths: list[str], data: np.ndarray, keys: np.ndarray) -> None:
    if keys.size > 1 and (keys[1:] < keys[:-1]).any():  # sorted hashes are in slice order
        order = np.argsort(keys.astype(np.uint16 if len(paths) < 2**16 else np.int64),
                           kind="stable")  # radix sort of small ints  # fmt: skip
        data, keys = data[order], keys[order]
    cuts = np.searchsorted(keys, np.arange(len(paths) + 1))
    for r, path in enumerate(paths):
        if cuts[r + 1] > cuts[r]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "ab") as f:
                f.write(data[cuts[r] : cuts[r + 1]].tobytes())


def write_queries(texts, n: int, workers: int, base: str, name: str) -> np.ndarray:
    """Hash ``texts`` as query documents into ``base/<slice>/<name>.sig``; returns their word
    counts (what the report divides by)."""
    paths = _slice_paths(base, workers, f"{name}.sig")
    for path in paths:
        if os.path.exists(path):
            os.remove(path)  # a rerun of a task rewrites its files whole
    counts, buf, size = [], [], 0
    for doc, text in enumerate(texts):
        ws = words(text)
        counts.append(len(ws))
        h = ngram_hashes(ws, n)
        if h.size:
            rec = np.empty(h.size, dtype=QUERY)
            rec["hash"], rec["doc"], rec["pos"] = h, doc, np.arange(h.size)
            buf.append(rec)
            size += h.size
        if size >= CHUNK:
            rec = np.concatenate(buf)
            _append_by_slice(paths, rec, hash_range(rec["hash"], workers))
            buf, size = [], 0
    if buf:
        rec = np.concatenate(buf)
        _append_by_slice(paths, rec, hash_range(rec["hash"], workers))
    return np.asarray(counts, dtype="<u4")


class OverlapSignatures(PipelineStep):
    """Stage 1: the n-gram hashes of one split-stage task's documents, by hash slice."""

    type = "🫂 - DEDUPS"
    name = "🔎 overlap signatures"

    def __init__(self, split_data: str, out: str, splits: list[str], n: int, workers: int):
        super().__init__()
        self.split_data, self.out, self.splits = split_data, out, splits
        self.n, self.workers = n, workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time():
            for split in self.splits:
                docs = read_rank_file(os.path.join(self.split_data, split,
                                                   INTERMEDIATE.format(rank=rank)))  # fmt: skip
                if split == "train":
                    self.stat_update("train_docs", value=self._train(docs, rank))
                    continue
                texts = (d.text for d in docs)
                counts = write_queries(
                    texts,
                    self.n,
                    self.workers,
                    os.path.join(self.out, "query", split),
                    f"{rank:05d}",
                )
                path = os.path.join(self.out, "words", split, f"{rank:05d}.u32")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                counts.tofile(path)
                self.stat_update("query_docs", value=len(counts))
        return iter(())

    def _train(self, docs, rank: int) -> int:
        paths = _slice_paths(os.path.join(self.out, "train"), self.workers, f"{rank:05d}.u64")
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
        buf, size, total = [], 0, 0
        for doc in docs:
            total += 1
            h = ngram_hashes(words(doc.text), self.n)
            buf.append(h)
            size += h.size
            if size >= CHUNK:
                self._flush(paths, buf)
                buf, size = [], 0
        self._flush(paths, buf)
        return total

    def _flush(self, paths: list[str], buf: list[np.ndarray]) -> None:
        if buf:
            h = sorted_unique(np.concatenate(buf))
            _append_by_slice(paths, h, hash_range(h, self.workers))


class OverlapFind(PipelineStep):
    """Stage 2 (one task per hash slice): the query records whose hash occurs in train."""

    type = "🫂 - DEDUPS"
    name = "🔎 overlap find"

    def __init__(self, signatures: str, tasks_folder: str, out: str):
        super().__init__()
        self.signatures, self.tasks_folder, self.out = signatures, tasks_folder, out

    def query_files(self, rank: int) -> dict[str, str]:
        """{"<group>/<file>": path} of this slice: split query files, then task files."""
        out = {}
        base = os.path.join(self.signatures, "query")
        for split in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            folder = os.path.join(base, split, f"{rank:04d}")
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                out[f"split/{split}/{name}"] = os.path.join(folder, name)
        folder = os.path.join(self.tasks_folder, f"{rank:04d}")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            out[f"task/{name}"] = os.path.join(folder, name)
        return out

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time():
            files = self.query_files(rank)
            parts = [sorted_unique(np.fromfile(p, dtype=QUERY)["hash"]) for p in files.values()]
            queries = sorted_unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
            present = np.zeros(len(queries), dtype=bool)
            folder = os.path.join(self.signatures, "train", f"{rank:04d}")
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) and parts else []:
                train = np.fromfile(os.path.join(folder, name), dtype="<u8")
                idx = np.minimum(np.searchsorted(queries, train), len(queries) - 1)
                present[idx[queries[idx] == train]] = True
                self.stat_update("train_hashes", value=len(train))
            for key, path in files.items():
                rec = np.fromfile(path, dtype=QUERY)
                hit = present[np.searchsorted(queries, rec["hash"])]
                dst = os.path.join(self.out, f"{rank:04d}", key)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                rec[hit].tofile(dst)
                self.stat_update("matches", value=int(hit.sum()))
        return iter(())


def write_report(report: dict, out_dir: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "overlap.json", out / "overlap.md"
    for path, text in zip(paths, (json.dumps(report, indent=2) + "\n", markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def overlap_metrics(report: dict) -> dict[str, float]:
    """The fractions as flat MLflow metric names."""
    out = {}
    for split, s in report["splits"].items():
        out[f"overlap/{split}/overlap_fraction"] = s["overlap_fraction"]
        out[f"overlap/{split}/word_overlap_fraction"] = s["word_overlap_fraction"]
    for task, t in report["tasks"].items():
        out[f"overlap/task/{task}/contaminated_fraction"] = t["contaminated_fraction"]
    return out


def log_overlap_mlflow(report: dict, run: str, uri: str | None, artifacts: list[Path]):
    """Log the fractions (and the report files, under ``overlap/``) to an MLflow run; returns
    its id, or None with a warning when MLflow cannot be reached (the files are on disk)."""
    import warnings

    run_dir = Path(run)
    if run_dir.is_dir() and not (run_dir / "mlflow_run_id").is_file():
        warnings.warn(f"--run {run}: the run directory has no mlflow_run_id (it was trained "
                      "without MLflow); nothing logged", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    run_id = (run_dir / "mlflow_run_id").read_text().strip() if run_dir.is_dir() else run
    if uri is None and (run_dir / "mlflow_tracking_uri").is_file():
        uri = (run_dir / "mlflow_tracking_uri").read_text().strip()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for key, value in overlap_metrics(report).items():
            client.log_metric(run_id, key, float(value))
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="overlap")
    except Exception as e:  # the report is on disk already; MLflow is a copy
        warnings.warn(f"could not log to MLflow run {run_id} at {uri} ({type(e).__name__}: "
                      f"{str(e)[:300]})", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    return run_id
