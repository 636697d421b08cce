"""Fixture corpora for trainer tests: real Arrow shards, a real tokenizer.json, a real manifest.

Building one takes milliseconds, so every test can have its own corpus with exactly the shape
it needs (vocab, seq_len, splits, sources, shard and record-batch sizes) instead of mocking the
reader. Use the ``corpus_factory`` fixture (``corpus_factory(vocab_size=..., ...)`` writes a
fresh corpus under ``tmp_path``) or ``tiny_corpus`` for the defaults.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from pipeline.shards import (
    MANIFEST,
    TOKENIZER,
    ShardMeta,
    ShardWriter,
    file_sha256,
    token_dtype,
)

EOS = "<|endoftext|>"


def write_tokenizer(
    path: Path, vocab_size: int, words: Sequence[str] | None = None
) -> tuple[str, int]:
    """A word-level tokenizer with exactly ``vocab_size`` tokens (id 0 = EOS, 1 = <unk>);
    ids 2.. are ``w2 w3 ...`` or, given, ``words`` (then vocab_size = len(words) + 2).

    Returns (sha256 of the file, eos id).
    """
    if vocab_size < 3:
        raise ValueError("vocab_size must be >= 3")
    if words is not None and len(set(words)) != vocab_size - 2:
        raise ValueError(f"{len(set(words))} distinct words for vocab_size {vocab_size}")
    vocab = {EOS: 0, "<unk>": 1}
    names = words if words is not None else [f"w{i}" for i in range(2, vocab_size)]
    vocab.update({w: i for i, w in enumerate(names, start=2)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(path))
    return file_sha256(path), 0


def _rows(rng: np.random.Generator, n: int, width: int, vocab_size: int, kind: str) -> np.ndarray:
    if kind == "random":
        return rng.integers(0, vocab_size, size=(n, width))
    if kind == "ramp":  # learnable: x_i = (start + i * stride) mod vocab, stride in {1, 2, 3}
        start = rng.integers(0, vocab_size, size=(n, 1))
        stride = rng.integers(1, 4, size=(n, 1))
        return (start + stride * np.arange(width)) % vocab_size
    raise ValueError(f"kind must be 'random' or 'ramp', got {kind!r}")


def _source_counts(n_rows: int, sources: Mapping[str, float] | Sequence[str]) -> dict[str, int]:
    """Split ``n_rows`` over sources (fractions, or evenly); the first source takes the rest."""
    if not isinstance(sources, Mapping):
        sources = {s: 1.0 for s in sources}
    total = sum(sources.values())
    counts = {s: int(n_rows * w / total) for s, w in sources.items()}
    first = next(iter(counts))
    counts[first] += n_rows - sum(counts.values())
    return counts


def make_corpus(
    root: str | Path,
    *,
    vocab_size: int = 64,
    seq_len: int = 16,
    splits: Mapping[str, int] | None = None,
    sources: Mapping[str, float] | Sequence[str] = ("web",),
    seed: int = 0,
    rows_per_shard: int = 40,
    batch_rows: int = 16,
    kind: str = "random",
    words: Sequence[str] | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """Write a complete corpus directory at ``root`` and return it.

    splits: {split: rows}; default {"train": 256, "validation": 32}.
    sources: names (rows split evenly) or {name: fraction of each split's rows}. Sources are
        written one after another, so shards and record batches hold runs of one source.
    rows_per_shard / batch_rows: shard and Arrow record-batch sizes (small ones exercise the
        reader's boundaries).
    kind: "random" token ids, or "ramp" rows a tiny model can learn (loss goes down fast).
    words: the tokenizer's words for ids 2.. (default w2 w3 ...; see ``write_tokenizer``).
    tokenizer: a tokenizer.json to use instead (e.g. a trained BPE; its EOS is ``EOS``);
        vocab_size is then its size.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": 256, "validation": 32} if splits is None else dict(splits)
    if tokenizer is None:
        tok_sha, eos_id = write_tokenizer(root / TOKENIZER, vocab_size, words)
    else:
        shutil.copyfile(tokenizer, root / TOKENIZER)
        tok = Tokenizer.from_file(str(tokenizer))
        tok_sha, eos_id = file_sha256(root / TOKENIZER), tok.token_to_id(EOS)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(seed)
    manifest_splits: dict[str, dict] = {}
    source_totals: dict[str, dict[str, int]] = {}
    for split, n_rows in splits.items():
        meta = ShardMeta(tok_sha, vocab_size, eos_id, vocab_size, seq_len, split)
        counts = _source_counts(n_rows, sources)
        chunks = [
            (src, _rows(rng, n, seq_len + 1, vocab_size, kind)) for src, n in counts.items() if n
        ]
        manifest_splits[split] = {
            "documents": n_rows,
            "tokens": n_rows * (seq_len + 1),
            "rows": n_rows,
            "tail_tokens": 0,
            "shards": _write_split(root, split, meta, chunks, rows_per_shard, batch_rows),
        }
        for s, n in counts.items():
            tot = source_totals.setdefault(s, {"documents": 0, "tokens": 0})
            tot["documents"] += n
            tot["tokens"] += n * (seq_len + 1)
    n_docs = sum(splits.values())
    manifest = {  # the layout pipeline/manifest.py writes, with fixture-sized counts
        "format": "maskscale-corpus/1",
        "documents": {"read": n_docs, "kept": n_docs},
        "dropped": {},
        "duplicates": {"exact": 0, "near": 0},
        "splits": manifest_splits,
        "sources": dict(sorted(source_totals.items())),
        "tokenizer": {
            "path": TOKENIZER,
            "sha256": tok_sha,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "mask_id": vocab_size,
            "trained": False,
        },
        "seq_len": seq_len,
        "dtype": str(token_dtype(vocab_size)),
        "stages": {},
        "config": {"fixture": {"kind": kind, "seed": seed}},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


def _write_split(
    root: Path,
    split: str,
    meta: ShardMeta,
    chunks: list[tuple[str, np.ndarray]],
    rows_per_shard: int,
    batch_rows: int,
) -> list[dict]:
    """Pack (source, rows) chunks into shards of ``rows_per_shard`` rows; returns manifest entries."""
    pieces = [
        (src, rows[i : i + batch_rows])
        for src, rows in chunks
        for i in range(0, len(rows), batch_rows)
    ]
    shards: list[dict] = []
    writer: ShardWriter | None = None
    for index in itertools.count():
        if not pieces:
            break
        rel = f"{split}/00000_{index:05d}.arrow"
        writer = ShardWriter(root / rel, meta)
        while pieces and writer.rows < rows_per_shard:
            src, rows = pieces.pop(0)
            room = rows_per_shard - writer.rows
            if len(rows) > room:
                pieces.insert(0, (src, rows[room:]))
                rows = rows[:room]
            writer.write(rows, src)
        writer.close()
        shards.append({"path": rel, "sha256": file_sha256(root / rel), "rows": writer.rows})
    return shards


@pytest.fixture
def corpus_factory(tmp_path: Path) -> Callable[..., Path]:
    """``corpus_factory(**make_corpus_kwargs)`` -> a fresh corpus dir under ``tmp_path``."""
    counter = itertools.count()

    def factory(**kwargs) -> Path:
        return make_corpus(tmp_path / f"corpus{next(counter)}", **kwargs)

    return factory


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """vocab 64, seq_len 16, train 256 rows / validation 32 rows, one source "web"."""
    return make_corpus(tmp_path / "corpus")
