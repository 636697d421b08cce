"""Precision on real DeepSpeed engines (gloo, one process): bf16 gradients accumulate in fp32 at
every ZeRO stage, bf16 exports carry the fp32 master weights, precision=auto resolves (and is
recorded) as fp32 on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from pipeline.configlib import ConfigError, from_dict
from trainer.checkpoint import CheckpointManager, export_checkpoint, load_export
from trainer.cli import load_train_config
from trainer.config import TrainConfig
from trainer.engine import build_ds_config, build_engine, build_optimizer, init_distributed
from trainer.loop import train
from trainer.model import ModelConfig, Transformer
from trainer.objectives import ARMObjective
from trainer.precision import deepspeed_precision, resolve_precision

MODEL = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64, seq_len=16)
ACCUM, MICRO = 16, 2
BETA1 = 0.9


def bf16_cfg(stage: int, lr: float = 1e-3, global_batch: int = ACCUM * MICRO) -> TrainConfig:
    cfg = from_dict(
        TrainConfig,
        {
            "corpus": "unused",
            "budget": {"steps": 10},
            "precision": "bf16",
            "zero_stage": stage,
            "batch": {"global_batch": global_batch, "micro_batch": MICRO},
            # no clipping: Adam's first moment after one step is then exactly 0.1 x gradient
            "optim": {"lr": lr, "betas": [BETA1, 0.95], "grad_clip": 0.0, "warmup_min": 1},
        },
    )
    cfg.validate()
    return cfg


def micro_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    shape = (MICRO, MODEL.seq_len + 1)
    return [torch.randint(0, MODEL.vocab_size, shape, generator=g) for _ in range(ACCUM)]


def exact_sum_of_bf16_grads() -> dict[str, torch.Tensor]:
    """The reference: each micro-batch's bf16 gradient (of loss / ACCUM, as DeepSpeed scales
    it) from the same bf16 model, summed in float64."""
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=True).bfloat16()
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for tokens in micro_batches():
        model.zero_grad()
        (ARMObjective().train_loss(model, tokens, torch.arange(MICRO)) / ACCUM).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.double()
    return total


def engine_step_grads(ds_config: dict, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """One optimizer step of ACCUM micro-batches; the gradient the update used, read back
    from Adam's first moment (exp_avg = (1 - beta1) g after the first step)."""
    import deepspeed

    init_distributed()
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=True)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.optim), config=ds_config
    )
    for tokens in micro_batches():
        engine.backward(ARMObjective().train_loss(engine, tokens, torch.arange(MICRO)))
        engine.step()
    named = list(engine.module.named_parameters())
    states = [safe_get_full_optimizer_state(p, "exp_avg") for _, p in named]
    if any(s is None for s in states):  # DeepSpeed's stage-0 bf16 optimizer: module order
        masters = [p for group in engine.optimizer.fp32_groups for p in group]
        states = [engine.optimizer.optimizer.state[p]["exp_avg"] for p in masters]
    return {n: s.double() / (1 - BETA1) for (n, _), s in zip(named, states, strict=True)}


def relative_error(got: dict, want: dict) -> float:
    num = sum(float((got[n] - want[n]).norm()) ** 2 for n in want)
    return (num / sum(float(w.norm()) ** 2 for w in want.values())) ** 0.5


@pytest.fixture(scope="module")
def reference():
    return exact_sum_of_bf16_grads()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_accumulates_gradients_in_fp32(stage, reference):
    cfg = bf16_cfg(stage)
    ours = build_ds_config(cfg, world_size=1)
    assert ours["gradient_accumulation_steps"] == ACCUM
    # what DeepSpeed does with bf16 alone: accumulate in the model dtype
    default = {k: v for k, v in ours.items() if k not in ("data_types", "communication_data_type")}
    default["zero_optimization"] = dict(ours["zero_optimization"], stage=stage)
    err_ours = relative_error(engine_step_grads(ours, cfg), reference)
    err_default = relative_error(engine_step_grads(default, cfg), reference)
    # measured: ~3e-8 (fp32 rounding) against ~5e-3 (16 sums in bf16)
    assert err_ours < 1e-6, err_ours
    assert err_default > 100 * err_ours, (err_default, err_ours)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_precision_entries(stage):
    bf16 = deepspeed_precision("bf16", stage)
    assert bf16["bf16"] == {"enabled": True}
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert bf16["stage"] == max(stage, 1)  # stage 0 runs DeepSpeed's BF16_Optimizer
    assert ("communication_data_type" in bf16) == (stage <= 1)
    fp32 = deepspeed_precision("fp32", stage)
    assert fp32 == {"bf16": {"enabled": False}, "stage": stage}


