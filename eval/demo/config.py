"""Settings of ``maskscale demo``, read from ``configs/demo.yaml`` (one place to change them).

Why a file: the demo's training budget, learning rate and batch decide whether the MDM leaves
the unigram plateau (issue 10), and they are measured elsewhere; whoever measures them changes
``configs/demo.yaml``, not code. Its ``quick:`` section is applied on top with ``--quick`` (a
short variant for tests and a first look), and ``key=value`` arguments of ``maskscale demo``
override either (e.g. ``train.flops=1e13 eval.rows=0``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.configlib import ConfigError, apply_overrides, flatten, from_dict, read_yaml

DEFAULT = "demo.yaml"
"""The demo's settings file inside the config folder (pipeline/configdir.py)."""
FAMILIES = ("arm", "mdm")


@dataclass
class DemoTrain:
    """How the two tiny models are trained (both through ``maskscale train``)."""

    recipe: str = "train/tiny-cpu.yaml"
    """Train recipe: a path, or a file in the config folder."""
    flops: float = 3e12
    """Training FLOP budget C of each model (6 N D): both families get the same compute."""
    set: dict[str, Any] = field(default_factory=dict)
    """Overrides of the recipe for both runs, e.g. ``{optim.lr: 1.0e-3, batch.global_batch: 32}``
    (nested mappings or dotted keys)."""
    arm: dict[str, Any] = field(default_factory=dict)
    """Overrides for the ARM run only (applied after ``set``)."""
    mdm: dict[str, Any] = field(default_factory=dict)
    """Overrides for the MDM run only (applied after ``set``)."""
    parallel: bool | None = None
    """Train the two runs at once, one process and half the cores each (eval/demo/train.py);
    null = when this process may use at least 2 cores. false = one after the other, in this
    process."""

    def overrides(self, family: str) -> list[str]:
        """``key=value`` strings for ``family``'s run."""
        merged = {**flatten(self.set), **flatten(getattr(self, family))}
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in merged.items()]


@dataclass
class DemoEval:
    """How the trained models are measured."""

    rows: int = 64
    """Rows per split scored by ``eval ppl`` / ``eval temporal`` (0 = every row)."""
    mc_samples: int = 16
    """MDM ELBO draws of t per row."""
    batch_size: int = 8
    """Rows per forward pass."""
    bootstrap: int = 1000
    """Bootstrap resamples of the 95% intervals."""
    cloze_passages: int = 50
    """Temporal cloze passages per period (0 skips the cloze task)."""
    cloze_words: int = 40
    """Words per cloze passage, the target included."""
    samples: int = 3
    """Prompts sampled from each model (0 skips sampling)."""
    sample_length: int = 48
    """New tokens per sample."""
    sample_steps: int | None = None
    """MDM reverse-process steps (None = one per token)."""
    temperature: float = 0.8
    """Sampling temperature (0 = greedy)."""
    prompts: list[str] = field(
        default_factory=lambda: [
            "The state of the Union is",
            "Our economy",
            "My fellow citizens,",
        ]
    )
    """Prompts, used in order (the first ``samples`` of them)."""


@dataclass
class DemoConfig:
    """Everything ``maskscale demo`` does, apart from where (``--dir``)."""

    corpus: str = "corpus/sotu.yaml"
    """Corpus recipe (the embedded State of the Union dump is its input)."""
    corpus_set: dict[str, Any] = field(default_factory=dict)
    """Overrides of the corpus recipe (e.g. ``{tokenizer.vocab_size: 2048}``)."""
    experiment: str = "maskscale-demo"
    """MLflow experiment of both runs."""
    train: DemoTrain = field(default_factory=DemoTrain)
    eval: DemoEval = field(default_factory=DemoEval)
    quick: dict[str, Any] = field(default_factory=dict)
    """Settings replaced under ``--quick`` (same layout as this file)."""

    def validate(self) -> None:
        if not self.train.flops > 0:
            raise ConfigError(f"train.flops: must be > 0, got {self.train.flops}")
        ev = self.eval
        for key in ("rows", "cloze_passages", "samples"):
            if getattr(ev, key) < 0:
                raise ConfigError(f"eval.{key}: must be >= 0, got {getattr(ev, key)}")
        for key in ("mc_samples", "batch_size", "bootstrap", "cloze_words", "sample_length"):
            if getattr(ev, key) < 1:
                raise ConfigError(f"eval.{key}: must be >= 1, got {getattr(ev, key)}")
        if ev.samples > len(ev.prompts):
            raise ConfigError(
                f"eval.samples={ev.samples} but only {len(ev.prompts)} eval.prompts are given"
            )
        if ev.temperature < 0:
            raise ConfigError(f"eval.temperature: must be >= 0, got {ev.temperature}")

    def corpus_overrides(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in flatten(self.corpus_set).items()]


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, recursively for nested mappings."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_demo_config(path: str, quick: bool = False, overrides: list[str] = ()) -> DemoConfig:
    """The file (its ``quick:`` section merged in when ``quick``), then ``overrides``."""
    data = read_yaml(path)
    if quick:
        section = data.get("quick") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: quick: must be a mapping of settings")
        data = _merge(data, section)
    data = apply_overrides(data, list(overrides))
    try:
        cfg = from_dict(DemoConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.validate()
    return cfg
