"""trainer.data against real Arrow shards: order, sharding, resume, mixtures and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.configlib import ConfigError, from_dict, load_config
from pipeline.shards import ShardMeta, ShardWriter, open_shard, read_manifest, shard_tokens
from trainer.config import TrainConfig
from trainer.data import (
    BLOCK,
    CorpusLoader,
    CorpusMismatchError,
    _Permutation,
    _SplitReader,
    check_corpus,
    iter_eval_batches,
)


def read_split(corpus: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: every row and its source, via pipeline.shards, in file order."""
    tokens, sources = [], []
    for shard in read_manifest(corpus)["splits"][split]["shards"]:
        table, _ = open_shard(corpus / shard["path"])
        tokens.append(shard_tokens(table).astype(np.int64))
        sources.extend(table.column("source").to_pylist())
    return np.concatenate(tokens), np.array(sources)


def take(loader: CorpusLoader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [loader.next_micro_batch() for _ in range(n)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection(n):
    perm = _Permutation(n, [1, 2, 3])
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 16:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, _Permutation(n, [1, 2, 4])(np.arange(n)))


def test_reader_is_zero_copy_and_gathers_the_right_rows(corpus_factory):
    corpus = corpus_factory(splits={"train": 100}, rows_per_shard=30, batch_rows=7)
    ref, _ = read_split(corpus, "train")
    reader = _SplitReader(corpus, "train")
    assert reader.rows == 100 and len(reader.views) > 4  # several shards and record batches
    assert all(not v.flags.owndata and v.dtype == np.uint16 for v in reader.views)
    rows = np.array([99, 0, 7, 6, 31, 30, 55, 0])
    got, lengths = reader.gather(rows)
    assert lengths.tolist() == [17] * len(rows)  # fixture rows hold no padding
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref[rows])