def test_auto_resolves_to_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # explicit stays
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    here = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto") == here
    cfg = from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 1}})
    assert cfg.precision == "auto"  # the default
    assert build_ds_config(cfg, 1)["bf16"]["enabled"] is (here == "bf16")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp16")


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_export_writes_fp32_master_weights(tmp_path, stage):
    init_distributed()
    torch.manual_seed(0)
    cfg = bf16_cfg(stage, lr=1e-2, global_batch=MICRO)
    engine = build_engine(cfg, Transformer(MODEL, causal=True), total_steps=10, world_size=1)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    for tokens in micro_batches()[:3]:
        engine.backward(ARMObjective().train_loss(engine, tokens, torch.arange(MICRO)))
        engine.step()
        assert torch.isfinite(torch.tensor(float(engine.get_global_grad_norm())))
    meta = {"zero_stage": stage, "model": MODEL.__dict__, "causal": True, "mask_id": 64}
    mgr = CheckpointManager(tmp_path, keep=1)
    ref = mgr.save(engine, 3, {"step": 3}, meta)
    assert CheckpointManager(tmp_path, keep=1, world_size=2).needs_universal(ref, stage)
    model, _ = load_export(export_checkpoint(ref, tmp_path / "export", None))
    exported = dict(model.named_parameters())
    rounded = 0
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        torch.testing.assert_close(exported[name].detach(), master, rtol=0, atol=0)
        rounded += int(not torch.equal(master, p.detach().float()))
    assert rounded == len(exported)  # every bf16 module weight differs from its master


def test_auto_precision_is_resolved_and_recorded(corpus_factory, tmp_path):
    corpus = corpus_factory(vocab_size=64, seq_len=16)
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "model=tiny-0.3M",
        "model_overrides.n_layer=1",
        "model_overrides.d_model=16",
        "model_overrides.n_head=2",
        "batch.global_batch=4",
        "optim.warmup_min=1",
        "eval.every=0",
        "eval.at_end=false",
        "checkpoint.export=false",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        f"corpus={corpus}",
        f"run_dir={run_dir}",
    ]  # no precision: the default, auto
    summary = train(load_train_config(None, [*args, "steps=2"]))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["precision"] == "fp32"
    meta = json.loads((run_dir / "checkpoints/step00000002/meta.json").read_text())
    assert meta["precision"] == meta["identity"]["precision"] == "fp32"
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"]).data.params
    assert params["precision"] == "fp32"
    with pytest.raises(ConfigError, match=r"precision \('fp32' vs now 'bf16'\)"):
        train(load_train_config(None, [*args, "steps=3", "precision=bf16"]))
    assert (
        train(load_train_config(None, [*args, "steps=3", "checkpoint.reschedule=true"]))["steps"]
        == 3
    )  # auto again


@pytest.mark.slow
def test_bf16_zero0_on_two_processes_exports_and_resumes_on_one(corpus_factory, tmp_path):
    """torchrun 2 x bf16 ZeRO-0 (BF16_Optimizer, fp32 master weights split over the ranks):
    the export merges both shards into weights that round exactly to the module's bf16
    weights; the run resumes on 1 process through DeepSpeed's universal conversion."""
    import os
    import socket
    import subprocess
    import sys

    from trainer.checkpoint import consolidated_state_dict, read_checkpoint

    run_dir = tmp_path / "run"
    args = [
        f"corpus={corpus_factory(vocab_size=64, seq_len=16, kind='ramp')}",
        f"run_dir={run_dir}",
        *("model=tiny-0.3M", "model_overrides.n_layer=1", "model_overrides.d_model=16"),
        *("model_overrides.n_head=2", "precision=bf16", "zero_stage=0", "steps=4"),
        *("batch.global_batch=8", "batch.micro_batch=2", "optim.warmup_min=1"),
        *(
            "eval.every=0",
            "eval.max_rows=16",
            "checkpoint.every=2",
            "tracking.enabled=false",
            "log.every=1",
        ),
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd = [*torchrun, f"--master_port={port}", "-m", "pipeline.cli", "train", *args]
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, MASKSCALE_FAULT="step:3")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "step 3/4" in proc.stdout, proc.stderr[-3000:]
    ref = read_checkpoint(run_dir / "checkpoints/step00000002")
    assert len(list(ref.path.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    master = consolidated_state_dict(ref)
    module = torch.load(ref.path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name, weight in module.items():
        assert weight.dtype == torch.bfloat16 and master[name].dtype == torch.float32
        assert torch.equal(master[name].bfloat16(), weight), name  # the same weights...
        assert not torch.equal(master[name], weight.float()), name  # ...before rounding
    summary = train(load_train_config(None, args))
    assert summary["steps"] == 4 and (run_dir / "checkpoints/universal/step00000002").is_dir()


def test_unsharded_checkpoint_is_refused_by_a_sharded_optimizer(tmp_path):
    """A stage-0 checkpoint without optimizer shards (fp32, or bf16 written before bf16 ran
    BF16_Optimizer) loaded into a bf16 stage-0 engine: an error that says why and what to do."""
    init_distributed()
    cfg = bf16_cfg(0, global_batch=MICRO)
    cfg.precision = "fp32"
    plain = build_engine(cfg, Transformer(MODEL, causal=True), total_steps=10, world_size=1)
    meta = {"zero_stage": 0, "model": MODEL.__dict__, "causal": True, "mask_id": 64}
    mgr = CheckpointManager(tmp_path, keep=1)
    ref = mgr.save(plain, 1, {"step": 1}, meta)
    cfg.precision = "bf16"
    sharded = build_engine(cfg, Transformer(MODEL, causal=True), total_steps=10, world_size=1)
    with pytest.raises(RuntimeError, match="no ZeRO optimizer shards"):
        mgr.load(sharded, ref, universal=False)
