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
    is_number,
    is_word,
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
from tests.eval.runs import cloze_words
from tests.trainer.conftest import make_corpus, write_tokenizer

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


def test_encode_pair_is_the_tail_of_the_whole_encoding_after_an_eos(bpe):
    ids = lambda s: bpe.encode(s, add_special_tokens=False).ids  # noqa: E731
    ctx, cont = encode_pair(bpe, "the cat sat on the", " mat", eos_id=0)
    # every training document follows an EOS: the context starts with one
    assert ctx + cont == [0, *ids("the cat sat on the mat")]
    assert ctx == [0, *ids("the cat sat on the")] and cont == ids(" mat")
    # trailing whitespace of the context moves to the continuation (the harness's rule)
    assert encode_pair(bpe, "the cat sat on the ", "mat", 0) == (ctx, cont)
    # a context that already starts with the EOS gets no second one
    assert encode_pair(bpe, "<|endoftext|>the cat sat on the", " mat", 0) == (ctx, cont)


def test_encode_pair_empty_context_is_the_eos_token(bpe):
    ctx, cont = encode_pair(bpe, "", "the cat", eos_id=0)
    assert ctx == [0] and cont == bpe.encode("the cat", add_special_tokens=False).ids
    # the harness's rule: a continuation starting with the EOS gives it to the context
    assert encode_pair(bpe, "", "<|endoftext|>the cat", 0) == (ctx, cont)


def test_a_continuation_that_tokenises_to_nothing_scores_the_last_context_token(bpe):
    ids = lambda s: bpe.encode(s, add_special_tokens=False).ids  # noqa: E731
    # an empty continuation: the context's last token becomes the continuation
    assert encode_pair(bpe, "the cat sat", "", 0) == ([0, *ids("the cat")], ids(" sat"))
    assert encode_pair(bpe, "the cat sat ", "", 0) == ([0, *ids("the cat sat")], ids(" "))
    assert encode_pair(bpe, "the", "", 0) == ([0], ids("the"))
    # a token spanning the join ("ca" + "t" = " cat"): split where the encodings part
    ctx_ids, whole = ids("the ca"), ids("the cat")
    assert len(whole) <= len(ctx_ids)  # the old tail rule left nothing to score here
    ctx, cont = encode_pair(bpe, "the ca", "t", 0)
    assert ctx + cont == [0, *whole] and cont and ctx == [0, *ids("the")]
    with pytest.raises(TaskError, match="no token to score"):
        encode_pair(bpe, "", "", 0)


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
    # "w14" and friends mix letters and digits: never a target word
    assert passage_from_row(row, 0, tok, words=4) == "no_target_word"
    assert passage_from_row(row, 0, tok, words=8) == "too_short"


def letters_tokenizer(tmp_path: Path) -> Tokenizer:
    write_tokenizer(tmp_path / "tok.json", 32, cloze_words(32))
    return Tokenizer.from_file(str(tmp_path / "tok.json"))


def test_cloze_targets_are_letter_words_and_numbers_are_kept_apart(tmp_path):
    tok = letters_tokenizer(tmp_path)
    word = lambda i: tok.id_to_token(i)  # noqa: E731
    assert [word(i) for i in (2, 10, 7, 12)] == ["wc", "1890", "n7", "wbc"]
    # a whole document (EOS on both sides) ending in a number (10), then letters+digits (7)
    row = np.array([3, 4, 0, 2, 3, 4, 6, 8, 12, 10, 7, 0, 13])
    got = passage_from_row(row, 0, tok, words=3)
    assert got == {"context": "wg wi", "target": "wbc", "whole_document": True}
    number = passage_from_row(row, 0, tok, words=3, kind="number")
    assert number == {"context": "wi wbc", "target": "1890", "whole_document": True}
    # targets shorter than min_chars are passed over: "wc" (2 chars)
    short = np.array([0, 11, 12, 13, 2, 0])
    assert passage_from_row(short, 0, tok, 3, min_chars=3) == {
        "context": "wbb wbc", "target": "wbd", "whole_document": True
    }  # fmt: skip
    # a piece cut by the row's end is not a whole document
    assert passage_from_row(np.array([0, 3, 4, 6, 8, 9]), 0, tok, 3)["whole_document"] is False
    assert passage_from_row(np.array([0, 5, 10, 15, 7, 0]), 0, tok, 3) == "no_target_word"
    assert is_word("état") and not is_word("1990s") and not is_word("nation.")
    assert is_number("1,000") and is_number("3.5") and not is_number("1990s")


