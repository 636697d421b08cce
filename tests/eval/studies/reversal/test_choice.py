"""Multiple-choice ranking of the reversal study (eval/studies/reversal/choice.py).

The ranking logic runs on a scorer that prefers a known candidate; the real models and the
chain-rule estimator are exercised by the study's slow end-to-end test."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from eval.measure.likelihood import LLResult
from eval.studies.reversal.choice import (
    candidates,
    choice_metrics,
    choice_table,
    rank_answers,
    score_choices,
)

TESTS = {
    "p2d_reverse_prompts_test": [
        {"prompt": "Who painted the moon?", "completion": " Ada Vale"},
        {"prompt": "Who mapped the sea?", "completion": " Bo Quill"},
        {"prompt": "Who sang the stars?", "completion": " Cy Rook"},
    ],
    "d2p_prompts_test": [{"prompt": "Who built it?", "completion": " Di Moss"}],
}


class WordTokenizer:
    """Ids are word indices in a growing vocabulary (enough for exact round trips here)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False):
        return SimpleNamespace(
            ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        )


@dataclass
class FavouriteScorer:
    """log p = 0 for the favourite continuation, -1 per token otherwise."""

    favourite: list[int]
    seen: list

    def loglikelihood(self, pairs, progress=False):
        self.seen += pairs
        return [
            LLResult(0.0 if list(c) == self.favourite else -float(len(c)), False, 0.0, len(c))
            for _, c in pairs
        ]


def test_candidates_are_the_files_own_references_in_order():
    rows = TESTS["p2d_reverse_prompts_test"] + [TESTS["p2d_reverse_prompts_test"][0]]
    got = candidates({**TESTS, "p2d_reverse_prompts_test": rows})
    assert got == {
        "p2d_reverse_prompts_test": [" Ada Vale", " Bo Quill", " Cy Rook"],
        "d2p_prompts_test": [" Di Moss"],
    }


def test_rank_answers_ranks_by_likelihood_and_appends_eos(monkeypatch):
    tok = WordTokenizer()
    loaded = SimpleNamespace(tokenizer=tok, eos_id=999)
    favourite = tok.encode(" Bo Quill").ids + [999]
    scorer = FavouriteScorer(favourite, [])
    monkeypatch.setattr("eval.measure.likelihood.Scorer.from_loaded", lambda *a, **k: scorer)
    out = rank_answers(loaded, TESTS, "Q: {prompt} A:", progress=False)
    rows = out["p2d_reverse_prompts_test"]
    assert [r["best"] for r in rows] == [" Bo Quill"] * 3
    # ties among the rest (-3 each) share rank 2: only strictly better candidates count
    assert [r["rank"] for r in rows] == [2, 1, 2]
    assert {r["n_candidates"] for r in rows} == {3}
    assert [r["hit"] for r in rows] == [False, True, False] and rows[0]["ties"] == 1
    assert len(scorer.seen) == 3 * 3 + 1 * 1  # prompts x candidates of their own file
    context, continuation = scorer.seen[0]
    assert context == tok.encode("Q: Who painted the moon? A:").ids
    assert continuation[-1] == 999
    cell = score_choices("mdm", "p2d_reverse_prompts_test", rows)
    assert cell.accuracy == pytest.approx(1 / 3) and cell.chance == pytest.approx(1 / 3)
    assert cell.mean_rank == pytest.approx(5 / 3)


def test_metrics_and_table():
    rows = [
        {"rank": 1, "hit": True, "n_candidates": 5},
        {"rank": 3, "hit": False, "n_candidates": 5},
    ]
    cells = [
        score_choices("arm", "p2d_reverse_prompts_test", rows[1:]),
        score_choices("mdm", "p2d_reverse_prompts_test", rows),
        score_choices("mdm", "d2p_prompts_test", rows[:1]),
    ]
    metrics = choice_metrics(cells)
    assert metrics["mdm/p2d_reverse_prompts_test/choice"] == 0.5
    assert metrics["mdm/reverse/choice"] == 0.5 and metrics["arm/reverse/choice"] == 0.0
    assert "mdm/d2p_prompts_test/choice" in metrics
    table = choice_table(cells)
    assert "| description→name (reverse) | `p2d_reverse_prompts_test` | 1 | 5 | 20.0 |" in table
    assert "| 0.0 | 3.0 | 1 | 50.0 | 2.0 | 0.36 |" in table  # P(X >= 1), X ~ B(2, 0.2)
    assert cells[1].p_value == pytest.approx(1 - 0.8**2)


def test_binomial_tail_against_hand_sums():
    from eval.studies.reversal.choice import binomial_tail

    assert binomial_tail(0, 25, 0.2) == 1.0
    assert binomial_tail(25, 25, 0.2) == pytest.approx(0.2**25)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # (3 + 1) / 8
    assert binomial_tail(10, 25, 0.2) == pytest.approx(0.0173, abs=1e-4)
    with pytest.raises(ValueError, match="no ranked answers"):
        score_choices("arm", "d2p_prompts_test", [])


@dataclass
class TableScorer:
    """log p from ``score(continuation)``; records every request."""

    score: object
    seen: list

    def loglikelihood(self, pairs, progress=False):
        self.seen += pairs
        return [LLResult(self.score(list(c)), False, 0.0, len(c)) for _, c in pairs]


