"""The unigram baseline: hand-computed values, and the real Arrow reading path."""

import math

import numpy as np
import pyarrow as pa
import pytest

from eval.measure.unigram import (
    cross_entropy,
    split_loss,
    token_counts,
    unigram_baseline,
    unigram_log_probs,
)
from pipeline.shards import read_manifest
from tests.trainer.conftest import make_corpus


def test_hand_computed_unigram_loss():
    # counts 3, 1, 0, 0 + 1 each -> p = 4/8, 2/8, 1/8, 1/8; tokens 0, 1, 2 cost 1, 2, 3 bits
    log_probs = unigram_log_probs(np.array([3, 1, 0, 0]), alpha=1.0)
    assert np.allclose(np.exp(log_probs), [0.5, 0.25, 0.125, 0.125])
    assert cross_entropy(log_probs, np.array([0, 1, 2])) == pytest.approx(2 * math.log(2))
    with pytest.raises(ValueError, match="alpha"):
        unigram_log_probs(np.array([1, 0]), alpha=0.0)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(log_probs, np.array([4]))


def _targets(corpus, split):
    """Every row's tokens after the first, read straight from the split's Arrow files."""
    manifest = read_manifest(corpus)
    rows = []
    for entry in manifest["splits"][split]["shards"]:
        with pa.memory_map(str(corpus / entry["path"])) as source:
            table = pa.ipc.open_file(source).read_all()
        rows += table.column(0).to_pylist()
    return np.array(rows)[:, 1:]


def test_baseline_reads_every_shard_of_a_real_corpus(tmp_path):
    corpus = make_corpus(
        tmp_path / "c", vocab_size=8, seq_len=6, splits={"train": 13, "validation": 7},
        rows_per_shard=4, batch_rows=3, kind="ramp",
    )  # fmt: skip
    train, val = _targets(corpus, "train"), _targets(corpus, "validation")
    counts = token_counts(corpus, "train")
    assert counts.tolist() == np.bincount(train.ravel(), minlength=8).tolist()
    assert counts.sum() == 13 * 6
    expected = -np.log((counts[val] + 1.0) / (counts.sum() + 8)).mean()
    got = unigram_baseline(corpus, ["validation", "train"])
    assert got["validation"] == pytest.approx(expected)
    assert got["train"] == pytest.approx(-np.log((counts[train] + 1.0) / (13 * 6 + 8)).mean())
    rows = np.array([5, 1])  # a sample of rows, as eval ppl draws them (any order)
    sub = -np.log((counts[val[[1, 5]]] + 1.0) / (counts.sum() + 8)).mean()
    assert split_loss(unigram_log_probs(counts), corpus, "validation", rows) == pytest.approx(sub)
    with pytest.raises(KeyError, match="holdout"):
        split_loss(unigram_log_probs(counts), corpus, "holdout_2020s")
