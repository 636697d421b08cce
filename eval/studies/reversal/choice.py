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

Scoring (``eval/measure/likelihood.py``): the continuation is the candidate followed by EOS ("the
answer is exactly this"), after the prompt in the fine-tunes' ``sft.prompt_template``. The ARM
is exact; the MDM uses the chain-rule estimator (one row per answer token, deterministic), so
the table is the same on every rerun. The score is the total log-likelihood (no length
normalisation: a candidate is the whole answer, as in Berglund et al.).

Cost: candidates x prompts requests, chain-rule rows = answer tokens each (the original
dataset's 30 people per group against 300 prompts per file is ~10^5 rows per file: a GPU job
at 1B; ``--no-choice`` skips it).
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
    """Share of prompts (0-1) whose true answer has the highest log-likelihood."""
    chance: float
    """1 / number of candidates."""
    mean_rank: float
    """Mean rank of the true answer among the candidates (1 = best)."""
    p_value: float
    """One-sided binomial test: probability of at least this many first ranks by chance."""


def candidates(tests: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Test file -> its distinct references, in first-seen order."""
    return {
        stem: list(dict.fromkeys(r["completion"] for r in rows)) for stem, rows in tests.items()
    }


def rank_answers(loaded, tests: dict[str, list[dict]], template: str, progress: bool = True):
    """Per test file, one record per prompt: ``{prompt, completion, best, rank, n_candidates}``.

    ``loaded`` is an ``eval.measure.loading.LoadedModel``; ranks are by total log-likelihood of
    candidate + EOS given the templated prompt (module docstring).
    """
    from eval.measure.likelihood import LikelihoodConfig, Scorer

    tok = loaded.tokenizer
    scorer = Scorer.from_loaded(loaded, LikelihoodConfig(estimator="chain_rule", greedy=False))
    options = candidates(tests)
    ids = {
        c: tok.encode(c, add_special_tokens=False).ids + [loaded.eos_id]
        for group in options.values()
        for c in group
    }
    out: dict[str, list[dict]] = {}
    for stem, rows in tests.items():
        group = options[stem]
        contexts = [
            tok.encode(template.format(prompt=r["prompt"]), add_special_tokens=False).ids
            for r in rows
        ]
        pairs = [(ctx, ids[c]) for ctx in contexts for c in group]
        scores = [res.logprob for res in scorer.loglikelihood(pairs, progress=progress)]
        out[stem] = []
        for i, r in enumerate(rows):
            mine = scores[i * len(group) : (i + 1) * len(group)]
            truth = mine[group.index(r["completion"])]
            best = group[max(range(len(group)), key=mine.__getitem__)]
            rank = 1 + sum(s > truth for s in mine)
            out[stem].append(
                {"prompt": r["prompt"], "completion": r["completion"], "best": best,
                 "rank": rank, "n_candidates": len(group)}
            )  # fmt: skip
    return out


def score_choices(family: str, file: str, records: Iterable[dict]) -> ChoiceCell:
    """A ChoiceCell from ``rank_answers`` records of one file."""
    rows = list(records)
    if not rows:
        raise ValueError(f"{family} {file}: no ranked answers to score")
    n, hits, chance = len(rows), sum(r["rank"] == 1 for r in rows), 1.0 / rows[0]["n_candidates"]
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
