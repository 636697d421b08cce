"""Deterministic, resumable, memory-mapped training data from a packed corpus.

Why it looks like this: a scaling study compares many runs, so a run's data order must be a
pure function of (corpus, seed, mixture weights) -- independent of the number of GPUs, of
gradient accumulation, and of restarts. Everything below therefore derives from one integer,
the *global stream position* ``p = 0, 1, 2, ...``; the loader's whole state is that integer.

Position -> row (details and weight-key rules in :mod:`trainer.mixture`)
  * Natural order (``weights=None``): all ``n`` selected rows form one group, visited by a
    fresh keyed pseudo-random permutation (a Feistel network, O(1) memory) per epoch.
  * Mixture (``weights={key: w}``): each weighted *component* -- a source of the split, or a
    ``(split, source)`` pair when several splits are selected -- is its own group. Positions
    are cut into blocks of ``BLOCK``; a deterministic schedule gives component ``s`` exactly
    ``floor(p * w_s)`` draws (to one) at every block boundary and shuffles them within the
    block, and a component is exhausted before any of its rows repeats.
  * Several splits (``split=[a, b, ...]``): their rows are concatenated in sorted split order
    and treated like one split; every shard of every selected split must agree on tokenizer,
    vocab size and seq_len. A single split (``"train"`` or ``["train"]``) gives exactly the
    stream it always did.

Position -> rank (the agreed formula): the global batch of step ``s`` covers positions
``[s*G, (s+1)*G)``; micro-step ``a`` on rank ``r`` reads ``s*G + a*micro*world + r*micro +
[0, micro)``. Hence the union over ranks of one step is the same set of rows for any world size.
Each row also gets a key, a bijective 63-bit mix of ``(seed, position)``, which seeds that
row's objective randomness (MDM masks) so it does not depend on the rank it lands on.

Reading: each shard is ``pa.memory_map``-ed and every record batch becomes a zero-copy
``(rows, seq_len + 1)`` numpy view; a micro-batch gathers only its rows (one fancy-index per
record batch touched) and widens them to int64. With the tokens comes each row's *length*, its
ids that are text: ``seq_len + 1`` minus the EOS padding of a split's partial rows
(``pipeline/shards.py``), so the objectives never score padding.

Evaluation (:class:`EvalSample`): a seeded uniform sample of a split's rows over all its
shards -- the same rows for every run on the corpus -- read batch by batch, batches dealt to
ranks round-robin.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.shards import (
    TOKENIZER,
    ShardMeta,
    batch_pads,
    file_sha256,
    inferred_pads,
    read_manifest,
)
from trainer.mixture import BLOCK as BLOCK  # re-exported: callers import it from here
from trainer.mixture import _Group, _Stream, component_name, resolve_weights
from trainer.mixture import _Permutation as _Permutation

EVAL_KEY_SEED = 0
"""Seed mixed into the keys of evaluation rows (keys depend only on the row's file order)."""
EVAL_SAMPLE_SEED = 0
"""Seed of the evaluation row sample (:func:`sample_rows`); equal to ``maskscale eval ppl``'s
default ``--seed``, so ``eval ppl --rows N`` scores the rows of a run with eval.max_rows=N."""

_M63 = np.uint64((1 << 63) - 1)
_STATE_VERSION = 1


class CorpusMismatchError(ValueError):
    """The corpus on disk disagrees with the model/run (tokenizer, vocab size or seq_len)."""


# ----------------------------------------------------------------------------- checks


def _resolve(corpus_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else corpus_dir / p


def _read_shard_meta(path: Path) -> ShardMeta:
    if not path.is_file():
        raise CorpusMismatchError(
            f"shard {path} is listed in the manifest but missing: the corpus is incomplete; "
            "rebuild it with `maskscale corpus build`"
        )
    with pa.memory_map(str(path), "r") as source:
        schema = pa.ipc.open_file(source).schema
    return ShardMeta.from_arrow(schema.metadata, path)


def _check_shard(path: Path, meta: ShardMeta, expected: dict, split: str) -> None:
    """Compare a shard's schema metadata with the manifest's promises."""
    have = {
        "tokenizer sha256": meta.tokenizer_sha256,
        "vocab_size": meta.vocab_size,
        "seq_len": meta.seq_len,
        "mask_id": meta.mask_id,
    }
    if meta.split:
        have["split"] = meta.split
    for field, value in have.items():
        want = split if field == "split" else expected[field]
        if want is not None and value != want:
            raise CorpusMismatchError(
                f"shard {path} has {field} {value} but manifest.json says {want}: the corpus "
                "mixes files from different builds or was modified; rebuild it"
            )


def check_corpus(
    corpus_dir: str | Path, vocab_size: int, seq_len: int, tokenizer_sha256: str | None = None
) -> dict:
    """Refuse a corpus whose tokenizer, vocab size or seq_len disagree with the run.

    Checks the manifest against the arguments, ``tokenizer.json`` against its recorded sha256,
    and every shard's schema metadata against the manifest. Returns the manifest.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    tok = manifest.get("tokenizer", {})
    c_vocab, c_seq, c_sha = tok.get("vocab_size"), manifest.get("seq_len"), tok.get("sha256")
    if c_vocab != vocab_size:
        raise CorpusMismatchError(
            f"corpus {corpus_dir} was built with vocab_size {c_vocab} but the model config says "
            f"{vocab_size}: rebuild the corpus with a matching tokenizer or set "
            f"model.vocab_size={c_vocab}"
        )
    if c_seq != seq_len:
        raise CorpusMismatchError(
            f"corpus {corpus_dir} was packed with seq_len {c_seq} but the model config says "
            f"{seq_len}: rebuild the corpus with seq_len={seq_len} or set model.seq_len={c_seq}"
        )
    if tokenizer_sha256 is not None and c_sha != tokenizer_sha256:
        raise CorpusMismatchError(
            f"corpus {corpus_dir} was tokenized with tokenizer sha256 {c_sha} but this run "
            f"expects {tokenizer_sha256}: use the corpus built with that tokenizer (or start a "
            "new run for this corpus)"
        )
    tok_path = _resolve(corpus_dir, tok.get("path", TOKENIZER))
    if c_sha and tok_path.is_file() and file_sha256(tok_path) != c_sha:
        raise CorpusMismatchError(
            f"{tok_path} has tokenizer sha256 {file_sha256(tok_path)} but manifest.json records "
            f"{c_sha}: the tokenizer was replaced after the corpus was built; rebuild the corpus"
        )
    expected = {
        "tokenizer sha256": c_sha,
        "vocab_size": c_vocab,
        "seq_len": c_seq,
        "mask_id": tok.get("mask_id", c_vocab),
    }
    for split, info in manifest.get("splits", {}).items():
        for shard in info.get("shards", []):
            path = _resolve(corpus_dir, shard["path"])
            _check_shard(path, _read_shard_meta(path), expected, split)
    return manifest


# ----------------------------------------------------------------------------- reading


class _SplitReader:
    """Zero-copy views of every record batch of one or more splits, by global row index.

    Several splits are concatenated in the order given (the loader sorts them); all their
    shards must agree with the first one on tokenizer, vocab size and seq_len.
    """

    def __init__(self, corpus_dir: str | Path, split: str | list[str] | tuple[str, ...]):
        corpus_dir = Path(corpus_dir)
        manifest = read_manifest(corpus_dir)
        splits = manifest.get("splits", {})
        names = [split] if isinstance(split, str) else list(split)
        self.views: list[np.ndarray] = []
        self.pads: list[np.ndarray] = []  # int64 pad ids per row, one array per record batch
        self._manifest = manifest
        self._inferred: dict[str, dict[str, np.ndarray]] = {}  # split -> format-2 pads
        self._batches: list[pa.RecordBatch] = []
        self._batch_split: list[str] = []
        self.meta: ShardMeta | None = None
        self._first: str = ""  # split of the first shard (for mismatch messages)
        for name in names:
            if name not in splits:
                raise ValueError(
                    f"corpus {corpus_dir} has no split {name!r}; available: {sorted(splits)}"
                )
            before = len(self.views)
            for shard in splits[name].get("shards", []):
                self._open(_resolve(corpus_dir, shard["path"]), shard, name)
            if len(self.views) == before:
                raise ValueError(f"split {name!r} of corpus {corpus_dir} has no rows")
        counts = np.array([len(v) for v in self.views], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.rows = int(self.starts[-1])
        self.width = self.views[0].shape[1]

    def _open(self, path: Path, shard: dict, split: str) -> None:
        manifest_rows = shard.get("rows")
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        meta = ShardMeta.from_arrow(reader.schema.metadata, path)
        if self.meta is None:
            self.meta, self._first = meta, split
        elif (meta.tokenizer_sha256, meta.vocab_size, meta.seq_len) != (
            self.meta.tokenizer_sha256,
            self.meta.vocab_size,
            self.meta.seq_len,
        ):
            where = "the split's" if split == self._first else f"split {self._first!r}'s"
            raise CorpusMismatchError(
                f"shard {path} of split {split!r} ({meta}) disagrees with {where} first shard "
                f"({self.meta}) on tokenizer, vocab_size or seq_len: the corpus mixes builds, "
                "so these rows cannot be read (or mixed) together; rebuild it"
            )
        rows = 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if batch.num_rows == 0:
                continue
            ids = batch.column(0)
            width = ids.type.list_size
            flat = ids.flatten().to_numpy(zero_copy_only=True)
            self.views.append(flat.reshape(-1, width))
            pads = batch_pads(batch)
            if pads is None:  # a format-2 shard: pads from the manifest's tail segments
                inferred = self._legacy_pads(split).get(shard["path"])
                pads = np.zeros(batch.num_rows, np.int64) if inferred is None else (
                    inferred[rows : rows + batch.num_rows])  # fmt: skip
            self.pads.append(pads)
            self._batches.append(batch)
            self._batch_split.append(split)
            rows += batch.num_rows
        if manifest_rows is not None and rows != manifest_rows:
            raise CorpusMismatchError(
                f"shard {path} has {rows} rows but manifest.json says {manifest_rows}: the "
                "shard was truncated or replaced; rebuild the corpus"
            )

    def _legacy_pads(self, split: str) -> dict[str, np.ndarray]:
        """Pad counts a format-2 corpus's manifest implies (computed once per split)."""
        if split not in self._inferred:
            self._inferred[split] = inferred_pads(self._manifest, split)
        return self._inferred[split]

    def source_runs(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        """{(split, source): [(first global row, length), ...]} -- contiguous runs."""
        runs: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for b, batch in enumerate(self._batches):
            enc = batch.column(1).dictionary_encode()
            names = enc.dictionary.to_pylist()
            idx = enc.indices.to_numpy()
            cuts = np.concatenate([[0], np.flatnonzero(np.diff(idx)) + 1, [len(idx)]])
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                start = int(self.starts[b] + lo)
                key = (self._batch_split[b], names[idx[lo]])
                runs.setdefault(key, []).append((start, int(hi - lo)))
        return runs

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices -> (int64 tokens (len(rows), seq_len + 1), int64 lengths: each
        row's ids that are text, i.e. without trailing EOS padding); copies only those rows."""
        out = np.empty((len(rows), self.width), dtype=np.int64)
        lengths = np.empty(len(rows), dtype=np.int64)
        batch = np.searchsorted(self.starts, rows, side="right") - 1
        offset = rows - self.starts[batch]
        for b in np.unique(batch):
            sel = np.flatnonzero(batch == b)
            out[sel] = self.views[b][offset[sel]]
            lengths[sel] = self.width - self.pads[b][offset[sel]]
        return out, lengths


# ----------------------------------------------------------------------------- stream


def mix_keys(positions: np.ndarray, seed: int) -> np.ndarray:
    """Bijective 63-bit mix of stream positions (distinct positions -> distinct int64 keys)."""
    offset = np.uint64((seed * 0x9E3779B97F4A7C15) & ((1 << 63) - 1))
    x = (np.asarray(positions, dtype=np.uint64) + offset) & _M63
    for mult in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB):
        x = (x * np.uint64(mult)) & _M63  # odd multiplier: a bijection modulo 2**63
        x ^= x >> np.uint64(31)
    return x.astype(np.int64)


# ----------------------------------------------------------------------------- loaders


class CorpusLoader:
    """Micro-batches of one rank, drawn from the deterministic global stream of one or more
    splits (``split="train"`` or ``split=["train", "holdout_2020s"]``).

    ``weights`` keys: ``source`` (that source in every selected split), ``split/source`` or
    ``split/*``; the most specific key wins (see :mod:`trainer.mixture`). ``None`` reads every
    row of the selection in natural proportions.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        split: str | list[str] | tuple[str, ...] = "train",
        *,
        micro_batch: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 3407,
        weights: dict[str, float] | None = None,
    ):
        if micro_batch < 1 or global_batch < 1 or world_size < 1:
            raise ValueError("micro_batch, global_batch and world_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if global_batch % (micro_batch * world_size):
            raise ValueError(
                f"global_batch {global_batch} must be a multiple of micro_batch x world_size = "
                f"{micro_batch} x {world_size}: change batch.micro_batch or batch.global_batch"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        splits = _canonical_splits(split)
        self.split: str | list[str] = splits[0] if len(splits) == 1 else list(splits)
        self.seed = seed
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.rank, self.world_size = rank, world_size
        self.accum = global_batch // (micro_batch * world_size)
        self._reader = _SplitReader(corpus_dir, splits)
        self.meta: ShardMeta = self._reader.meta
        self.seq_len = self.meta.seq_len
        if weights is None:
            self.weights = None
            groups = [_Group(0, [(0, self._reader.rows)], seed)]
            self._stream = _Stream(groups, [1.0], seed)
        else:
            runs = self._reader.source_runs()
            multi = len(splits) > 1
            self.weights = resolve_weights(weights, sorted(runs), list(splits))
            by_name = {component_name(sp, src, multi): r for (sp, src), r in runs.items()}
            groups = [_Group(i, by_name[c], seed) for i, c in enumerate(self.weights)]
            self._stream = _Stream(groups, list(self.weights.values()), seed)
        self._step_start = 0  # first position of the current optimizer step
        self._micro_step = 0  # micro-steps of the current step already consumed

    @property
    def rows(self) -> int:
        """Rows the stream draws from (all selected rows, or those of the weighted components)."""
        return sum(g.rows for g in self._stream.groups)

    @property
    def position(self) -> int:
        """Next global stream position the ranks will consume (all ranks agree)."""
        return self._step_start + self._micro_step * self.micro_batch * self.world_size

    @property
    def step(self) -> int:
        """Optimizer steps fully consumed (position // global_batch for a fixed batch size)."""
        return self._step_start // self.global_batch

    @property
    def epoch(self) -> int:
        return self._stream.epoch(self.position)

    def rows_for(self, positions: np.ndarray) -> np.ndarray:
        """Global stream positions -> global row indices (for tests and audits).

        Rows index the selected splits concatenated in sorted order (``loader.split``)."""
        return self._stream.rows(np.asarray(positions, dtype=np.int64))

    def micro_positions(self) -> np.ndarray:
        """Stream positions of this rank's next micro-batch."""
        start = self.position + self.rank * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens int64 [micro, seq_len+1], keys int64 [micro], lengths int64 [micro]: ids of
        each row that are text, not padding) and advance by one micro-step."""
        positions = self.micro_positions()
        tokens, lengths = self._reader.gather(self._stream.rows(positions))
        keys = torch.from_numpy(mix_keys(positions, self.seed))
        self._micro_step += 1
        if self._micro_step == self.accum:
            self._step_start += self.global_batch
            self._micro_step = 0
        return torch.from_numpy(tokens), keys, torch.from_numpy(lengths)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_micro_batch()

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "rows": self.rows,
            "weights": self.weights,
            "position": self.position,
            "step_start": self._step_start,
            "micro_step": self._micro_step,
            "micro_x_world": self.micro_batch * self.world_size,
            "global_batch": self.global_batch,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` stopped (world size may differ at step boundaries)."""
        for key in ("seed", "split", "rows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r} but this loader has "
                    f"{getattr(self, key)!r}: the sample stream would differ, so the run cannot "
                    "resume exactly; restore the original setting or start a new run"
                )
        if not _same_weights(state["weights"], self.weights):
            raise ValueError(
                f"data state was saved with mixture weights {state['weights']} but this loader "
                f"has {self.weights}: restore the weights or start a new run"
            )
        if state["micro_step"] and (
            state["micro_x_world"] != self.micro_batch * self.world_size
            or state["global_batch"] != self.global_batch
        ):
            raise ValueError(
                "data state was saved in the middle of a gradient-accumulation cycle with "
                f"micro_batch*world_size={state['micro_x_world']} and global_batch="
                f"{state['global_batch']}; resume with the same geometry or from a checkpoint "
                "taken at a step boundary"
            )
        self._step_start = int(state["step_start"])
        self._micro_step = int(state["micro_step"])


def _canonical_splits(split: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The selected splits, sorted (the stream depends on the set, not on the order given)."""
    names = [split] if isinstance(split, str) else list(split)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"split must be a split name or a non-empty list of them, got {split!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"split lists {repeated} more than once: {split!r}")
    return tuple(sorted(names))


def _same_weights(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return set(a) == set(b) and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


# ----------------------------------------------------------------------------- evaluation


def split_seed(seed: int, *names: str) -> list[int]:
    """A numpy seed sequence for ``seed`` and names (stable across processes and runs)."""
    return [int(seed), *(zlib.crc32(n.encode()) for n in names)]


def sample_rows(total: int, n: int | None, seed: int, split: str) -> np.ndarray:
    """Sorted int64 row indices: ``n`` drawn without replacement (all rows if n is None/>=).

    A pure function of (total, n, seed, split name): the trainer's validation and
    ``maskscale eval ppl`` call it with the same arguments and get the same rows.
    """
    if n is None or n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(split_seed(seed, split, "rows"))
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


class EvalSample:
    """The fixed evaluation rows of one split, cut into batches that are dealt to ranks.

    Rows: ``sample_rows(rows of the split, max_rows, seed, split)``, a uniform sample over
    every shard of the split, sorted (row ``i`` is the ``i``-th row in manifest shard order).
    It depends on the corpus, ``max_rows`` and ``seed`` only -- not on the world size, the batch
    size or the run's seed -- so every run on a corpus is validated on the same rows.

    Batches: batch ``b`` is ``rows[b * batch_size : (b + 1) * batch_size]`` and belongs to rank
    ``b % world_size``; a batch is read (only its rows are copied) when it is asked for.
    Each row's key is ``mix_keys(row, EVAL_KEY_SEED)``, so MDM masks are fixed per row.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        split: str,
        max_rows: int | None = None,
        seed: int = EVAL_SAMPLE_SEED,
    ):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.split, self.seed, self.max_rows = split, seed, max_rows
        self._reader = _SplitReader(corpus_dir, split)
        self.rows = sample_rows(self._reader.rows, max_rows, seed, split)

    @property
    def split_rows(self) -> int:
        """Rows of the whole split."""
        return self._reader.rows

    def n_batches(self, batch_size: int) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return -(-len(self.rows) // batch_size)

    def rank_batches(self, batch_size: int, rank: int, world_size: int) -> range:
        """Indices of the batches rank ``rank`` evaluates: ``rank, rank + world_size, ...``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        return range(rank, self.n_batches(batch_size), world_size)

    def batch_rows(self, index: int, batch_size: int) -> np.ndarray:
        return self.rows[index * batch_size : (index + 1) * batch_size]

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens int64 [b, seq_len + 1], keys int64 [b], lengths int64 [b]) of batch
        ``index``; lengths count each row's ids that are text, not padding."""
        rows = self.batch_rows(index, batch_size)
        tokens, lengths = self._reader.gather(rows)
        keys = torch.from_numpy(mix_keys(rows, EVAL_KEY_SEED))
        return torch.from_numpy(tokens), keys, torch.from_numpy(lengths)

    def describe(self) -> dict:
        """What identifies the sample (for run records): sizes, seed and a digest of the rows."""
        digest = hashlib.sha256(self.rows.astype("<i8").tobytes()).hexdigest()
        return {
            "split_rows": self.split_rows,
            "rows": len(self.rows),
            "max_rows": self.max_rows,
            "seed": self.seed,
            "rows_sha256": digest,
        }


def iter_eval_batches(
    corpus_dir: str | Path,
    split: str,
    batch_size: int,
    max_rows: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = EVAL_SAMPLE_SEED,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens, keys, lengths) of this rank's batches of the split's :class:`EvalSample`.

    ``max_rows=None`` reads every row in file order; otherwise a seeded uniform sample of
    ``max_rows`` rows across all shards. The last batch of the sample may be smaller.
    """
    sample = EvalSample(corpus_dir, split, max_rows, seed)
    for index in sample.rank_batches(batch_size, rank, world_size):
        yield sample.batch(index, batch_size)