def test_period_order_by_range_start_and_year():
    manifest = {
        "splits": dict.fromkeys(["train", "holdout_2020s", "holdout_1999", "validation", "later"]),
        "config": {"split": {"holdout_ranges": {"holdout_2020s": ["2020-01-01", "2029-12-31"]}}},
    }
    assert period_order(manifest) == ["validation", "holdout_1999", "holdout_2020s", "later"]


def cloze_corpus(tmp_path: Path) -> Path:
    splits = {"train": 20, "validation": 30, "holdout_2001": 25, "holdout_1999": 12}
    return make_corpus(tmp_path / "corpus", vocab_size=48, seq_len=16, splits=splits, kind="ramp",
                       rows_per_shard=7, words=cloze_words(48))  # fmt: skip


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
            assert len(d["context"].split()) == 4 and d["target"].isalpha()
            assert d["split"] == split
        rows = [d["row"] for d in docs[split]]
        assert len(set(rows)) == len(rows)
        # number passages: from the same rows, kept apart, counted
        numbers = read_cloze(tmp_path / "out", numbers=True)[1][split]
        assert entry["number_passages"] == len(numbers) > 0
        assert all(d["target"].isdigit() for d in numbers)
        assert {d["row"] for d in numbers} <= set(range(entry["rows"]))
        assert entry["whole_documents"] == sum(d["whole_document"] for d in docs[split])
        assert entry["passages"] <= entry["rows_scanned"] <= entry["rows"]
        # every passage names the document it was cut from (ids of the split's index)
        ids = [d["document"] for d in docs[split]]
        assert all(0 <= i < entry["split_documents"] for i in ids)
        assert entry["documents"] == len(set(ids)) <= entry["passages"]
    # rows come from every shard of a split, not a prefix (validation: 30 rows in 5 shards)
    assert max(d["row"] for d in docs["validation"]) >= 14
    again = build_cloze(
        corpus, tmp_path / "again", ClozeConfig(n=10, words=5, seed=3, min_target_chars=2)
    )
    assert read_cloze(tmp_path / "again")[1] == docs and again["splits"] == info["splits"]
    build_cloze(corpus, tmp_path / "other", ClozeConfig(n=10, words=5, seed=4, min_target_chars=2))
    assert read_cloze(tmp_path / "other")[1] != docs
    yaml_text = (tmp_path / "out" / "temporal_cloze_holdout_1999.yaml").read_text()
    assert "tag: temporal_cloze\n" in yaml_text and "output_type: loglikelihood" in yaml_text
    assert str((tmp_path / "out" / "temporal_cloze_holdout_1999.jsonl").resolve()) in yaml_text
    numbers_yaml = (tmp_path / "out" / "temporal_cloze_numbers_holdout_1999.yaml").read_text()
    assert "tag: temporal_cloze_numbers\n" in numbers_yaml
    # a folder built by an older maskscale (format 1: any \w+ target) is not read
    info_file = tmp_path / "out" / "cloze.json"
    info_file.write_text(json.dumps({**info, "format": 1}))
    with pytest.raises(TaskError, match="rebuild"):
        read_cloze(tmp_path / "out")


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
        "holdout_2001": [{"context": "g h", "target": "i", "whole_document": True}],
    }

    def score(pairs):
        assert pairs == [("a b", " c"), ("d e", " f"), ("g h", " i")]
        return [(-1.0, True), (-3.0, False), (-2.0, False)]

    res = evaluate_cloze(docs, score)
    assert res["validation"]["acc"] == 0.5 and res["validation"]["n"] == 2
    assert res["validation"]["perplexity"] == pytest.approx(np.exp(2.0))
    assert res["holdout_2001"]["acc"] == 0.0 and res["holdout_2001"]["whole_documents"] == 1
    assert res["holdout_2001"]["acc_delta"] == -0.5 and res["validation"]["acc_delta"] is None
    png = plot_cloze(res, tmp_path / "c.png", "t", ppl={"validation": 10.0, "holdout_2001": 12.0})
    assert png.read_bytes()[:4] == b"\x89PNG"
    # under classifier-free guidance the target scores are not the model's likelihood
    guided = evaluate_cloze(docs, score, guided=True)["validation"]
    assert guided["cfg_perplexity"] == pytest.approx(np.exp(2.0))
    assert "perplexity" not in guided and "mean_logprob" not in guided


