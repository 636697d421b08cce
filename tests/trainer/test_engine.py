"""Engine pieces: DeepSpeed config from TrainConfig, batch geometry, the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.configlib import ConfigError, from_dict
from trainer.config import BatchConfig, TrainConfig
from trainer.engine import (
    WarmupCosine,
    batch_geometry,
    build_ds_config,
    eval_splits,
    lr_at,
    warmup_steps,
)


def cfg_with(**data) -> TrainConfig:
    cfg = from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 10}, **data})
    cfg.validate()
    return cfg


def test_ds_config_from_train_config():
    cfg = cfg_with(batch={"global_batch": 32, "micro_batch": 4}, zero_stage=3, precision="bf16")
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (4 * 2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # not DeepSpeed's bf16 default
    assert ds["gradient_clipping"] == 1.0
    assert "optimizer" not in ds and "scheduler" not in ds  # torch AdamW + our schedule
    fp32 = build_ds_config(cfg_with(precision="fp32", zero_stage=0), world_size=1)
    assert fp32["bf16"]["enabled"] is False and fp32["zero_optimization"]["stage"] == 0
    assert "data_types" not in fp32
    bf16_z0 = build_ds_config(cfg_with(precision="bf16", zero_stage=0), world_size=1)
    assert bf16_z0["zero_optimization"]["stage"] == 1  # DeepSpeed's BF16_Optimizer
    assert fp32["train_micro_batch_size_per_gpu"] == 256  # micro_batch null: no accumulation
    assert build_ds_config(cfg, 2, load_universal=True)["checkpoint"]["load_universal"]


def test_batch_geometry_and_clear_error():
    assert batch_geometry(BatchConfig(256, None), 8) == (32, 1)
    assert batch_geometry(BatchConfig(256, 8), 8) == (8, 4)
    with pytest.raises(ConfigError, match="not divisible.*world_size=3"):
        batch_geometry(BatchConfig(256, 8), 3)
    with pytest.raises(ConfigError, match="not divisible"):
        batch_geometry(BatchConfig(6, None), 4)  # 6 // 4 = 1, 1 * 4 != 6


def test_warmup_length_is_max_of_one_percent_and_minimum():
    assert warmup_steps(100_000, 0.01, 100) == 1000
    assert warmup_steps(5_000, 0.01, 100) == 100
    assert warmup_steps(50, 0.01, 100) == 25  # capped at half of a short run
    assert warmup_steps(20_001, 0.01, 100) == 201  # ceil


@pytest.mark.parametrize("total", [1, 2, 7, 300, 11_226])
def test_schedule_warms_up_then_ends_exactly_at_lr_min(total):
    lr, lr_min = 2e-4, 2e-5
    warm = warmup_steps(total, 0.01, 100)
    values = [lr_at(s, total, warm, lr, lr_min) for s in range(total)]
    if total > 1:
        assert values[-1] == lr_min  # exactly, not approximately
    if warm:
        assert values[warm - 1] == pytest.approx(lr)
        assert values[0] == pytest.approx(lr / warm)
        assert all(a < b for a, b in zip(values[: warm - 1], values[1:warm]))
    decay = values[warm:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert max(values) <= lr + 1e-18 and min(decay) >= lr_min


def test_schedule_midpoint_is_cosine():
    total, warm = 201, 100
    mid = lr_at(150, total, warm, 1.0, 0.0)  # progress (150-100)/(200-100) = 0.5
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_cosine_scheduler_drives_a_torch_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = WarmupCosine(opt, total_steps=20, warmup=5, lr=1e-3, lr_min=1e-4)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(s, 20, 5, 1e-3, 1e-4) for s in range(20)]
    assert seen[-1] == 1e-4
    # state round trip (DeepSpeed saves and restores it with every checkpoint)
    sched2 = WarmupCosine(torch.optim.AdamW([p], lr=1.0), 20, 5, 1e-3, 1e-4)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 20


def test_eval_splits_default_and_explicit():
    manifest = {"splits": {"train": {}, "validation": {}, "holdout_2024": {}, "holdout_2025": {}}}
    assert eval_splits(manifest, None) == ["validation", "holdout_2024", "holdout_2025"]
    assert eval_splits(manifest, ["holdout_2025"]) == ["holdout_2025"]
    with pytest.raises(ConfigError, match="eval.splits"):
        eval_splits(manifest, ["test"])
    manifest["splits"]["holdout_2025"]["rows"] = 0  # shorter than one row: nothing to evaluate
    assert eval_splits(manifest, None) == ["validation", "holdout_2024"]
    with pytest.raises(ConfigError, match="without a full row"):
        eval_splits(manifest, ["holdout_2025"])


def test_single_process_env_is_not_mistaken_for_a_launcher(monkeypatch):
    from trainer import engine

    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT", engine.OWNER_ENV, engine.PORT_ENV):
        monkeypatch.delenv(key, raising=False)
    assert not engine._launched()  # nothing set: we run one process ourselves
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert engine._launched()  # torchrun-style
    # variables a parent process set for itself and a child inherited
    monkeypatch.setenv(engine.OWNER_ENV, "1")  # not our pid
    monkeypatch.setenv(engine.PORT_ENV, "29500")
    assert not engine._launched()
    # a launcher started from such a parent sets its own port
    monkeypatch.setenv("MASTER_PORT", "29777")
    assert engine._launched()
