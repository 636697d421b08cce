"""Scoring and reporting of the reversal-curse study (``maskscale study reverse``).

Why its own module: the metrics must be checkable on hand-written examples without a model,
and the report (table, JSON, plot) must not depend on how the answers were produced.

Metrics (paper-notes.md, "Reversal curse"):

* **contained**: the reference, normalised (lower case, runs of whitespace collapsed, leading
  and trailing spaces and punctuation dropped: Berglund et al.'s descriptions end with a
  period, a model that stops before it still answered), occurs in the normalised output. This
  is the paper's metric, for both question types.
* **BLEU** (name -> description questions only; a name is too short for n-gram overlap to mean
  anything): sentence BLEU of the output against the reference, 0-100, sacreBLEU's
  ``sentence_bleu`` (13a tokenisation, exponential smoothing) on the lower-cased texts.

The four test files of Berglund et al.'s layout and what each asks (``TEST_FILES``): p2d
people were trained name -> description, so ``p2d_prompts_test`` asks the trained direction
and ``p2d_reverse_prompts_test`` asks description -> name; the d2p files mirror that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

N2D, D2N = "name→description", "description→name"
TEST_FILES = {
    "p2d_prompts_test": (N2D, "trained"),
    "d2p_prompts_test": (D2N, "trained"),
    "p2d_reverse_prompts_test": (D2N, "reverse"),
    "d2p_reverse_prompts_test": (N2D, "reverse"),
}
"""Test file stem -> (question, direction relative to training)."""
EDGE = " \t\n.,;:!?\"'"


def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped."""
    return re.sub(r"\s+", " ", text).strip().lower()


def contained(reference: str, output: str) -> bool:
    """Whether the normalised reference (edge punctuation dropped) occurs in the output."""
    ref = normalise(reference).strip(EDGE)
    return bool(ref) and ref in normalise(output)


def bleu(reference: str, output: str) -> float:
    """Sentence BLEU (0-100) of ``output`` against ``reference``, both lower-cased."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(effective_order=True)
    return float(scorer.sentence_score(normalise(output), [normalise(reference)]).score)


@dataclass(frozen=True)
class Cell:
    """One family's score on one test file."""

    family: str
    file: str
    question: str
    direction: str
    n: int
    contained: float
    """Share of prompts (0-1) whose reference is contained in the output."""
    bleu: float | None
    """Mean sentence BLEU (0-100) for name -> description questions, else None."""

    @property
    def label(self) -> str:
        return f"{self.question} ({self.direction})"


def score_file(family: str, file: str, answers: Iterable[dict]) -> Cell:
    """A Cell from records holding ``completion`` (the reference) and ``answer``."""
    rows = list(answers)
    if not rows:
        raise ValueError(f"{family} {file}: no answers to score")
    question, direction = TEST_FILES[file]
    hits = [contained(r["completion"], r["answer"]) for r in rows]
    scores = [bleu(r["completion"], r["answer"]) for r in rows] if question == N2D else None
    mean_bleu = None if scores is None else sum(scores) / len(scores)
    return Cell(family, file, question, direction, len(rows), sum(hits) / len(rows), mean_bleu)


def metrics_of(cells: list[Cell]) -> dict[str, float]:
    """Flat MLflow metrics: ``<family>/<file>/contained`` (and ``/bleu``)."""
    out: dict[str, float] = {}
    for c in cells:
        out[f"{c.family}/{c.file}/contained"] = c.contained
        if c.bleu is not None:
            out[f"{c.family}/{c.file}/bleu"] = c.bleu
    for family in sorted({c.family for c in cells}):
        rev = [c.contained for c in cells if c.family == family and c.direction == "reverse"]
        if rev:
            out[f"{family}/reverse/contained"] = sum(rev) / len(rev)
    return out


def markdown_table(cells: list[Cell]) -> str:
    """Rows = test files, columns = contained % and BLEU per family."""
    families = sorted({c.family for c in cells})
    head = ["question (direction)", "test file", "n"]
    for f in families:
        head += [f"{f.upper()} contained %", f"{f.upper()} BLEU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for file in TEST_FILES:
        row = [c for c in cells if c.file == file]
        if not row:
            continue
        by = {c.family: c for c in row}
        out = [row[0].label, f"`{file}`", str(row[0].n)]
        for f in families:
            c = by.get(f)
            out += ["-", "-"] if c is None else [f"{100 * c.contained:.1f}", _bleu_text(c.bleu)]
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _bleu_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def bar_plot(
    cells: list[Cell], path: Path, title: str = "Reversal curse", choices: list | None = None
) -> Path:
    """Grouped bars: one group per test file (question, direction), one bar per family; with
    ``choices`` (``choice.ChoiceCell``) a second panel of multiple-choice accuracy,
    chance marked per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if choices else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 4), squeeze=False)
    _bars(axes[0][0], {(c.family, c.file): c.contained for c in cells})
    axes[0][0].set_ylabel("reference contained in output (%)")
    axes[0][0].set_title(title)
    if choices:
        ax = axes[0][1]
        xs = _bars(ax, {(c.family, c.file): c.accuracy for c in choices})
        chance = {c.file: c.chance for c in choices}
        for x, file in xs:
            ax.hlines(100 * chance[file], x - 0.4, x + 0.4, colors="k", linestyles=":")
        ax.set_ylabel("true answer ranked first (%)")
        ax.set_title("Multiple choice by likelihood (dotted: chance)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(ax, values: dict[tuple[str, str], float]) -> list[tuple[float, str]]:
    """One bar per (family, file) share in ``values``; returns each group's (x, file)."""
    import numpy as np

    files = [f for f in TEST_FILES if any(k[1] == f for k in values)]
    families = sorted({k[0] for k in values})
    width = 0.8 / max(len(families), 1)
    x = np.arange(len(files))
    for i, fam in enumerate(families):
        heights = [100 * values.get((fam, f), 0.0) for f in files]
        bars = ax.bar(x + (i - (len(families) - 1) / 2) * width, heights, width, label=fam.upper())
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    labels = [f"{TEST_FILES[f][0]}\n({TEST_FILES[f][1]})" for f in files]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.legend()
    return list(zip(x.tolist(), files, strict=True))
