"""Multiple choice among the study's people: the likelihood view of the reversal curse.

Why: sampling asks a model to *produce* a whole name or description exactly; a small model
that holds an association only in part scores 0 on "reference contained" whichever direction
it was trained in, and the sampled table cannot tell "knows nothing" from "cannot spell it
out". Berglund et al. also tested likelihoods (the correct name against random ones). Here
every test prompt is scored against every *candidate* answer of its test file - the file's
distinct references: the names of that group's people for description -> name, their
descriptions for name -> description - and the question is whether the true one has the
highest log-likelihood. Chance is 1 / candidates, so a model that carries the association
backwards scores above chance even when it cannot sample it, and one under the reversal curse
stays at chance. Candidates come from the same file, never from the other group: a model
prefers the names it was trained to *produce* in that position (the d2p people's, for a
description -> name question), which would push the reverse group below chance for reasons
that have nothing to do with the person asked about.

Scoring (``eval/measure/likelihood.py``): the continuation is the candidate followed by EOS
padding up to one *width* per test file, the longest candidate of that file + 1 ("the answer
slots read exactly this, then end"), after the prompt in the fine-tunes' ``sft.prompt_template``.
One width is what makes the candidates of a prompt comparable for the MDM: its chain rule
masks every slot after the one it scores, so a candidate scored as candidate + one EOS would be
read with as many masked slots as it has tokens - a shorter name predicted under other
conditions than a longer one (and, for a long prompt, after another cut of the context). At one
width every candidate is scored over the same slots, each slot under the same number of masks,
and the padding it ends with is what the MDM's fine-tune learnt (its SFT rows are EOS-padded
and, with ``sft.target=all``, the padding is a target, ``trainer/sft_data.py``). The ARM
scores its candidate + one EOS, log p(candidate, EOS | prompt), exactly: its conditions never
depend on later tokens, so padding would only add terms log p(EOS | ..., EOS) -- and its SFT
loss leaves padding out (issue 16), so those terms are untrained noise (-12 to -15 nats each on
the recorded run E's ARM), charged once per slot a candidate is shorter than the longest: that
penalty, not the facts, decided all 12 of that ARM's trained-direction misses. The ARM is exact; the MDM uses the chain-rule estimator (one
row per slot, deterministic), so the table is the same on every rerun, optionally with
unsupervised classifier-free guidance (``cfg_scale``; the study reports the MDM with and
without). The score is the total log-likelihood (no length normalisation: a candidate is the
whole answer, as in Berglund et al.).

A hit is the true answer ranked strictly first: one that ties with another candidate for the
highest score is not a hit (a model that scores every candidate alike knows nothing, and must
not score 100 %). ``rank`` is 1 + the candidates scored strictly higher (tied candidates share
the better rank) and ``ties`` the other candidates with exactly the true answer's score.

Cost: candidates x prompts requests of the file's width in chain-rule rows each (guidance
doubles the rows; the original dataset's 30 people per group against 300 prompts per file is
~10^5 rows per file: a GPU job at 1B; ``--no-choice`` skips it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from eval.studies.reversal.score import TEST_FILES


@dataclass(frozen=True)
class ChoiceCell:
    """One family's multiple-choice score on one test file."""

    family: str
    file: str
    n: int
    accuracy: float
    """Share of prompts (0-1) whose true answer alone has the highest log-likelihood (a tie for
    first is not a hit)."""
    chance: float
    """1 / number of candidates."""
    mean_rank: float
    """Mean rank of the true answer among the candidates (1 = best; ties share the better)."""
    p_value: float
    """One-sided binomial test: probability of at least this many first ranks by chance."""


