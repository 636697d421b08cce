"""Zero-shot task data: text -> token pairs, local multiple-choice files, their metrics.

Why a module of its own: the lm-evaluation-harness model classes (``eval/zeroshot/harness.py``), the
local multiple-choice runner (``maskscale eval mc``) and the temporal cloze task
(``cloze``) must split a (context, continuation) pair into tokens *the same way*, or the
same question would score differently through the harness and through the direct runners. The
split is the harness's standard one: whitespace at the end of the context moves to the
continuation, the whole string is encoded once, and the continuation is the tail of the whole
encoding after the context's own encoding (so a BPE merge across the boundary never produces
tokens that the model would not see on the full text).

Two rules of our own on top of it:

* **EOS before every context.** Every training document follows an EOS (the corpus joins
  documents with it), so a text scored without one is off the training distribution. Both
  encodings start with the EOS id, once: a text whose own tokens already start with it (a
  literal special token at its start) gets no second one. An empty context is therefore the
  EOS alone, as the harness's ``prefix_token_id`` makes it.
* **A continuation always has a token.** The split point is where the whole encoding and the
  context's encoding stop agreeing (a BPE token that spans the join, ``"Ans" + "wer"``, moves
  the context's last token into the continuation), and at least one token before the end: a
  continuation that tokenises to nothing (``""``, or text that merges into the context's last
  token) scores the context's last token given the tokens before it instead of stopping the
  run. lm-evaluation-harness 0.4.12-0.4.13's HFLM stops with ``assert len(continuation_enc) >
  0`` there; only a pair whose context *and* continuation are both empty is refused.

A local multiple-choice file is JSON lines ``{"context": str, "choices": [str, ...], "label":
int}``. Each choice is scored as ``context`` + ``delimiter`` + ``choice`` (the harness's
``target_delimiter``, a space by default). ``acc`` takes the choice with the highest
log-likelihood; ``acc_norm`` divides each log-likelihood by the choice's length in characters
(or bytes with ``norm="bytes"``), like the harness's ``acc_norm`` / ``acc_bytes``. Ties go to the
first choice, as with ``numpy.argmax``. A bad line stops the run with an error naming the file,
line and field: a multiple-choice file is small and hand-made, so silently skipping questions
would change the score without anyone noticing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ScoreFn = Callable[[list[tuple[str, str]]], list[tuple[float, bool]]]
"""Text-level scorer: (context, continuation) pairs -> (log-likelihood, is_greedy) each."""


class TaskError(ValueError):
    """Bad task data or arguments; the message names the file, line and field to fix."""


# ----------------------------------------------------------------------------- tokenisation


def encode_pair(tokenizer, context: str, continuation: str, eos_id: int) -> tuple[list, list]:
    """(context ids, continuation ids) the harness's way, with the module docstring's two rules.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; special tokens are never added by it (the
    packed corpus has none but EOS, added here). Raises ``TaskError`` when both are empty.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = document_ids(tokenizer, context + continuation, eos_id)
    context_ids = document_ids(tokenizer, context, eos_id)
    if len(whole) < 2:
        raise TaskError(
            f"context {context!r} and continuation {continuation!r} hold no token to score; "
            "give the request some text"
        )
    split = 0
    while split < min(len(whole) - 1, len(context_ids)) and whole[split] == context_ids[split]:
        split += 1
    return whole[:split], whole[split:]


def document_ids(tokenizer, text: str, eos_id: int) -> list[int]:
    """``text``'s ids after the EOS that starts every document (not doubled if it has one)."""
    ids = _ids(tokenizer, text)
    return ids if ids[:1] == [eos_id] else [eos_id, *ids]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


# ----------------------------------------------------------------------------- MC files


@dataclass(frozen=True)
class McDoc:
    """One multiple-choice question of a local JSONL file."""

    context: str
    choices: tuple[str, ...]
    label: int
    line: int
    """1-based line number in the file (for reports)."""


def read_mc_jsonl(path: str | Path) -> list[McDoc]:
    """Parse and validate a ``{context, choices, label}`` JSONL file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file; pass a JSONL file of {{context, choices, label}}")
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                docs.append(_parse_mc_line(line, f"{path}:{lineno}", lineno))
    if not docs:
        raise TaskError(f"{path}: no questions (every line is empty)")
    return docs


def _parse_mc_line(line: str, where: str, lineno: int) -> McDoc:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object {{context, choices, label}}")
    for field in ("context", "choices", "label"):
        if field not in obj:
            raise TaskError(f"{where}: field '{field}' is missing")
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(context, str):
        raise TaskError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise TaskError(f"{where}: field 'choices' must be a list of at least 2 strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise TaskError(f"{where}: field 'choices' item {i} must be a non-empty string")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise TaskError(
            f"{where}: field 'label' must be an integer index into choices "
            f"(0..{len(choices) - 1}), got {label!r}"
        )
    return McDoc(context, tuple(choices), label, lineno)


def mc_requests(docs: Sequence[McDoc], delimiter: str = " ") -> list[tuple[str, str]]:
    """Every (context, delimiter + choice) pair, question by question, choice by choice."""
    return [(d.context, delimiter + c) for d in docs for c in d.choices]


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt(n)), as the harness reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def score_mc(
    docs: Sequence[McDoc], score: ScoreFn, delimiter: str = " ", norm: str = "chars"
) -> dict:
    """acc / acc_norm (with standard errors) and per-question predictions.

    ``score`` gets all pairs at once, so it can pack them into as few forward passes as it likes.
    """
    if norm not in ("chars", "bytes"):
        raise TaskError(f"norm must be 'chars' or 'bytes', got {norm!r}")
    results = score(mc_requests(docs, delimiter))
    if len(results) != sum(len(d.choices) for d in docs):
        raise RuntimeError("scorer returned a different number of results than requests")
    acc, acc_norm, per_doc, pos = [], [], [], 0
    for doc in docs:
        lls = [float(r[0]) for r in results[pos : pos + len(doc.choices)]]
        pos += len(doc.choices)
        sizes = [len(c) if norm == "chars" else len(c.encode("utf-8")) for c in doc.choices]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / size for ll, size in zip(lls, sizes)])
        acc.append(float(pred == doc.label))
        acc_norm.append(float(pred_norm == doc.label))
        per_doc.append(
            {"line": doc.line, "label": doc.label, "pred": pred, "pred_norm": pred_norm, "ll": lls}
        )
    return {
        "n": len(docs),
        "acc": sum(acc) / len(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "norm": norm,
        "docs": per_doc,
    }