def test_cloze_intervals_per_period_and_for_the_difference_are_seeded_bootstraps():
    rng = np.random.default_rng(0)
    hits = {"validation": rng.random(200) < 0.6, "holdout_1999": rng.random(150) < 0.4}
    docs = {s: [{"context": "a", "target": "b"}] * len(h) for s, h in hits.items()}
    flat = [bool(x) for h in hits.values() for x in h]

    def score(pairs):
        return [(-1.0, g) for g in flat]

    res = evaluate_cloze(docs, score, n_boot=2000, seed=3)
    val, hold = res["validation"], res["holdout_1999"]
    for r, h in ((val, hits["validation"]), (hold, hits["holdout_1999"])):
        lo, hi = r["acc_ci"]
        se = np.sqrt(h.mean() * (1 - h.mean()) / len(h))  # the normal approximation
        assert lo < r["acc"] < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert hold["reference"] == val["reference"] == "validation"
    assert hold["acc_delta"] == pytest.approx(
        hits["holdout_1999"].mean() - hits["validation"].mean()
    )
    lo, hi = hold["acc_delta_ci"]
    se = np.hypot(
        np.std(hits["validation"]) / np.sqrt(200), np.std(hits["holdout_1999"]) / np.sqrt(150)
    )
    assert lo < hold["acc_delta"] < hi < 0 and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert evaluate_cloze(docs, score, n_boot=2000, seed=3) == res  # seeded
    other = evaluate_cloze(docs, score, n_boot=2000, seed=4)["holdout_1999"]
    assert other["acc_ci"] != hold["acc_ci"]
    # no validation split: the first period is the reference
    holdouts = {"holdout_1999": docs["holdout_1999"], "holdout_2001": docs["holdout_1999"]}
    later = evaluate_cloze(holdouts, lambda pairs: [(-1.0, True)] * len(pairs))
    assert later["holdout_2001"]["reference"] == "holdout_1999"
    assert later["holdout_2001"]["acc_delta"] == 0.0


def test_cloze_intervals_resample_documents_not_passages():
    """Ten documents of 20 passages each, every passage of a document right or every one wrong:
    there are 10 independent draws, not 200, so the interval over documents is far wider than
    the one over passages; under 5 documents there is no interval, and the reason says so."""
    rng = np.random.default_rng(1)
    doc_hits = rng.random(10) < 0.5
    passages = [
        {"context": "a", "target": "b", "document": d} for d in range(10) for _ in range(20)
    ]
    hits = [bool(doc_hits[p["document"]]) for p in passages]
    by_doc = evaluate_cloze({"validation": passages}, lambda pairs: [(-1.0, h) for h in hits])
    anonymous = [{"context": "a", "target": "b"} for _ in passages]  # each its own document
    by_row = evaluate_cloze({"validation": anonymous}, lambda pairs: [(-1.0, h) for h in hits])
    v, r = by_doc["validation"], by_row["validation"]
    assert v["acc"] == r["acc"] and v["documents"] == 10 and r["documents"] == 200
    p = doc_hits.mean()
    width = v["acc_ci"][1] - v["acc_ci"][0]
    assert width == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 10), rel=0.25)
    assert width > 3 * (r["acc_ci"][1] - r["acc_ci"][0])
    few = [{"context": "a", "target": "b", "document": d % 3} for d in range(30)]
    out = evaluate_cloze(
        {"validation": passages, "holdout_2001": few}, lambda pairs: [(-1.0, True)] * len(pairs)
    )["holdout_2001"]
    assert np.isnan(out["acc_ci"]).all() and "too few documents" in out["acc_ci_reason"]
    assert out["acc_delta"] is not None and "too few documents" in out["acc_delta_ci_reason"]
