"""The ``sft`` section of the training config (``task=sft``), kept apart from the reader.

Why its own module: ``trainer/config.py`` nests this dataclass, and the config must stay cheap
to import (no torch, no Arrow); the reader that uses it is ``trainer/sft_data.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.configlib import ConfigError


@dataclass
class SFTConfig:
    """Fine-tuning data and options (used when ``task=sft``)."""

    data: str = ""
    """Training JSONL: prompt/response (or completion) records or ShareGPT conversations."""
    validation: str | None = None
    """Validation JSONL in the same formats; null = hold out ``val_fraction`` of ``data``."""
    val_fraction: float = 0.05
    """Share of ``data`` held out for validation when ``validation`` is null (0 = none)."""
    epochs: float | None = None
    """Budget in passes over the training records (steps = ceil(epochs * rows /
    global_batch)); replaces budget.steps/tokens/flops. null = use the budget section."""
    turns: Literal["first", "all"] = "first"
    """ShareGPT: first = the first human -> assistant exchange only; all = every turn packed
    into one row, every assistant answer a target."""
    target: Literal["answer", "all"] = "answer"
    """answer = loss on answer tokens (and their EOS padding) only, prompts kept clean;
    all = every token is a target (the unconditional loss on prompt + answer)."""
    prompt_template: str = "{prompt}"
    """Format of each prompt / user turn before tokenization, e.g. "Q: {prompt}\\nA:"."""
    seq_len: int | Literal["auto"] | None = "auto"
    """Row width in tokens, at most the init model's seq_len (rotary positions are relative,
    so shorter rows need no new weights). auto (default) = the longest record (prompt +
    answer + EOS) rounded up to a multiple of 8; null = the model's. Short records padded to a
    long context waste the step (a 200-token answer in a 2048-token row is ~90% padding), and
    the MDM, which keeps EOS padding as a target, would spend most of its loss on it."""
    cfg_prompt_drop: float = 0.0
    """MDM: probability that a row's whole prompt is replaced by mask tokens (standard
    classifier-free-guidance training; the paper uses 0.1)."""

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("sft.data: required with task=sft; pass sft.data=FILE.jsonl")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"sft.val_fraction: in [0, 1), got {self.val_fraction}")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise ConfigError(f"sft.epochs: a number > 0 (or null), got {self.epochs}")
        if not 0 <= self.cfg_prompt_drop <= 1:
            raise ConfigError(f"sft.cfg_prompt_drop: in [0, 1], got {self.cfg_prompt_drop}")
        if self.seq_len not in (None, "auto") and (
            not isinstance(self.seq_len, int) or self.seq_len < 1
        ):
            raise ConfigError(f"sft.seq_len: an integer >= 1, auto or null, got {self.seq_len!r}")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(
                f"sft.prompt_template: must contain {{prompt}}, got {self.prompt_template!r}"
            )
