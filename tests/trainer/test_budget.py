"""Budgets: C = 6 N D drives the number of steps; MFU against the peak table."""

from __future__ import annotations

import pytest

from pipeline.configlib import ConfigError
from trainer.budget import mfu, peak_flops, resolve_budget
from trainer.config import BudgetConfig
from trainer.model import non_embedding_params
from trainer.presets import load_preset


def test_flops_budget_gives_paper_steps():
    """170M at 6e18 FLOPs with 256 x 2048 tokens per step."""
    n = non_embedding_params(load_preset("170M"))
    assert n == 169_897_728
    b = resolve_budget(BudgetConfig(flops=6e18), n, 256, 2048)
    expected = 6e18 / (6 * n * 256 * 2048)
    assert b.steps == round(expected) == 11_226
    assert b.tokens == b.steps * 256 * 2048
    assert b.flops == pytest.approx(6 * n * b.tokens)
    assert abs(b.flops - 6e18) / 6e18 < 1e-4  # rounding to whole steps costs < 0.01%
    assert b.n_params == n and b.requested == "flops=6e+18"


def test_tokens_and_steps_budgets():
    b = resolve_budget(BudgetConfig(tokens=10_000), n_params=1000, global_batch=4, seq_len=100)
    assert (b.steps, b.tokens, b.flops) == (25, 10_000, 6 * 1000 * 10_000)
    b = resolve_budget(BudgetConfig(steps=7), n_params=1000, global_batch=4, seq_len=100)
    assert (b.steps, b.tokens, b.tokens_per_step) == (7, 2800, 400)


def test_steps_round_to_nearest():
    # 6 N G T = 6 * 10 * 1 * 10 = 600 FLOPs per step
    assert resolve_budget(BudgetConfig(flops=1499), 10, 1, 10).steps == 2
    assert resolve_budget(BudgetConfig(flops=1501), 10, 1, 10).steps == 3


def test_budget_below_one_step_and_ambiguous_budget_refused():
    with pytest.raises(ConfigError, match="less than one step"):
        resolve_budget(BudgetConfig(flops=100.0), 10, 1, 10)
    with pytest.raises(ConfigError, match="exactly one"):
        resolve_budget(BudgetConfig(flops=1e9, steps=3), 10, 1, 10)


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Tesla T4") is None
    # 1e6 FLOPs/token at 1e8 tokens/s on 2 devices of 1e14 peak -> 50%
    assert mfu(1e6, 1e8, 2, 1e14) == pytest.approx(0.5)
    assert mfu(1e6, 1e8, 1, None) is None