def candidates(tests: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Test file -> its distinct references, in first-seen order."""
    return {
        stem: list(dict.fromkeys(r["completion"] for r in rows)) for stem, rows in tests.items()
    }


def padded_answers(
    ids: dict[str, list[int]], eos_id: int, pad: bool = True
) -> tuple[int, dict[str, list[int]]]:
    """The file's width (longest candidate + 1) and each candidate padded with EOS to it
    (``pad=False``, the ARM: each candidate + one EOS; module docstring)."""
    width = max(map(len, ids.values())) + 1
    return width, {c: t + [eos_id] * (width - len(t) if pad else 1) for c, t in ids.items()}


def rank_answers(
    loaded,
    tests: dict[str, list[dict]],
    template: str,
    progress: bool = True,
    cfg_scale: float = 0.0,
) -> dict[str, list[dict]]:
    """Per test file, one record per prompt: ``{prompt, completion, best, rank, ties, hit,
    n_candidates, width}``.

    ``loaded`` is an ``eval.measure.loading.LoadedModel``; ranks are by total log-likelihood of
    candidate + EOS padding to the file's width (an ARM: candidate + one EOS) given the
    templated prompt, with guidance ``cfg_scale`` for an MDM (module docstring).
    """
    from eval.measure.likelihood import LikelihoodConfig, Scorer

    tok = loaded.tokenizer
    lcfg = LikelihoodConfig(estimator="chain_rule", greedy=False, cfg_scale=cfg_scale)
    scorer = Scorer.from_loaded(loaded, lcfg)
    out: dict[str, list[dict]] = {}
    for stem, group in candidates(tests).items():
        rows = tests[stem]
        raw = {c: tok.encode(c, add_special_tokens=False).ids for c in group}
        width, ids = padded_answers(raw, loaded.eos_id, pad=not getattr(loaded, "causal", False))
        contexts = [
            tok.encode(template.format(prompt=r["prompt"]), add_special_tokens=False).ids
            for r in rows
        ]
        pairs = [(ctx, ids[c]) for ctx in contexts for c in group]
        scores = [res.logprob for res in scorer.loglikelihood(pairs, progress=progress)]
        out[stem] = [
            _ranked(r, group, scores[i * len(group) : (i + 1) * len(group)], width)
            for i, r in enumerate(rows)
        ]
    return out


def _ranked(row: dict, group: list[str], scores: list[float], width: int) -> dict:
    """One prompt's record from its candidates' scores (a tie for first is not a hit)."""
    mine = group.index(row["completion"])
    truth = scores[mine]
    rank = 1 + sum(s > truth for s in scores)
    ties = sum(s == truth for i, s in enumerate(scores) if i != mine)
    best = group[max(range(len(group)), key=scores.__getitem__)]
    return {
        "prompt": row["prompt"], "completion": row["completion"], "best": best, "rank": rank,
        "ties": ties, "hit": rank == 1 and ties == 0, "n_candidates": len(group), "width": width,
    }  # fmt: skip


def score_choices(family: str, file: str, records: Iterable[dict]) -> ChoiceCell:
    """A ChoiceCell from ``rank_answers`` records of one file."""
    rows = list(records)
    if not rows:
        raise ValueError(f"{family} {file}: no ranked answers to score")
    missing = sorted({k for r in rows for k in ("hit", "rank", "n_candidates") if k not in r})
    if missing:
        raise ValueError(f"{family} {file}: ranked answers lack {missing} (from rank_answers)")
    n, hits, chance = len(rows), sum(bool(r["hit"]) for r in rows), 1.0 / rows[0]["n_candidates"]
    return ChoiceCell(
        family, file, n, accuracy=hits / n, chance=chance,
        mean_rank=sum(r["rank"] for r in rows) / n, p_value=binomial_tail(hits, n, chance),
    )  # fmt: skip


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how often chance alone ranks k or more first.

    Prompts of one person are not independent draws (five templates of one fact), so read it
    as a guide, not a proof; the study's n is small enough for the exact sum."""
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def choice_metrics(cells: list[ChoiceCell]) -> dict[str, float]:
    """Flat MLflow metrics ``<family>/<file>/choice`` and ``<family>/reverse/choice``."""
    out: dict[str, float] = {}
    for c in cells:
        out[f"{c.family}/{c.file}/choice"] = c.accuracy
    for family in sorted({c.family for c in cells}):
        rev = [
            c.accuracy for c in cells if c.family == family and TEST_FILES[c.file][1] == "reverse"
        ]
        if rev:
            out[f"{family}/reverse/choice"] = sum(rev) / len(rev)
    return out


def choice_table(cells: list[ChoiceCell]) -> str:
    """Rows = test files; per family the accuracy (%), mean rank and the binomial p against
    chance (``binomial_tail``); chance per row."""
    families = sorted({c.family for c in cells})
    head = ["question (direction)", "test file", "n", "candidates", "chance %"]
    for f in families:
        head += [f"{f.upper()} choice %", f"{f.upper()} mean rank", f"{f.upper()} p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for file, (question, direction) in TEST_FILES.items():
        by = {c.family: c for c in cells if c.file == file}
        if not by:
            continue
        first = next(iter(by.values()))
        row = [f"{question} ({direction})", f"`{file}`", str(first.n)]
        row += [str(round(1 / first.chance)), f"{100 * first.chance:.1f}"]
        for f in families:
            c = by.get(f)
            row += ["-"] * 3 if c is None else [
                f"{100 * c.accuracy:.1f}", f"{c.mean_rank:.1f}", f"{c.p_value:.2g}"
            ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
