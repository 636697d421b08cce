"""Task data: the harness's pair split, local multiple-choice files, the temporal cloze builder.

No model here: scoring functions get a deterministic text-level scorer, so the metrics and the
file handling are pinned exactly. Corpora are real Arrow shards + manifest + tokenizer.json
(``tests/trainer/conftest.make_corpus``); the BPE tokenizer is a real byte-level one trained in
milliseconds on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eval.zeroshot.cloze import (
    ClozeConfig,
    build_cloze,
    evaluate_cloze,
    passage_from_row,
    period_order,
    plot_cloze,
    read_cloze,
)
from eval.zeroshot.tasks import (
    TaskError,
    encode_pair,
    mc_requests,
    mean_stderr,
    read_mc_jsonl,
    score_mc,
)
from tests.trainer.conftest import make_corpus

TEXT = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today"] * 20


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE like the pipeline's (no prefix space, EOS special token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


# ----------------------------------------------------------------------------- pair split


def test_encode_pair_is_the_tail_of_the_whole_encoding(bpe):
    ids = lambda s: bpe.encode(s, add_special_tokens=False).ids  # noqa: E731
    ctx, cont = encode_pair(bpe, "the cat sat on the", " mat", prefix_id=0)
    assert ctx + cont == ids("the cat sat on the mat")
    assert ctx == ids("the cat sat on the") and cont == ids(" mat")
    # trailing whitespace of the context moves to the continuation (the harness's rule)
    assert encode_pair(bpe, "the cat sat on the ", "mat", 0) == (ctx, cont)


def test_encode_pair_empty_context_is_the_eos_token(bpe):
    ctx, cont = encode_pair(bpe, "", "the cat", prefix_id=0)
    assert ctx == [0] and cont == bpe.encode("the cat", add_special_tokens=False).ids


# ----------------------------------------------------------------------------- MC files


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_read_mc_jsonl_parses_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "q.jsonl",
        [
            {"context": "Q1", "choices": ["a", "b"], "label": 1},
            "",
            {"context": "", "choices": ["x", "yy", "z"], "label": 0},
        ],
    )
    docs = read_mc_jsonl(path)
    assert [(d.context, d.choices, d.label, d.line) for d in docs] == [
        ("Q1", ("a", "b"), 1, 1),
        ("", ("x", "yy", "z"), 0, 3),
    ]
    assert mc_requests(docs) == [("Q1", " a"), ("Q1", " b"), ("", " x"), ("", " yy"), ("", " z")]


@pytest.mark.parametrize(
    "line, field",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"choices": ["a", "b"], "label": 0}', "field 'context' is missing"),
        ('{"context": 3, "choices": ["a", "b"], "label": 0}', "field 'context' must be a string"),
        ('{"context": "q", "choices": ["a"], "label": 0}', "field 'choices'"),
        ('{"context": "q", "choices": ["a", ""], "label": 0}', "field 'choices' item 1"),
        ('{"context": "q", "choices": ["a", "b"], "label": 2}', "field 'label'"),
        ('{"context": "q", "choices": ["a", "b"], "label": true}', "field 'label'"),
        ('{"context": "q", "choices": ["a", "b"]}', "field 'label' is missing"),
    ],
)
def test_bad_mc_line_names_file_line_and_field(tmp_path, line, field):
    good = json.dumps({"context": "q", "choices": ["a", "b"], "label": 0})
    path = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(TaskError) as e:
        read_mc_jsonl(path)
    assert f"{path}:2:" in str(e.value) and field in str(e.value)


def test_missing_or_empty_mc_file_is_an_error(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        read_mc_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="no questions"):
        read_mc_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_score_mc_acc_and_length_normalised_acc(tmp_path):
    # scores chosen so that raw and normalised argmax disagree on question 1
    table = {
        ("q1", " a"): -2.0, ("q1", " bbbbbbbb"): -4.0,  # acc -> a (0); norm -> bbbbbbbb (1)
        ("q2", " é"): -1.0, ("q2", " ee"): -1.5,  # chars: é -1.0, ee -0.75 -> 1; bytes: é -0.5 (2 bytes) -> 0
        ("q3", " x"): -3.0, ("q3", " y"): -3.0,  # tie -> first
    }  # fmt: skip
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            {"context": "q1", "choices": ["a", "bbbbbbbb"], "label": 1},
            {"context": "q2", "choices": ["é", "ee"], "label": 0},
            {"context": "q3", "choices": ["x", "y"], "label": 0},
        ],
    )
    seen = []

    def score(pairs):
        seen.append(len(pairs))
        return [(table[p], False) for p in pairs]

    docs = read_mc_jsonl(path)
    res = score_mc(docs, score)
    assert seen == [6]  # one call with every pair: the scorer can pack them together
    assert [d["pred"] for d in res["docs"]] == [0, 0, 0]
    assert [d["pred_norm"] for d in res["docs"]] == [1, 1, 0]
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert res["acc_stderr"] == pytest.approx(mean_stderr([0.0, 1.0, 1.0]))
    by_bytes = score_mc(docs, score, norm="bytes")
    assert [d["pred_norm"] for d in by_bytes["docs"]] == [1, 0, 0]
    assert by_bytes["acc_norm"] == pytest.approx(1.0)


def test_mean_stderr_matches_numpy():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert mean_stderr(xs) == pytest.approx(np.std(xs, ddof=1) / np.sqrt(len(xs)))


# ----------------------------------------------------------------------------- cloze


def words_tokenizer(corpus: Path) -> Tokenizer:
    return Tokenizer.from_file(str(corpus / "tokenizer.json"))


def test_passage_drops_words_cut_by_row_edges_and_ends_in_a_plain_word(tmp_path):
    corpus = make_corpus(tmp_path / "c", vocab_size=32, seq_len=16)
    tok = words_tokenizer(corpus)  # word level: id i <-> "w{i}", 0 = EOS, 1 = <unk>
    row = np.array([5, 6, 7, 8, 0, 9, 10, 11, 12, 13, 14, 1, 0, 20, 21, 22, 23])
    # pieces: [5..8] (row start: drop w5), [9..14,<unk>] (a whole document), [20..23] (drop w23)
    got = passage_from_row(row, 0, tok, words=4)
    # longest piece is the whole document; its last word <unk> is not a plain word
    assert got == {"context": "w11 w12 w13", "target": "w14"}
    assert passage_from_row(row, 0, tok, words=8) == "too_short"
    only_unk = np.array([0, 1, 1, 1, 0])
    assert passage_from_row(only_unk, 0, tok, words=2) == "no_target_word"
    # targets shorter than min_chars are passed over: w5 (2 chars) is skipped for w12
    short_last = np.array([0, 10, 11, 12, 5, 0])
    assert passage_from_row(short_last, 0, tok, 3, min_chars=3) == {
        "context": "w10 w11", "target": "w12"
    }  # fmt: skip
    assert passage_from_row(np.array([0, 5, 6, 7, 8, 9, 0]), 0, tok, 3, 3) == "no_target_word"


def test_period_order_by_range_start_and_year():
    manifest = {
        "splits": dict.fromkeys(["train", "holdout_2020s", "holdout_1999", "validation", "later"]),
        "config": {"split": {"holdout_ranges": {"holdout_2020s": ["2020-01-01", "2029-12-31"]}}},
    }
    assert period_order(manifest) == ["validation", "holdout_1999", "holdout_2020s", "later"]


def cloze_corpus(tmp_path: Path) -> Path:
    splits = {"train": 20, "validation": 30, "holdout_2001": 25, "holdout_1999": 12}
    return make_corpus(tmp_path / "corpus", vocab_size=48, seq_len=16, splits=splits, kind="ramp",
                       rows_per_shard=7)  # fmt: skip


def test_build_cloze_writes_seeded_passages_per_period(tmp_path):
    corpus = cloze_corpus(tmp_path)
    info = build_cloze(
        corpus, tmp_path / "out", ClozeConfig(n=10, words=5, seed=3, min_target_chars=2)
    )
    assert list(info["splits"]) == ["validation", "holdout_1999", "holdout_2001"]
    meta, docs = read_cloze(tmp_path / "out")
    assert meta == info
    for split, entry in info["splits"].items():
        n_usable = entry["rows"] - sum(entry["skipped"].values())
        assert entry["passages"] == len(docs[split]) == min(10, n_usable)
        for d in docs[split]:
            assert len(d["context"].split()) == 4 and d["target"].startswith("w")
            assert d["split"] == split
        rows = [d["row"] for d in docs[split]]
        assert len(set(rows)) == len(rows)
    # rows come from every shard of a split, not a prefix (validation: 30 rows in 5 shards)
    assert max(d["row"] for d in docs["validation"]) >= 14
    again = build_cloze(
        corpus, tmp_path / "again", ClozeConfig(n=10, words=5, seed=3, min_target_chars=2)
    )
    assert read_cloze(tmp_path / "again")[1] == docs and again["splits"] == info["splits"]
    build_cloze(corpus, tmp_path / "other", ClozeConfig(n=10, words=5, seed=4, min_target_chars=2))
    assert read_cloze(tmp_path / "other")[1] != docs
    yaml_text = (tmp_path / "out" / "temporal_cloze_holdout_1999.yaml").read_text()
    assert "tag: temporal_cloze" in yaml_text and "output_type: loglikelihood" in yaml_text
    assert str((tmp_path / "out" / "temporal_cloze_holdout_1999.jsonl").resolve()) in yaml_text


def test_build_cloze_errors_and_leaves_nothing_half_written(tmp_path):
    corpus = cloze_corpus(tmp_path)
    with pytest.raises(TaskError, match="no split"):
        build_cloze(corpus, tmp_path / "out", ClozeConfig(splits=["holdout_3000"]))
    with pytest.raises(TaskError, match="not a built corpus"):
        build_cloze(tmp_path / "nothing", tmp_path / "out", ClozeConfig())
    with pytest.raises(TaskError, match="words"):
        build_cloze(corpus, tmp_path / "out", ClozeConfig(words=1))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_evaluate_cloze_accuracy_and_plot(tmp_path):
    docs = {
        "validation": [{"context": "a b", "target": "c"}, {"context": "d e", "target": "f"}],
        "holdout_2001": [{"context": "g h", "target": "i"}],
    }

    def score(pairs):
        assert pairs == [("a b", " c"), ("d e", " f"), ("g h", " i")]
        return [(-1.0, True), (-3.0, False), (-2.0, False)]

    res = evaluate_cloze(docs, score)
    assert res["validation"]["acc"] == 0.5 and res["validation"]["n"] == 2
    assert res["validation"]["perplexity"] == pytest.approx(np.exp(2.0))
    assert res["holdout_2001"]["acc"] == 0.0
    png = plot_cloze(res, tmp_path / "c.png", "t", ppl={"validation": 10.0, "holdout_2001": 12.0})
    assert png.read_bytes()[:4] == b"\x89PNG"
