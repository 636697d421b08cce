"""Exact and near (MinHash) dedup that keeps the earliest-dated copy of every duplicate.

In a temporal study a page re-crawled after the cutoff is not a new document: if dedup kept
the later copy, text the model trained on would reappear in a holdout (and the train copy
would vanish). So of every group of duplicates we keep the copy with the earliest date, where
an undated document counts as dated at its source's bound (``source_dates``: the latest date
it can have) and a document with neither comes last.

- Exact dedup is datatrove's, with ``document_priority`` derived from the date. Priorities
  are 16-bit (1..65535, highest kept), so the scale is by day from 1950-01-01 to 2126 and by
  year from 1000 to 1949; dates further out share the end values. Copies of equal priority
  (same day, same year before 1950, both past an end, or both undated without a bound) are
  ordered as datatrove sorts signatures, by (hash, -priority, index), where the index counts
  documents *within each task's own stream*: the copy with the lowest such index is kept,
  whichever task it is in (document 0 of task 2 beats document 3 of task 0), so it is not
  the first copy in the order of the input files. Copies at the same index in different tasks
  stay tied, and the one kept is whichever the finder's heap merge of the signature files
  pops first: fixed for the same inputs, ``records.task_bytes`` and
  ``dedup.exact_finder_workers``, but not the first task (of two tasks holding such copies,
  task 1's is kept). ``tests/pipeline/test_dedup.py`` pins these cases.
- MinHash: the signature stage (datatrove's signatures, computed faster) also writes each
  document's day (``days/``), and our cluster stage (``pipeline/cluster.py``, in arrays)
  keeps, of each cluster, the member with the earliest day (ties: the lowest (task, index in
  that task's stream), i.e. the first in the order of the tasks), independent of how the
  buckets stage was parallelised.

Both filters run inline in the later stages that read the documents (MinHash signatures and
the split), each through the same deterministic raw reader, which therefore see exactly the
same stream, so the document indices the filters use stay valid and no copy of the corpus
(raw or deduplicated) is ever written before the split.
"""

from __future__ import annotations

import datetime as dt
import struct

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupFilter,
)

from pipeline.cluster import EarliestMinhashCluster, cluster_memory
from pipeline.codekey import stage_versions
from pipeline.configlib import to_dict
from pipeline.minhash import FastMinhashSignature
from pipeline.temporal import doc_day, parse_bounds

PRIORITY_SCHEME = "earliest-date/v1"  # in the stage keys: a new scheme rebuilds dedup
DAY_EPOCH = dt.date(1950, 1, 1)
UNDATED_DAY = np.iinfo(np.int32).max


def doc_text(doc: Document) -> str:
    """Content hashed by exact dedup (module level so worker processes can unpickle it)."""
    return doc.text


def date_priority(day: dt.date | None) -> int:
    """Exact-dedup priority in [1, 65535]: the earlier the date, the higher; no date: 1."""
    if day is None:
        return 1
    if day < DAY_EPOCH:
        return 65535 - (max(day.year, 1000) - 1000)  # years 1000..1949 -> 65535..64586
    return max(2, 64585 - (day.toordinal() - DAY_EPOCH.toordinal()))


class DatePriority:
    """``document_priority`` of datatrove's exact dedup (a picklable callable)."""

    def __init__(self, source_dates: dict[str, str]):
        self.bounds = parse_bounds(source_dates)

    def __call__(self, doc: Document) -> int:
        return date_priority(doc_day(doc, self.bounds))


class DatedMinhashSignature(FastMinhashSignature):
    """MinHash stage 1 that also saves each document's day as ``days/{rank:05d}.days``.

    The signatures are datatrove's, computed by :class:`pipeline.minhash.FastMinhashSignature`.

    Index i of the int32 array is the i-th document of the task's stream (the index the
    signatures carry); ``UNDATED_DAY`` marks a document with neither date nor source bound.
    """

    name = "🎯 MinHash stage 1 (dated)"

    def __init__(self, output_folder, config: MinhashConfig, source_dates: dict[str, str]):
        super().__init__(output_folder, config)
        self.source_dates = dict(source_dates)

    def run(self, data, rank: int = 0, world_size: int = 1):
        bounds = parse_bounds(self.source_dates)
        days: list[int] = []

        def recorded(docs):
            for doc in docs:
                day = doc_day(doc, bounds)
                days.append(day.toordinal() if day else UNDATED_DAY)
                yield doc

        super().run(recorded(data), rank, world_size)
        with self.output_folder.open(f"days/{rank:05d}.days", "wb") as f:
            f.write(np.asarray(days, dtype="<i4").tobytes())


