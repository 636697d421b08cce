"""The unigram baseline: how well token frequencies alone predict a split.

Why: a language model's loss means little on its own. The cross-entropy of the training split's
token frequencies on another split is the floor any model must beat to have learned more than
"which tokens are common"; an MDM stuck on that plateau (issue 10) looks trained by its loss
curve alone. The demo and the scaling studies print it next to every ARM and MDM loss.

The model: p(v) = (count_train(v) + alpha) / (N + alpha V) over the tokenizer's V ids (add-alpha
smoothing keeps tokens unseen in training finite; alpha = 1 by default). Counts and losses use
the positions a model predicts: ``row[1:]`` of each stored row of ``seq_len + 1`` tokens, the
ARM's targets (the MDM scores ``row[:-1]``; one token per row of difference, negligible at any
useful ``seq_len``), without the EOS padding of a split's partial rows, which no model scores. The loss of a split is the mean of -log p over those positions of the
chosen rows (all rows, or the sample ``maskscale eval ppl`` scored, so the numbers compare on
the same rows).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.measure.rows import SplitLayout, iter_row_batches
from pipeline.shards import read_manifest

READ_ROWS = 4096
"""Rows read per batch when counting (memory: one batch of int64 rows)."""


def _batches(corpus: Path, manifest: dict, split: str, rows: np.ndarray | None, desc: str):
    if split not in manifest["splits"]:
        raise KeyError(f"{corpus}: no split {split!r}; it has {sorted(manifest['splits'])}")
    layout = SplitLayout.from_manifest(corpus, manifest, split)
    rows = np.arange(layout.rows, dtype=np.int64) if rows is None else np.sort(rows)
    sha = manifest["tokenizer"]["sha256"]
    total = -(-len(rows) // READ_ROWS)
    for _, tokens, lengths in tqdm(
        iter_row_batches(layout, rows, READ_ROWS, sha), total=total, desc=desc, leave=False
    ):
        targets = tokens[:, 1:]
        if (lengths < tokens.shape[1]).any():  # flat targets that are text, padding dropped
            yield targets[np.arange(targets.shape[1])[None, :] < (lengths - 1)[:, None]]
        else:
            yield targets


def token_counts(
    corpus_dir: str | Path, split: str = "train", rows: np.ndarray | None = None
) -> np.ndarray:
    """int64[V]: how often each id occurs at the predicted positions of ``split`` (all rows,
    or the given row indices)."""
    corpus = Path(corpus_dir)
    manifest = read_manifest(corpus)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    counts = np.zeros(vocab, dtype=np.int64)
    for targets in _batches(corpus, manifest, split, rows, f"counting {split}"):
        counts += np.bincount(targets.ravel(), minlength=vocab)[:vocab]
    return counts


def unigram_log_probs(counts: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """float64[V]: log of the add-``alpha`` smoothed frequencies of ``counts``."""
    if alpha < 0 or (alpha == 0 and (counts == 0).any()):
        raise ValueError(f"alpha must be > 0 when some count is 0 (got {alpha})")
    counts = counts.astype(np.float64)
    return np.log(counts + alpha) - math.log(counts.sum() + alpha * len(counts))


def cross_entropy(log_probs: np.ndarray, tokens: np.ndarray) -> float:
    """Mean -log p (nats/token) of ``tokens`` under the unigram ``log_probs``."""
    tokens = np.asarray(tokens).ravel()
    if tokens.size == 0:
        raise ValueError("no tokens to score")
    if tokens.min() < 0 or tokens.max() >= len(log_probs):
        raise ValueError(f"token ids outside the unigram's vocabulary of {len(log_probs)}")
    return float(-log_probs[tokens].mean())


def split_loss(
    log_probs: np.ndarray, corpus_dir: str | Path, split: str, rows: np.ndarray | None = None
) -> float:
    """Mean -log p over the predicted positions of ``split`` (all rows, or ``rows``)."""
    corpus = Path(corpus_dir)
    manifest = read_manifest(corpus)
    total, n = 0.0, 0
    for targets in _batches(corpus, manifest, split, rows, f"unigram {split}"):
        total += float(-log_probs[targets].sum())
        n += targets.size
    if n == 0:
        raise ValueError(f"{corpus}: split {split!r} has no rows to score")
    return total / n


def unigram_baseline(
    corpus_dir: str | Path,
    splits: list[str],
    rows: dict[str, np.ndarray] | None = None,
    alpha: float = 1.0,
) -> dict[str, float]:
    """{split: loss} of the training split's unigram on each split (``rows[split]`` when given,
    else every row of it)."""
    log_probs = unigram_log_probs(token_counts(corpus_dir, "train"), alpha)
    rows = rows or {}
    return {s: split_loss(log_probs, corpus_dir, s, rows.get(s)) for s in splits}