def test_epochs_are_fresh_permutations_and_batches_match_rows(corpus_factory):
    corpus = corpus_factory(splits={"train": 48}, rows_per_shard=20, batch_rows=8)
    ref, _ = read_split(corpus, "train")
    loader = CorpusLoader(corpus, micro_batch=4, global_batch=8, seed=11)
    n = loader.rows
    epoch0, epoch1 = loader.rows_for(np.arange(n)), loader.rows_for(np.arange(n, 2 * n))
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(n))
    tokens, keys = take(loader, n // 4 + 1)  # one epoch and one micro-batch into the next
    assert tokens.shape == (n + 4, 17) and tokens.dtype == torch.int64
    np.testing.assert_array_equal(tokens.numpy(), ref[np.concatenate([epoch0, epoch1[:4]])])
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == n + 4 and keys.min() >= 0
    assert loader.epoch == 1 and loader.position == n + 4
    other = CorpusLoader(corpus, micro_batch=4, global_batch=8, seed=12)
    assert not np.array_equal(other.rows_for(np.arange(n)), epoch0)


@pytest.mark.parametrize("weights", [None, {"web": 1.0, "books": 2.0}])
def test_resume_mid_step_and_across_epochs_matches_uninterrupted(corpus_factory, weights):
    corpus = corpus_factory(splits={"train": 40}, sources=["web", "books"])
    kw = dict(micro_batch=2, global_batch=8, seed=5, weights=weights)
    whole = take(CorpusLoader(corpus, **kw), 33)  # 66 rows: crosses the epoch boundary at 40
    first = CorpusLoader(corpus, **kw)
    head = take(first, 7)  # stops in the middle of an accumulation cycle
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may serialise it
    assert state["position"] == 14 and state["micro_step"] == 3
    second = CorpusLoader(corpus, **kw)
    second.load_state_dict(state)
    tail = take(second, 26)
    for a, b in zip(whole, (torch.cat([head[0], tail[0]]), torch.cat([head[1], tail[1]]))):
        assert torch.equal(a, b)


def test_ranks_split_a_global_batch_like_accumulation(corpus_factory):
    corpus = corpus_factory(splits={"train": 64})
    single = CorpusLoader(corpus, micro_batch=3, global_batch=6)  # accum 2
    ranks = [
        CorpusLoader(corpus, micro_batch=3, global_batch=6, rank=r, world_size=2) for r in (0, 1)
    ]
    assert single.accum == 2 and ranks[0].accum == 1
    seen: list[int] = []
    for _ in range(10):  # 10 steps = 60 rows, within one epoch
        one = take(single, 2)
        both = [r.next_micro_batch() for r in ranks]
        assert torch.equal(one[0], torch.cat([b[0] for b in both]))
        assert torch.equal(one[1], torch.cat([b[1] for b in both]))
        seen.extend(single.rows_for(np.arange(single.position - 6, single.position)).tolist())
    assert len(set(seen)) == len(seen) == 60  # no row repeated within the epoch
    # a 2-rank step-boundary checkpoint resumes on 1 rank
    resumed = CorpusLoader(corpus, micro_batch=3, global_batch=6)
    resumed.load_state_dict(ranks[1].state_dict())
    assert resumed.position == 60 and torch.equal(take(resumed, 2)[1], take(single, 2)[1])


def test_mixture_matches_weights_and_exhausts_sources_before_repeating(corpus_factory):
    corpus = corpus_factory(
        splits={"train": 300}, sources={"web": 0.8, "books": 0.2}, rows_per_shard=64
    )
    _, source_of_row = read_split(corpus, "train")
    loader = CorpusLoader(corpus, micro_batch=8, global_batch=64, weights={"web": 1, "books": 3})
    assert loader.weights == {"books": 0.75, "web": 0.25}
    n = 3 * BLOCK + 123
    rows = loader.rows_for(np.arange(n))
    books = rows[source_of_row[rows] == "books"]
    is_book = source_of_row[rows] == "books"
    assert is_book[: 3 * BLOCK].sum() == 0.75 * 3 * BLOCK  # exact at block boundaries
    assert abs(len(books) - 0.75 * n) <= 10  # a block's shuffle fluctuates only within it
    per_batch = (source_of_row[rows[: 64 * 40]] == "books").reshape(40, 64).mean(1)
    assert 0.6 < per_batch.min() and per_batch.max() < 0.9  # and well mixed at batch scale
    # 60 book rows drawn ~2300 times: every 60 consecutive draws are one full pass
    for e in range(3):
        assert sorted(books[60 * e : 60 * (e + 1)].tolist()) == sorted(set(books.tolist()))
    assert len(set(books[:60].tolist())) == 60
    assert loader.epoch == 0
    tokens, _ = take(loader, 8)  # micro-batches read exactly the scheduled rows
    ref, _ = read_split(corpus, "train")
    np.testing.assert_array_equal(tokens.numpy(), ref[rows[:64]])
    assert loader.epoch == 0  # 48 of the 60 book rows drawn
    take(loader, 2)
    assert loader.epoch == 1  # 60 book draws: its second pass begins
    only_web = CorpusLoader(corpus, micro_batch=8, global_batch=64, weights={"web": 1, "books": 0})
    assert only_web.rows == 240 and set(source_of_row[only_web.rows_for(np.arange(240))]) == {"web"}
    with pytest.raises(ValueError, match="unknown source.*'news'"):
        CorpusLoader(corpus, micro_batch=8, global_batch=64, weights={"news": 1})


def test_bad_geometry_and_incompatible_state_are_refused(corpus_factory):
    corpus = corpus_factory(splits={"train": 32})
    with pytest.raises(ValueError, match="multiple of micro_batch x world_size"):
        CorpusLoader(corpus, micro_batch=3, global_batch=8)
    with pytest.raises(ValueError, match="no split 'test'"):
        CorpusLoader(corpus, "test", micro_batch=1, global_batch=1)
    loader = CorpusLoader(corpus, micro_batch=2, global_batch=8)
    loader.next_micro_batch()
    state = loader.state_dict()
    with pytest.raises(ValueError, match="middle of a gradient-accumulation cycle"):
        CorpusLoader(corpus, micro_batch=4, global_batch=8).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3407"):
        CorpusLoader(corpus, micro_batch=2, global_batch=8, seed=1).load_state_dict(state)


def test_check_corpus_names_each_mismatch(corpus_factory):
    corpus = corpus_factory(vocab_size=512, seq_len=16)
    manifest = check_corpus(corpus, vocab_size=512, seq_len=16)
    sha = manifest["tokenizer"]["sha256"]
    assert check_corpus(corpus, 512, 16, tokenizer_sha256=sha) == manifest
    with pytest.raises(
        CorpusMismatchError, match="vocab_size 512 .* says 1000.*model.vocab_size=512"
    ):
        check_corpus(corpus, vocab_size=1000, seq_len=16)
    with pytest.raises(CorpusMismatchError, match="seq_len 16 .* says 32.*model.seq_len=16"):
        check_corpus(corpus, vocab_size=512, seq_len=32)
    with pytest.raises(CorpusMismatchError, match=f"tokenizer sha256 {sha} .* expects abc"):
        check_corpus(corpus, 512, 16, tokenizer_sha256="abc")
    # a shard from another build (different tokenizer) slipped into the split
    shard = corpus / manifest["splits"]["validation"]["shards"][0]["path"]
    with ShardWriter(shard, ShardMeta("0" * 64, 512, 0, 512, 16, "validation")) as w:
        w.write(np.zeros((32, 17), dtype=np.int64), "web")
    with pytest.raises(CorpusMismatchError, match=f"shard {shard} has tokenizer sha256 0000"):
        check_corpus(corpus, 512, 16)
    shard.unlink()
    with pytest.raises(CorpusMismatchError, match=f"shard {shard} is listed .* missing"):
        check_corpus(corpus, 512, 16)
    (corpus / "tokenizer.json").write_text("{}")
    with pytest.raises(CorpusMismatchError, match="tokenizer was replaced"):
        check_corpus(corpus, 512, 16)


def test_eval_batches_in_file_order_with_stable_keys(corpus_factory):
    """max_rows=None: every row in file order (sampled subsets: tests/trainer/test_validation)."""
    corpus = corpus_factory(splits={"validation": 45}, batch_rows=10, rows_per_shard=20)
    ref, _ = read_split(corpus, "validation")
    batches = list(iter_eval_batches(corpus, "validation", batch_size=8))
    assert [len(b[0]) for b in batches] == [8, 8, 8, 8, 8, 5]
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), ref)
    keys = torch.cat([b[1] for b in batches])
    assert len(set(keys.tolist())) == 45


