"""trainer.mixture: weight keys (forms, precedence, names) and the block schedule's quotas."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.mixture import BLOCK, _Group, _Stream, resolve_weights

COMPONENTS = [
    ("holdout_2020s", "books"),
    ("holdout_2020s", "web"),
    ("train", "books"),
    ("train", "code"),
    ("train", "web"),
]
SPLITS = ["holdout_2020s", "train"]


def test_most_specific_key_wins_and_weights_are_normalised():
    got = resolve_weights(
        {"web": 1, "train/*": 2, "train/code": 0, "train/web": 5}, COMPONENTS, SPLITS
    )
    # holdout books: no key -> not read; train/code: explicit 0 beats train/* -> not read
    assert got == {"holdout_2020s/web": 0.125, "train/books": 0.25, "train/web": 0.625}
    assert list(got) == sorted(got)


def test_split_wildcard_gives_each_source_the_weight():
    got = resolve_weights({"holdout_2020s/*": 1, "train/web": 2}, COMPONENTS, SPLITS)
    assert got == {"holdout_2020s/books": 0.25, "holdout_2020s/web": 0.25, "train/web": 0.5}


def test_one_split_names_components_by_source():
    comps = [("train", "books"), ("train", "web")]
    assert resolve_weights({"web": 1, "books": 3}, comps, ["train"]) == {
        "books": 0.75,
        "web": 0.25,
    }
    assert resolve_weights({"train/*": 1, "train/web": 3}, comps, ["train"]) == {
        "books": 0.25,
        "web": 0.75,
    }


def test_a_source_name_with_a_slash_is_a_source_unless_it_starts_with_a_split():
    comps = [("train", "hf/wiki"), ("train", "web")]
    assert resolve_weights({"hf/wiki": 1, "train/web": 1}, comps, ["train"]) == {
        "hf/wiki": 0.5,
        "web": 0.5,
    }
    assert resolve_weights({"train/hf/wiki": 1}, comps, ["train"]) == {"hf/wiki": 1.0}


@pytest.mark.parametrize(
    "key, message",
    [
        ("news", "unknown source in key 'news'"),
        ("validation/web", "unknown split in key 'validation/web'"),
        ("holdout_2020s/code", "split 'holdout_2020s' has no source 'code'"),
    ],
)
def test_bad_keys_are_named_with_the_valid_ones(key, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_weights({key: 1}, COMPONENTS, SPLITS)
    for valid in ("'code'", "'train/*'", "'holdout_2020s/web'"):
        assert valid in str(err.value)


@pytest.mark.parametrize("w", [-1, float("nan"), float("inf"), "1", True])
def test_bad_values_are_refused(w):
    with pytest.raises(ValueError, match="finite number >= 0"):
        resolve_weights({"web": w}, COMPONENTS, SPLITS)


def test_all_zero_is_refused():
    with pytest.raises(ValueError, match="weight > 0"):
        resolve_weights({"web": 0, "train/*": 0}, COMPONENTS, SPLITS)


def test_quotas_sum_to_the_block_and_track_the_weights():
    w = [0.5, 0.3, 0.2]
    groups = [_Group(i, [(i * 100, 100)], seed=1) for i in range(3)]
    stream = _Stream(groups, w, seed=1)
    for b in (0, 1, 7, 1000):
        q = stream.quotas(b)
        assert q.sum() == b * BLOCK
        assert np.all(np.abs(q - b * BLOCK * np.array(w)) <= len(w))
