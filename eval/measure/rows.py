"""A seeded random sample of a split's rows, read shard by shard from memory-mapped Arrow.

Why: a split's first rows come from the first documents the packer saw (often one source, one
date range), so evaluating a prefix measures a biased slice. The sample here is drawn uniformly
without replacement from *all* rows of the split (row ``i`` is the ``i``-th row in manifest
shard order, the same numbering as the trainer's evaluation reader; ``sample_rows`` is the
trainer's, so ``--rows N`` picks the rows of a run validated with eval.max_rows=N), sorted,
and then read batch by batch: only the shard that holds the next rows is memory-mapped, and
only the sampled rows are copied out, so a split of any size costs the memory of one batch.

Each row's MDM noise comes from its key ``mix_keys(row, EVAL_KEY_SEED)``, exactly as in the
trainer's validation, so a row scores the same here as in training-time validation. With its
tokens comes each row's length (ids that are text, without the EOS padding of a split's partial
rows), so padding is never scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.shards import ShardMeta, batch_pads, inferred_pads
from trainer.data import sample_rows as sample_rows  # the trainer's validation sample
from trainer.data import split_seed as split_seed


@dataclass(frozen=True)
class SplitLayout:
    """Where each row of one split lives: shard paths and their first global row."""

    split: str
    shards: tuple[Path, ...]
    starts: np.ndarray
    """int64[len(shards) + 1]: cumulative row counts (``starts[-1]`` = rows of the split)."""
    entries: tuple[str, ...] = ()
    """Each shard's path as the manifest names it."""
    manifest: dict = field(default_factory=dict, repr=False, compare=False)
    """The corpus manifest (a format-2 corpus's padding is recovered from it when needed)."""

    @classmethod
    def from_manifest(cls, corpus_dir: Path, manifest: dict, split: str) -> SplitLayout:
        entries = manifest["splits"][split].get("shards", [])
        paths = tuple(
            Path(e["path"]) if Path(e["path"]).is_absolute() else corpus_dir / e["path"]
            for e in entries
        )
        counts = [int(e["rows"]) for e in entries]
        starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return cls(split, paths, starts, tuple(e["path"] for e in entries), manifest)

    def legacy_pads(self, index: int) -> np.ndarray | None:
        """Pad counts per row of shard ``index`` recovered from the manifest (format-2
        corpora, whose shards have no ``n_pad`` column); None where it holds no padding."""
        return inferred_pads(self.manifest, self.split).get(self.entries[index])

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1


class RowReader:
    """Copies given rows out of a split, keeping only one shard memory-mapped at a time."""

    def __init__(self, layout: SplitLayout, tokenizer_sha256: str):
        self.layout, self.sha = layout, tokenizer_sha256
        self._index = -1
        self._views: list[np.ndarray] = []
        self._pads: list[np.ndarray] = []
        self._batch_starts = np.zeros(1, dtype=np.int64)
        self._source = None

    def _open(self, index: int) -> None:
        self.close()
        path = self.layout.shards[index]
        self._source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(self._source)
        meta = ShardMeta.from_arrow(reader.schema.metadata, path)
        if meta.tokenizer_sha256 != self.sha:
            raise ValueError(f"shard {path} was tokenized with {meta.tokenizer_sha256}")
        views, pads, seen, legacy = [], [], 0, False  # legacy pads: looked up when needed
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            ids = batch.column(0)
            flat = ids.flatten().to_numpy(zero_copy_only=True)
            views.append(flat.reshape(-1, ids.type.list_size))
            own = batch_pads(batch)
            if own is None:  # format 2: from the manifest, or none outside tails shards
                legacy = self.layout.legacy_pads(index) if legacy is False else legacy
                own = np.zeros(batch.num_rows, np.int64) if legacy is None else (
                    legacy[seen : seen + batch.num_rows])  # fmt: skip
            pads.append(own)
            seen += batch.num_rows
        expected = int(self.layout.starts[index + 1] - self.layout.starts[index])
        if seen != expected:
            raise ValueError(f"shard {path} does not hold the {expected} rows manifest.json says")
        self._views, self._pads, self._index = views, pads, index
        self._batch_starts = np.concatenate([[0], np.cumsum([len(v) for v in views])])

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int64[len(rows), seq_len + 1] tokens, int64[len(rows)] lengths: ids that are text)
        for sorted global row indices."""
        shard = self.layout.shard_of(rows)
        out: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for s in np.unique(shard):
            if s != self._index:
                self._open(int(s))
            local = rows[shard == s] - self.layout.starts[s]
            batch = np.searchsorted(self._batch_starts, local, side="right") - 1
            for b in np.unique(batch):
                sel = local[batch == b] - self._batch_starts[b]
                view = self._views[b]
                out.append(view[sel].astype(np.int64))
                lengths.append(view.shape[1] - self._pads[b][sel])
        return np.concatenate(out), np.concatenate(lengths)

    def close(self) -> None:
        self._views, self._pads, self._index = [], [], -1
        if self._source is not None:
            self._source.close()
            self._source = None


def iter_row_batches(
    layout: SplitLayout,
    rows: np.ndarray,
    batch_size: int,
    tokenizer_sha256: str,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row indices, tokens, lengths) of batches ``rank, rank + world, ...`` of the sorted
    sample (lengths: each row's ids that are text, see ``RowReader.gather``).

    Batches are cut from the whole sample before they are dealt to ranks, so every row is
    scored in the same batch (same forward pass) whatever the number of processes.
    """
    reader = RowReader(layout, tokenizer_sha256)
    try:
        starts = range(rank * batch_size, len(rows), world * batch_size)
        for start in starts:
            chunk = rows[start : start + batch_size]
            yield chunk, *reader.gather(chunk)
    finally:
        reader.close()


def batches_for_rank(n_rows: int, batch_size: int, rank: int, world: int) -> int:
    """How many batches ``iter_row_batches`` yields on ``rank``."""
    n_batches = -(-n_rows // batch_size)
    return len(range(rank, n_batches, world))