class BalancedMinhashBuckets(MinhashDedupBuckets):
    """Buckets stage whose workers split a bucket's hash range by its largest signature file.

    datatrove takes the boundaries from the first file, which fails when that one is empty
    (a task whose input was all bad) or smaller than the number of workers per bucket.
    """

    def get_worker_hash_range(self, sig_files, rank, world_size):
        per_bucket = world_size // self.config.num_buckets
        if per_bucket == 1 or not sig_files:
            return super().get_worker_hash_range(sig_files, rank, world_size)
        largest = max(sig_files, key=self.input_folder.size)
        fmt = f"{self.config.hashes_per_bucket}{self.config.hash_config.struct_format}I"
        if self.input_folder.size(largest) // struct.calcsize(fmt) < per_bucket:
            lo, hi = super().get_worker_hash_range([], rank, world_size)  # the whole range
            return (lo, hi) if rank % per_bucket == 0 else (hi, hi)
        return super().get_worker_hash_range([largest], rank, world_size)


def plan_dedup(p, reader, key: str, tasks: int):
    """Plan the dedup stages over the documents ``reader()`` yields (a new reader step per
    stage; the stream is keyed ``key``).

    Returns (a factory of the inline filter steps, the key of the deduplicated stream). The
    key covers what decides which documents survive, not how the work is parallelised.
    """
    d, filters = p.cfg.dedup, []
    if d.exact:
        exact, key = _plan_exact(p, reader, key, tasks)
        filters.append(exact)
    if d.near:
        upstream = list(filters)
        near, key = _plan_minhash(p, reader, key, tasks, lambda: [f() for f in upstream])
        filters.append(near)
    return (lambda: [f() for f in filters]), key


def _plan_exact(p, reader, key: str, tasks: int):
    cfg = p.cfg
    workers = cfg.dedup.exact_finder_workers
    priority = DatePriority(cfg.source_dates)
    xcfg = ExactDedupConfig(content_getter=doc_text, document_priority=priority)
    # finder_workers shards the signature/duplicate files; it can also change which of two
    # equally dated identical copies is kept, so it is part of the result's key too
    settings = {"priority": PRIORITY_SCHEME, "source_dates": cfg.source_dates,
                "finder_workers": workers}  # fmt: skip
    sigs = p.add("exact-signatures", key, settings, tasks, lambda s: [
        reader(), ExactDedupSignature(s.data(), xcfg, finder_workers=workers),
    ])  # fmt: skip
    find = p.add("exact-find", sigs.key, {}, workers, lambda s: [
        ExactFindDedups(sigs.data(), s.data(), xcfg),
    ])  # fmt: skip
    return (lambda: ExactDedupFilter(find.data(), xcfg)), find.key


def _plan_minhash(p, reader, key: str, tasks: int, upstream_filters):
    cfg, d = p.cfg, p.cfg.dedup
    mcfg = MinhashConfig(
        n_grams=d.n_grams, num_buckets=d.num_buckets, hashes_per_bucket=d.hashes_per_bucket,
        seed=d.seed,
    )  # fmt: skip
    parallelism = ("exact_finder_workers", "workers_per_bucket")  # never change the clusters
    settings = {k: v for k, v in to_dict(d).items() if k not in parallelism}
    settings.update(priority=PRIORITY_SCHEME, source_dates=cfg.source_dates)
    sigs = p.add("minhash-signatures", key, settings, tasks, lambda s: [
        reader(), *upstream_filters(),
        DatedMinhashSignature(s.data(), mcfg, cfg.source_dates),
    ])  # fmt: skip
    per_bucket = d.workers_per_bucket
    buckets = p.add("minhash-buckets", sigs.key, {"workers_per_bucket": per_bucket},
                    d.num_buckets * per_bucket, lambda s: [
        BalancedMinhashBuckets(sigs.data(), s.data(), config=mcfg),
    ])  # fmt: skip
    # clusters depend on the signatures only (not on how the buckets stage was split), and on
    # the buckets' code, which this key does not chain to
    cluster_settings = {"cluster": "earliest", "buckets": stage_versions("minhash-buckets")}
    cluster = p.add("minhash-cluster", sigs.key, cluster_settings, 1, lambda s: [
        EarliestMinhashCluster(buckets.data(), sigs.data(), s.data()),
    ])  # fmt: skip
    # Slurm memory of the one clustering task, from the pair count at submit time
    input_bytes = sum(unit.weight for task in reader().tasks for unit in task)
    cluster.memory = lambda: cluster_memory(buckets.data(), sigs.data(), input_bytes,
                                            d.num_buckets, d.num_buckets * per_bucket)  # fmt: skip
    # stage 4 (the filter) runs inside the split stage on exactly the stream stage 1 read
    return (lambda: MinhashDedupFilter(cluster.data())), cluster.key
