"""DeepSpeed communication settings (``comm.*``): what reaches the ZeRO config, and training.

The generated config is parsed by DeepSpeed's own ``DeepSpeedConfig`` so a misspelt key (which
DeepSpeed would silently ignore) fails here; tiny buckets in real 1-process runs force many
reductions and gathers, and must not change the losses.
"""

from __future__ import annotations

import pytest

from pipeline.configlib import ConfigError, from_dict
from trainer.cli import load_train_config
from trainer.config import TrainConfig
from trainer.engine import build_ds_config, init_distributed
from trainer.loop import train

from .conftest import make_corpus
from .test_train import losses


def cfg_with(**data) -> TrainConfig:
    cfg = from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 10}, **data})
    cfg.validate()
    return cfg


def test_auto_sizes_follow_d_model_and_world_size():
    z2 = build_ds_config(cfg_with(zero_stage=2), world_size=1, d_model=1792)["zero_optimization"]
    assert z2 == {
        "stage": 2,
        "overlap_comm": False,  # one process: nothing to overlap
        "contiguous_gradients": True,
        "reduce_bucket_size": 1792**2,
    }
    multi = build_ds_config(cfg_with(zero_stage=2), world_size=8, d_model=1792)
    assert multi["zero_optimization"]["overlap_comm"] is True
    z3 = build_ds_config(cfg_with(zero_stage=3), world_size=8, d_model=1792)["zero_optimization"]
    assert z3["stage3_prefetch_bucket_size"] == int(0.9 * 1792**2)
    assert z3["stage3_param_persistence_threshold"] == 17920
    assert z3["stage3_max_live_parameters"] == 10**9
    assert z3["stage3_gather_16bit_weights_on_model_save"] is False
    assert build_ds_config(cfg_with(zero_stage=0), 1, d_model=64)["zero_optimization"] == {
        "stage": 0
    }
    # without a model width the sized entries are left to DeepSpeed's defaults
    assert (
        "reduce_bucket_size" not in build_ds_config(cfg_with(zero_stage=2), 1)["zero_optimization"]
    )


def test_explicit_settings_win_and_deepspeed_reads_them():
    from deepspeed.runtime.config import DeepSpeedConfig

    init_distributed()
    comm = {
        "overlap_comm": True,
        "contiguous_gradients": False,
        "reduce_bucket_size": 1000,
        "stage3_prefetch_bucket_size": 300,
        "stage3_param_persistence_threshold": 7,
        "stage3_max_live_parameters": 5000,
    }
    ds = build_ds_config(cfg_with(zero_stage=3, comm=comm, batch={"global_batch": 4}), 1, 1, 64)
    zero = DeepSpeedConfig(ds).zero_config
    assert zero.overlap_comm is True and zero.contiguous_gradients is False
    assert zero.reduce_bucket_size == 1000 and zero.prefetch_bucket_size == 300
    assert zero.param_persistence_threshold == 7 and zero.max_live_parameters == 5000
    auto = build_ds_config(cfg_with(zero_stage=3, batch={"global_batch": 4}), 1, d_model=64)
    zero = DeepSpeedConfig(auto).zero_config
    assert zero.reduce_bucket_size == 64**2 and zero.param_persistence_threshold == 640


@pytest.mark.parametrize("key", ["reduce_bucket_size", "stage3_max_live_parameters"])
@pytest.mark.parametrize("value", [0, -5, True])
def test_bad_sizes_refused(key, value):
    with pytest.raises(ConfigError, match=f"comm.{key}"):
        cfg_with(comm={key: value})


@pytest.mark.slow
def test_one_process_runs_with_tiny_buckets_train_identically(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=32, kind="ramp")
    base = [
        f"corpus={corpus}",
        "model=tiny-0.3M",
        "model_overrides.n_layer=2",
        "model_overrides.d_model=32",
        "model_overrides.n_head=2",
        "precision=fp32",
        "steps=3",
        "batch.global_batch=8",
        "batch.micro_batch=4",
        "optim.warmup_min=1",
        "log.every=1",
        "eval.every=0",
        "eval.at_end=false",
        "checkpoint.every=0",
        "checkpoint.export=false",
        "tracking.enabled=false",
    ]
    tiny = ["comm.overlap_comm=true", "comm.reduce_bucket_size=500"]
    tiny3 = [*tiny, "comm.stage3_prefetch_bucket_size=200"]
    tiny3 += ["comm.stage3_param_persistence_threshold=1", "comm.stage3_max_live_parameters=3000"]
    runs = {
        "default": ["zero_stage=2"],
        "z2_tiny": ["zero_stage=2", *tiny],
        "z3_tiny": ["zero_stage=3", *tiny3],
    }
    for name, extra in runs.items():
        train(load_train_config(None, [*base, f"run_dir={tmp_path / name}", *extra]))
    want = losses(tmp_path / "default")
    assert sorted(want) == [1, 2, 3]
    for name in ("z2_tiny", "z3_tiny"):
        got = losses(tmp_path / name)
        assert got.keys() == want.keys()
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=1e-5), (name, step)