def test_wide_vocab_uses_uint32_shards(corpus_factory):
    corpus = corpus_factory(vocab_size=70_000, splits={"train": 16})
    loader = CorpusLoader(corpus, micro_batch=16, global_batch=16)
    assert loader._reader.views[0].dtype == np.uint32
    tokens = loader.next_micro_batch()[0]
    assert tokens.max() >= 2**16 and tokens.max() < 70_000


# ----------------------------------------------------------------------------- several splits

TWO = ["train", "holdout_2020s"]


def two_split_corpus(corpus_factory, **kw) -> Path:
    """train 300 rows + holdout_2020s 120 rows, each 3/4 web then 1/4 books."""
    return corpus_factory(
        splits={"train": 300, "holdout_2020s": 120}, sources={"web": 0.75, "books": 0.25}, **kw
    )


def read_splits(corpus: Path, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reference rows of several splits in the loader's order (sorted split names), each
    labelled ``split/source``."""
    parts = [(s, *read_split(corpus, s)) for s in sorted(splits)]
    tokens = np.concatenate([t for _, t, _ in parts])
    labels = np.concatenate([np.char.add(f"{s}/", src.astype(str)) for s, _, src in parts])
    return tokens, labels


@pytest.mark.parametrize(
    "weights, head, block1",
    [
        (None, [142, 98, 124, 64, 25, 110, 39, 33, 160, 47, 167, 284], [166, 136, 9, 51]),
        (
            {"web": 1, "books": 3},
            [286, 257, 241, 265, 266, 239, 226, 100, 278, 249, 275, 203],
            [234, 290, 123, 242],
        ),
    ],
)
@pytest.mark.parametrize("split", ["train", ["train"]])
def test_single_split_stream_is_pinned(corpus_factory, weights, head, block1, split):
    """Golden rows and keys recorded before multi-split support: one split must not change,
    whether it is given as "train" or ["train"] (other splits in the corpus are ignored)."""
    corpus = two_split_corpus(corpus_factory)
    loader = CorpusLoader(corpus, split, micro_batch=4, global_batch=16, seed=7, weights=weights)
    assert loader.split == "train" and loader.state_dict()["split"] == "train"
    assert loader.rows == 300
    assert loader.rows_for(np.arange(12)).tolist() == head
    assert loader.rows_for(np.arange(BLOCK, BLOCK + 4)).tolist() == block1
    keys = loader.next_micro_batch()[1].tolist()
    assert keys[:3] == [5423679234482071309, 2763385220758068811, 6173369229454309506]


def test_two_split_mixture_counts_match_weights_at_block_boundaries(corpus_factory):
    corpus = two_split_corpus(corpus_factory)
    ref, label = read_splits(corpus, TWO)
    # precedence: split/source > split/* > source
    weights = {"web": 2, "train/*": 1, "train/web": 4, "holdout_2020s/books": 1}
    loader = CorpusLoader(corpus, TWO, micro_batch=8, global_batch=64, seed=3, weights=weights)
    assert loader.split == ["holdout_2020s", "train"]  # canonical: sorted
    assert loader.weights == {
        "holdout_2020s/books": 0.125,
        "holdout_2020s/web": 0.25,
        "train/books": 0.125,
        "train/web": 0.5,
    }
    assert loader.rows == 420
    n = 3 * BLOCK + 321
    rows = loader.rows_for(np.arange(n))
    for b in (1, 2, 3):  # exact at every block boundary
        got = {c: int((label[rows[: b * BLOCK]] == c).sum()) for c in loader.weights}
        assert got == {c: int(w * b * BLOCK) for c, w in loader.weights.items()}
    for c, w in loader.weights.items():  # and within one block's fluctuation in between
        assert abs((label[rows] == c).sum() - w * n) <= 16
    # a component is exhausted before any of its rows repeats (holdout books: 30 rows)
    hb = rows[label[rows] == "holdout_2020s/books"]
    assert len(hb) > 90 and len(set(hb[:30].tolist())) == 30
    assert sorted(hb[30:60].tolist()) == sorted(hb[:30].tolist())
    # batches carry exactly the scheduled rows of both splits, keys unique per position
    tokens, keys = take(loader, 16)
    np.testing.assert_array_equal(tokens.numpy(), ref[rows[:128]])
    assert len(set(keys.tolist())) == 128
    # the order of the split list does not matter; a bare source applies to every split
    again = CorpusLoader(corpus, TWO[::-1], micro_batch=8, global_batch=64, seed=3, weights=weights)
    np.testing.assert_array_equal(again.rows_for(np.arange(n)), rows)
    web = CorpusLoader(corpus, TWO, micro_batch=8, global_batch=64, weights={"web": 1})
    assert web.weights == {"holdout_2020s/web": 0.5, "train/web": 0.5}
    w_rows = web.rows_for(np.arange(BLOCK))
    assert set(label[w_rows]) == {"holdout_2020s/web", "train/web"}
    assert (label[w_rows] == "train/web").sum() == BLOCK // 2


def test_two_splits_in_natural_proportions(corpus_factory):
    corpus = two_split_corpus(corpus_factory)
    ref, _ = read_splits(corpus, TWO)
    loader = CorpusLoader(corpus, TWO, micro_batch=4, global_batch=8, seed=1)
    assert loader.weights is None and loader.rows == 420
    epoch0 = loader.rows_for(np.arange(420))
    assert sorted(epoch0.tolist()) == list(range(420))  # every row of both splits once
    assert not np.array_equal(epoch0, loader.rows_for(np.arange(420, 840)))
    tokens, _ = take(loader, 3)
    np.testing.assert_array_equal(tokens.numpy(), ref[epoch0[:12]])


@pytest.mark.parametrize("weights", [None, {"train/*": 1, "holdout_2020s/books": 2}])
def test_two_split_resume_mid_epoch_and_world_sizes_match_uninterrupted(corpus_factory, weights):
    corpus = two_split_corpus(corpus_factory)
    kw = dict(micro_batch=2, global_batch=8, seed=5, weights=weights)
    steps = 70  # 560 positions: past an epoch of the union, and many of holdout books
    whole = take(CorpusLoader(corpus, TWO, **kw), steps * 4)
    first = CorpusLoader(corpus, TWO, **kw)
    head = take(first, 4 * 41 + 3)  # stops in the middle of an accumulation cycle
    state = json.loads(json.dumps(first.state_dict()))
    assert state["split"] == ["holdout_2020s", "train"] and state["micro_step"] == 3
    second = CorpusLoader(corpus, TWO[::-1], **kw)
    second.load_state_dict(state)
    tail = take(second, steps * 4 - (4 * 41 + 3))
    assert torch.equal(whole[0], torch.cat([head[0], tail[0]]))
    assert torch.equal(whole[1], torch.cat([head[1], tail[1]]))
    # two ranks with micro 4 read the same step-wise rows as one rank accumulating
    ranks = [
        CorpusLoader(corpus, TWO, rank=r, world_size=2, **{**kw, "micro_batch": 4}) for r in (0, 1)
    ]
    for s in range(steps):
        both = [r.next_micro_batch() for r in ranks]
        assert torch.equal(torch.cat([b[0] for b in both]), whole[0][8 * s : 8 * (s + 1)])
        assert torch.equal(torch.cat([b[1] for b in both]), whole[1][8 * s : 8 * (s + 1)])
    # a state from another split selection is refused
    one = CorpusLoader(corpus, "train", **{**kw, "weights": None})
    with pytest.raises(ValueError, match="saved with split=\\['holdout_2020s', 'train'\\]"):
        one.load_state_dict(state)


def test_unknown_splits_and_weight_keys_are_refused(corpus_factory):
    corpus = two_split_corpus(corpus_factory)
    kw = dict(micro_batch=1, global_batch=1)
    with pytest.raises(ValueError, match="no split 'holdout_1990s'; available: .*'train'"):
        CorpusLoader(corpus, ["train", "holdout_1990s"], **kw)
    with pytest.raises(ValueError, match="non-empty list"):
        CorpusLoader(corpus, [], **kw)
    with pytest.raises(ValueError, match=r"\['train'\] more than once"):
        CorpusLoader(corpus, ["train", "train"], **kw)
    bad = {
        "news": "unknown source in key 'news'",
        "validation/*": "unknown split in key 'validation/\\*'",
        "holdout_2020s/code": "split 'holdout_2020s' has no source 'code'",
    }
    for key, message in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            CorpusLoader(corpus, TWO, weights={"web": 1, key: 1}, **kw)
        for valid in ("'books'", "'train/*'", "'holdout_2020s/web'"):  # valid keys listed
            assert valid in str(err.value)
    with pytest.raises(ValueError, match="finite number >= 0"):
        CorpusLoader(corpus, TWO, weights={"web": -1}, **kw)
    with pytest.raises(ValueError, match="weight > 0"):
        CorpusLoader(corpus, TWO, weights={"web": 0, "train/*": 0}, **kw)


@pytest.mark.parametrize("field", ["seq_len", "tokenizer"])
def test_splits_from_different_builds_are_not_mixed(corpus_factory, field):
    corpus = two_split_corpus(corpus_factory)
    manifest = read_manifest(corpus)
    shard = corpus / manifest["splits"]["train"]["shards"][-1]["path"]
    rows = manifest["splits"]["train"]["shards"][-1]["rows"]
    sha = manifest["tokenizer"]["sha256"]
    seq_len = 32 if field == "seq_len" else 16
    meta = ShardMeta("0" * 64 if field == "tokenizer" else sha, 64, 0, 64, seq_len, "train")
    with ShardWriter(shard, meta) as w:
        w.write(np.zeros((rows, seq_len + 1), dtype=np.int64), "books")
    CorpusLoader(corpus, "holdout_2020s", micro_batch=1, global_batch=1)  # alone: fine
    with pytest.raises(CorpusMismatchError, match="split 'train'.*disagrees with split 'holdout"):
        CorpusLoader(corpus, TWO, micro_batch=1, global_batch=1)


def test_data_config_accepts_a_split_or_a_list(tmp_path):
    assert from_dict(TrainConfig, {}).data.split == "train"
    cfg = load_config(
        TrainConfig, None, ["corpus=c", "budget.steps=1", "data.split=[train, holdout_2020s]"]
    )
    assert cfg.data.split == ["train", "holdout_2020s"]
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  split: holdout_2020s\n  weights: {holdout_2020s/*: 1, web: 2}\n")
    cfg = load_config(TrainConfig, path, ["corpus=c", "budget.steps=1"])
    assert cfg.data.split == "holdout_2020s" and cfg.data.weights["web"] == 2.0
    with pytest.raises(ConfigError, match="data.split: .*non-empty"):
        from_dict(TrainConfig, {"data": {"split": []}})
    with pytest.raises(ConfigError, match="more than once"):
        from_dict(TrainConfig, {"data": {"split": ["train", "train"]}})
    with pytest.raises(ConfigError, match="'validation/\\*' names split 'validation'.*not in"):
        from_dict(TrainConfig, {"data": {"split": "train", "weights": {"validation/*": 1}}})
    with pytest.raises(ConfigError, match="data.weights.web: must be a finite number"):
        from_dict(TrainConfig, {"data": {"weights": {"web": -1}}})