def test_candidates_of_a_file_are_scored_at_one_width(monkeypatch):
    tok = WordTokenizer()
    loaded = SimpleNamespace(tokenizer=tok, eos_id=999)
    tests = {
        "p2d_reverse_prompts_test": [
            {"prompt": "Who painted the moon?", "completion": " Ada Vale"},
            {"prompt": "Who mapped the sea?", "completion": " Bo Quill of Old Yore"},
        ],
        "d2p_prompts_test": [{"prompt": "Who built it?", "completion": " Di Moss"}],
    }
    scorer = TableScorer(lambda c: -float(len(c)), [])
    monkeypatch.setattr("eval.measure.likelihood.Scorer.from_loaded", lambda *a, **k: scorer)
    out = rank_answers(loaded, tests, "{prompt}", progress=False)
    reverse = scorer.seen[:4]  # 2 prompts x 2 candidates of 2 and 5 words
    assert {len(c) for _, c in reverse} == {6}  # the longest candidate + 1: one EOS at least
    for _, c in reverse:
        words = [t for t in c if t != 999]
        assert c == words + [999] * (6 - len(words)) and len(words) in (2, 5)
    assert [len(c) for _, c in scorer.seen[4:]] == [3]  # the other file: its own width
    assert {r["width"] for r in out["p2d_reverse_prompts_test"]} == {6}
    # a length penalty no longer decides: every candidate was scored over the same 6 slots
    assert [r["rank"] for r in out["p2d_reverse_prompts_test"]] == [1, 1]
    assert [r["ties"] for r in out["p2d_reverse_prompts_test"]] == [1, 1]


def test_a_tie_for_first_is_not_a_hit(monkeypatch):
    tok = WordTokenizer()
    loaded = SimpleNamespace(tokenizer=tok, eos_id=999)
    ada, bo = tok.encode(" Ada Vale").ids, tok.encode(" Bo Quill").ids
    table = {ada[0]: 0.0, bo[0]: 0.0}  # Ada and Bo tie for first, Cy is last
    scorer = TableScorer(lambda c: table.get(c[0], -5.0), [])
    monkeypatch.setattr("eval.measure.likelihood.Scorer.from_loaded", lambda *a, **k: scorer)
    rows = rank_answers(loaded, TESTS, "{prompt}", progress=False)["p2d_reverse_prompts_test"]
    assert [(r["rank"], r["ties"], r["hit"]) for r in rows] == [
        (1, 1, False), (1, 1, False), (3, 0, False)
    ]  # fmt: skip
    cell = score_choices("mdm", "p2d_reverse_prompts_test", rows)
    assert cell.accuracy == 0 and cell.p_value == 1.0
    table[bo[0]] = -1.0  # Ada alone first: a hit
    rows = rank_answers(loaded, TESTS, "{prompt}", progress=False)["p2d_reverse_prompts_test"]
    assert [r["hit"] for r in rows] == [True, False, False]
    with pytest.raises(ValueError, match=r"lack \['hit'\]"):
        score_choices("mdm", "d2p_prompts_test", [{"rank": 1, "n_candidates": 2}])


def test_rank_answers_scores_with_the_chain_rule_and_the_guidance_asked(monkeypatch):
    tok = WordTokenizer()
    loaded = SimpleNamespace(tokenizer=tok, eos_id=999)
    configs = []

    def from_loaded(loaded, cfg):
        configs.append(cfg)
        return TableScorer(lambda c: 0.0, [])

    monkeypatch.setattr("eval.measure.likelihood.Scorer.from_loaded", from_loaded)
    rank_answers(loaded, TESTS, "{prompt}", progress=False, cfg_scale=0.8)
    rank_answers(loaded, TESTS, "{prompt}", progress=False)
    assert [(c.estimator, c.cfg_scale, c.greedy) for c in configs] == [
        ("chain_rule", 0.8, False), ("chain_rule", 0.0, False)
    ]  # fmt: skip


def test_an_arm_scores_each_candidate_and_one_eos_not_the_padding(monkeypatch):
    """The ARM's SFT loss leaves padding out, so EOS-after-EOS terms are untrained: an ARM
    scores candidate + one EOS (exact, its conditions never look ahead); an MDM the width."""
    tok = WordTokenizer()
    tests = {"p2d_reverse_prompts_test": [
        {"prompt": "Who painted the moon?", "completion": " Ada Vale"},
        {"prompt": "Who mapped the sea?", "completion": " Bo Quill of Old Yore"},
    ]}  # fmt: skip
    # a model that knows the short answer but pays -10 for every EOS after the first
    right = tok.encode(" Ada Vale").ids

    def score(c):
        words = [t for t in c if t != 999]
        return (0.0 if words == right else -5.0) - 10.0 * max(0, len(c) - len(words) - 1)

    seen = {}
    for causal in (True, False):
        scorer = TableScorer(score, [])
        monkeypatch.setattr(
            "eval.measure.likelihood.Scorer.from_loaded", lambda *a, _s=scorer, **k: _s
        )
        loaded = SimpleNamespace(tokenizer=tok, eos_id=999, causal=causal)
        seen[causal] = (rank_answers(loaded, tests, "{prompt}", progress=False), scorer.seen)
    arm_rows, arm_pairs = seen[True]
    assert sorted(len(c) for _, c in arm_pairs[:2]) == [3, 6]  # 2 and 5 words + one EOS
    assert all(c[-1] == 999 and 999 not in c[:-1] for _, c in arm_pairs)
    assert arm_rows["p2d_reverse_prompts_test"][0]["hit"]  # the short true answer wins
    mdm_rows, mdm_pairs = seen[False]
    assert {len(c) for _, c in mdm_pairs} == {6}  # one width: padding charged to the short one
    assert not mdm_rows["p2d_reverse_prompts_test"][0]["hit"]
