"""Bootstrap intervals over documents for per-token losses, paired across runs when they can be.

Why documents: the tokens of one document share its topic, style and date; rows are slices of
documents. Resampling rows (or tokens) treats the pieces of one speech as independent draws and
gives intervals that are too narrow -- on a holdout of a handful of long documents, several
times too narrow. The document is the sampling unit of a corpus, so it is what we resample.

Why sums: a split's per-token loss is a *ratio*, sum of losses / scored tokens, and documents
differ in length. Each resample draws documents with replacement and recomputes that ratio from
their summed losses and token counts (long documents weigh by their tokens, exactly as in the
point estimate); averaging per-document means would weigh a 20-token note like a 5,000-token
speech.

Pairing: the resample indices are a pure function of (number of documents, resamples, seed).
Two runs scored on the same rows of the same corpus have the same documents in the same order,
so with the same seed they see the same resampled documents, and the per-resample difference
of their losses gives a *paired* interval for the difference -- far narrower than two
independent intervals, because document difficulty cancels.

Too few documents: with fewer than ``min_docs`` documents (default 5) a percentile interval is
meaningless (the resamples take a handful of values), so none is given and the reason says so.
"""

from __future__ import annotations

import math

import numpy as np

from eval.measure.defaults import MIN_DOCS

CHUNK = 4_000_000
"""Resampled document indices held in memory at once."""


def ratio_samples(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed) -> np.ndarray:
    """float64[n_boot]: sum(sums[idx]) / sum(counts[idx]) for ``n_boot`` resamples ``idx`` of
    the documents drawn with replacement; the draws depend only on (len(sums), n_boot, seed)."""
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    n = len(sums)
    if n == 0 or len(counts) != n:
        raise ValueError(f"need equal, non-empty sums and counts, got {n} and {len(counts)}")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    step = max(1, CHUNK // n)
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        out[start : start + k] = sums[idx].sum(axis=1) / np.maximum(counts[idx].sum(axis=1), 1)
    return out


def interval(samples: np.ndarray) -> list[float]:
    """Central 95% interval of bootstrap samples."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def why_no_interval(documents: int, loss: float, min_docs: int = MIN_DOCS) -> str | None:
    """The reason a split gets no interval, or None when it gets one."""
    if not math.isfinite(loss):
        return f"loss is not finite ({loss})"
    if documents < min_docs:
        return f"too few documents ({documents} < {min_docs})"
    return None


def describe(documents: int, tokens: int, rows: int, n_boot: int, reason: str | None) -> str:
    """One line saying what a figure rests on and how it was resampled."""
    base = f"{rows} rows, {documents} documents, {tokens} scored tokens"
    if reason:
        return f"{base}; no interval: {reason}"
    return f"{base}; 95% interval from {n_boot} bootstrap resamples over documents"
