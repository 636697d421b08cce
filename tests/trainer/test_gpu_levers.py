"""The GPU levers, checked on CPU (issue 17, item 9): MFU in two counts, fused AdamW, a pinned
SDPA kernel, the plain one-process engine against DeepSpeed, and the forced warm-up cut.

Real engines throughout (DeepSpeed on gloo, torch AdamW), a real Transformer and real Arrow
corpora; the CUDA-only halves live in test_gpu.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from pipeline.configlib import ConfigError, from_dict
from trainer import model as model_mod
from trainer.budget import mfu_counts
from trainer.checkpoint import CheckpointManager, export_checkpoint, load_export
from trainer.config import TrainConfig
from trainer.engine import (
    PlainEngine,
    build_engine,
    build_optimizer,
    init_distributed,
    keep_fused,
    resolve_fused,
    train_step,
)
from trainer.model import (
    ModelConfig,
    Transformer,
    all_params,
    flops_per_token,
    flops_per_token_litgpt,
    set_attention_backend,
)
from trainer.objectives import MDMObjective, build_objective, forced_cut

MODEL = ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=40, seq_len=12)


class Rows:
    """Seeded random rows with unique keys; counts what it hands out."""

    def __init__(self, micro: int, seed: int = 0):
        self.micro, self.i, self.seed, self.keys = micro, 0, seed, []

    def next_micro_batch(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.i)
        tokens = torch.randint(0, MODEL.vocab_size, (self.micro, MODEL.seq_len + 1), generator=g)
        keys = torch.arange(self.i * self.micro, (self.i + 1) * self.micro)
        self.i += 1
        self.keys.extend(keys.tolist())
        return tokens, keys, None


def cfg_with(**data) -> TrainConfig:
    base = {
        "corpus": "unused",
        "budget": {"steps": 6},
        "precision": "fp32",
        "zero_stage": 0,
        "batch": {"global_batch": 8, "micro_batch": 4},
        "optim": {"lr": 3e-3, "warmup_min": 2},
    }
    for key, value in data.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return from_dict(TrainConfig, base)


def engine_for(cfg: TrainConfig, objective: str = "arm", seed: int = 0):
    init_distributed()
    torch.manual_seed(seed)
    model = Transformer(MODEL, causal=objective == "arm")
    return build_engine(cfg, model, cfg.budget.steps, 1)


# ----------------------------------------------------------------------------- MFU


def test_mfu_in_both_counts_by_hand():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=8, ffn_hidden=16, vocab_size=10, seq_len=4)
    # N = L (4 d^2 + 3 d f + 2 d) + d = 2 (256 + 384 + 16) + 8 = 1320
    # all = N + (V + 1) d + V d = 1320 + 88 + 80 = 1488; attention 12 L d T = 768
    assert all_params(cfg) == 1488
    assert all_params(cfg) == sum(p.numel() for p in Transformer(cfg, causal=True).parameters())
    assert flops_per_token(cfg) == 6 * 1320 + 768 == 8688
    assert flops_per_token_litgpt(cfg) == 6 * 1488 + 768 == 9696
    # 1e9 tokens/s on one device of 1e13 FLOP/s
    got = mfu_counts(cfg, 4, 1e9, 1, 1e13)
    assert got == pytest.approx({"mfu": 0.8688, "mfu_litgpt": 0.9696})
    assert mfu_counts(cfg, 4, 1e9, 1, None) == {}


# ----------------------------------------------------------------------------- fused AdamW


def test_fused_adamw_auto_is_off_on_cpu_and_forcible():
    model = Transformer(MODEL, causal=True)
    cpu = torch.device("cpu")
    assert resolve_fused("auto", cpu) is False and resolve_fused("auto", torch.device("cuda"))
    assert build_optimizer(model, cfg_with().optim, cpu).param_groups[0]["fused"] is False
    forced = build_optimizer(model, cfg_with(optim={"fused": True}).optim, cpu)
    assert forced.param_groups[0]["fused"] is True  # torch has a CPU fused kernel
    with pytest.raises(ConfigError, match="optim.fused"):
        cfg_with(optim={"fused": "yes"}).validate()


def test_resume_keeps_this_runs_fused_flag(tmp_path):
    """load_state_dict brings back the writer's flag; keep_fused puts this run's back."""
    writer = engine_for(cfg_with(zero_stage=2, optim={"fused": False}))
    train_step(writer, Rows(4), build_objective("arm", MODEL.mask_id), 2, torch.device("cpu"), 1)
    mgr = CheckpointManager(tmp_path, keep=1)
    ref = mgr.save(writer, 1, {"step": 1}, {"zero_stage": 2})
    reader = engine_for(cfg_with(zero_stage=2, optim={"fused": True}))
    mgr.load(reader, ref, universal=False)
    groups = reader.lr_scheduler.optimizer.param_groups
    assert [g["fused"] for g in groups] == [False]  # what DeepSpeed restored
    keep_fused(reader, True)
    assert [g["fused"] for g in groups] == [True]


# ----------------------------------------------------------------------------- SDPA kernel


def sdpa_ops(model, ids, lengths=None) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(ids, lengths)
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("causal", [True, False])
def test_math_backend_matches_auto_and_is_really_used(causal):
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=causal).eval()
    ids = torch.randint(0, MODEL.vocab_size, (3, MODEL.seq_len))
    lengths = None if causal else torch.tensor([12, 5, 12])  # MDM: the cut-row path too
    with torch.no_grad():
        auto = model(ids, lengths)
        auto_ops = sdpa_ops(model, ids, lengths)
        assert set_attention_backend(model, "math", torch.device("cpu"), torch.float32)
        pinned = model(ids, lengths)
        math_ops = sdpa_ops(model, ids, lengths)
    keep = slice(None) if causal else (lengths[:, None] > torch.arange(MODEL.seq_len))
    torch.testing.assert_close(pinned[keep], auto[keep], rtol=1e-5, atol=1e-5)
    assert any("flash" in op for op in auto_ops)  # torch's CPU choice for these inputs
    assert any("math" in op for op in math_ops)
    assert not any("flash" in op for op in math_ops)
    set_attention_backend(model, "auto", torch.device("cpu"), torch.float32)
    assert all(b.attn.backends is None for b in model.blocks)


@pytest.mark.parametrize("name", ["efficient", "cudnn"])
def test_cuda_only_backend_on_cpu_is_refused_at_build(name):
    model = Transformer(MODEL, causal=False)
    with pytest.raises(ConfigError, match=f"attention_backend={name}.*auto.*math"):
        set_attention_backend(model, name, torch.device("cpu"), torch.float32)
    assert all(b.attn.backends is None for b in model.blocks)  # nothing half-applied
    with pytest.raises(ConfigError, match="attention_backend"):
        cfg_with(attention_backend="fastest").validate()


# ----------------------------------------------------------------------------- plain engine


def trajectory(cfg: TrainConfig, objective: str, steps: int = 3):
    engine = engine_for(cfg, objective)
    obj, rows = build_objective(objective, MODEL.mask_id), Rows(4)
    out = [train_step(engine, rows, obj, 2, torch.device("cpu"), s + 1) for s in range(steps)]
    return engine, [(r.loss, r.grad_norm, r.lr) for r in out]


@pytest.mark.parametrize("objective", ["arm", "mdm"])
def test_plain_engine_follows_deepspeed_zero0_and_zero2(objective):
    plain_engine, plain = trajectory(cfg_with(engine="plain"), objective)
    assert isinstance(plain_engine, PlainEngine)
    for stage in (0, 2) if objective == "arm" else (2,):
        _, ds = trajectory(cfg_with(zero_stage=stage), objective)
        for (pl, pn, plr), (dl, dn, dlr) in zip(plain, ds, strict=True):
            assert pl == pytest.approx(dl, rel=1e-5) and plr == pytest.approx(dlr, rel=1e-12)
            assert pn == pytest.approx(dn, rel=1e-4)
    assert objective == "mdm" or plain[-1][0] < plain[0][0]  # it trains (MDM: too noisy)


def test_plain_engine_bf16_autocast_keeps_fp32_weights():
    engine, traj = trajectory(cfg_with(engine="plain", precision="bf16"), "arm", steps=2)
    _, fp32 = trajectory(cfg_with(engine="plain"), "arm", steps=2)
    assert engine.bfloat16_enabled()
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    for (bl, *_), (fl, *_) in zip(traj, fp32, strict=True):
        assert bl == pytest.approx(fl, abs=0.05)


def test_plain_engine_refuses_zero_and_several_processes():
    with pytest.raises(ConfigError, match="engine=plain.*zero_stage=2"):
        cfg_with(engine="plain", zero_stage=2).validate()
    init_distributed()
    with pytest.raises(ConfigError, match="one process"):
        PlainEngine(cfg_with(engine="plain"), Transformer(MODEL, causal=True), 6, 2, 2)


def test_plain_engine_checkpoint_resumes_exactly_and_exports(tmp_path):
    cfg = cfg_with(engine="plain")
    engine = engine_for(cfg)
    obj, dev = build_objective("arm", MODEL.mask_id), torch.device("cpu")
    for s in range(2):
        train_step(engine, Rows(4, seed=s), obj, 2, dev, s + 1)
    mgr = CheckpointManager(tmp_path, keep=2)
    meta = {"zero_stage": 0, "model": MODEL.__dict__, "causal": True, "objective": "arm"}
    ref = mgr.save(engine, 2, {"step": 2, "loader": {"at": 16}}, meta)
    after = [train_step(engine, Rows(4, seed=s), obj, 2, dev, s + 1) for s in range(2, 4)]
    resumed = engine_for(cfg, seed=99)  # other weights: everything comes from the checkpoint
    client = mgr.load(resumed, mgr.resolve("auto"), universal=False)
    assert client["step"] == 2 and client["loader"] == {"at": 16}
    again = [train_step(resumed, Rows(4, seed=s), obj, 2, dev, s + 1) for s in range(2, 4)]
    assert [r.loss for r in again] == pytest.approx([r.loss for r in after], rel=1e-6)
    assert [r.lr for r in again] == [r.lr for r in after]
    exported, _ = load_export(export_checkpoint(ref, tmp_path / "export", None))
    saved = torch.load(ref.path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name, value in exported.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name].float())


def test_plain_engine_refuses_a_deepspeed_checkpoint(tmp_path):
    ds = engine_for(cfg_with())
    mgr = CheckpointManager(tmp_path, keep=1)
    ref = mgr.save(ds, 1, {"step": 1}, {"zero_stage": 0})
    with pytest.raises(ConfigError, match="not written by engine=plain.*engine=deepspeed"):
        mgr.load(engine_for(cfg_with(engine="plain")), ref, universal=False)


# ----------------------------------------------------------------------------- forced cut


def test_forced_cut_cuts_exactly_one_row_once():
    obj = MDMObjective(MODEL.mask_id, random_length_prob=0.0)
    keys = torch.arange(8)
    plain_w, plain_len = obj.train_weights(keys, MODEL.seq_len)
    assert plain_len is None
    with forced_cut(obj) as has_cut_path:
        forced_w, forced_len = obj.train_weights(keys, MODEL.seq_len)
        later_w, later_len = obj.train_weights(keys + 8, MODEL.seq_len)
    assert has_cut_path and obj.forced_cuts == 1
    assert forced_len.tolist() == [MODEL.seq_len // 2] + [MODEL.seq_len] * 7
    assert torch.equal(forced_w[1:], plain_w[1:])  # the other rows draw as always
    assert torch.equal(forced_w[0, 6:], torch.zeros(6))
    assert later_len is None and torch.equal(later_w, obj.train_weights(keys + 8, 12)[0])
    with forced_cut(build_objective("arm", MODEL.mask_id)) as arm_has_cut_path:
        assert arm_has_cut_path is False


def test_forced_cut_in_a_warmup_step_runs_the_cut_path_without_extra_data(monkeypatch):
    calls = []
    real = model_mod.cut_attention
    monkeypatch.setattr(
        model_mod, "cut_attention", lambda q, k, v, n: calls.append(n.tolist()) or real(q, k, v, n)
    )
    obj = build_objective("mdm", MODEL.mask_id, random_length_prob=0.0)
    engine, dev = engine_for(cfg_with(engine="plain"), "mdm"), torch.device("cpu")
    free, forced = Rows(4), Rows(4)
    train_step(engine, free, obj, 2, dev, 1)
    assert calls == []
    with forced_cut(obj, length=3):
        result = train_step(engine, forced, obj, 2, dev, 1)
    assert calls == [[3, 12, 12, 12]] * MODEL.n_layer  # one cut row, every layer, one micro
    assert forced.i == free.i == 2 and forced.keys == free.keys == result.keys
    assert engine.global_steps == 2  # the warm-up step is one step, no more


# ----------------------------------------------------------------------------- the loop


def test_train_records_levers_and_both_mfu_counts(corpus_factory, tmp_path, capsys):
    from trainer.cli import load_train_config
    from trainer.loop import train

    corpus = corpus_factory(vocab_size=40, seq_len=12)
    args = [
        f"corpus={corpus}",
        f"run_dir={tmp_path / 'run'}",
        "model=tiny-0.3M",
        "model_overrides.n_layer=1",
        "model_overrides.n_head=2",
        "model_overrides.d_model=16",
        "engine=plain",
        "zero_stage=0",
        "attention_backend=math",
        "batch.global_batch=8",
        "batch.micro_batch=4",
        "steps=3",
        "eval.max_rows=8",
        "eval.n_samples=2",
        "tracking.enabled=false",
    ]
    summary = train(load_train_config(None, args))
    run = tmp_path / "run"
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["optim"]["fused"] is False  # auto resolved for the CPU, then recorded
    assert recorded["engine"] == "plain" and recorded["attention_backend"] == "math"
    assert "engine=plain" in capsys.readouterr().out
    assert summary["mfu"] is None and summary["mfu_litgpt"] is None  # no peak for a CPU
    assert "mfu_litgpt" in json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["final_loss"])
    meta = json.loads((run / "checkpoints" / "step00000003" / "meta.json").read_text())
    assert meta["identity"]["engine"] == "plain"
    assert (run / "export" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="engine"):  # the run's checkpoints are plain
        train(load_train_config(None, [*args, "engine=deepspeed"]))
    with pytest.raises(ConfigError, match="attention_backend=efficient"):
        train(
            load_train_config(
                None,
                [
                    *args[:-1],
                    "run_dir=" + str(tmp_path / "b"),
                    "attention_backend=efficient",
                    "tracking.enabled=false",
                ],
            )
        )
