"""CUDA checks (run by benchmarks/gpu_check.sh with `pytest -m gpu`; skipped without a GPU).

bf16 forward/backward of both objectives on the device, then a few real DeepSpeed ZeRO-2
bf16 steps on NCCL through the same ``train_step`` the trainer uses.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.configlib import from_dict
from trainer.budget import peak_flops
from trainer.config import TrainConfig
from trainer.engine import build_engine, init_distributed, memory_metrics, train_step
from trainer.model import ModelConfig, Transformer
from trainer.objectives import build_objective

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODEL = ModelConfig(n_layer=2, n_head=4, d_model=128, vocab_size=1000, seq_len=128)


class RandomRows:
    def __init__(self, micro: int):
        self.micro, self.i = micro, 0

    def next_micro_batch(self):
        g = torch.Generator().manual_seed(self.i)
        tokens = torch.randint(0, MODEL.vocab_size, (self.micro, MODEL.seq_len + 1), generator=g)
        keys = torch.arange(self.i * self.micro, (self.i + 1) * self.micro)
        self.i += 1
        return tokens, keys, None  # the loaders' (tokens, keys, lengths): full rows


@pytest.mark.parametrize("name", ["arm", "mdm"])
def test_bf16_forward_backward_on_cuda(name):
    objective = build_objective(name, MODEL.mask_id)
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=objective.causal).cuda().to(torch.bfloat16)
    tokens, keys, _ = RandomRows(4).next_micro_batch()
    loss = objective.train_loss(model, tokens.cuda(), keys)
    assert math.isfinite(float(loss)) and 0 < float(loss) < 3 * math.log(MODEL.vocab_size)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().norm()) for g in grads) > 0
    with torch.no_grad():
        val = objective.eval_loss(model, tokens.cuda(), keys, n_samples=4)
    assert math.isfinite(float(val))


@pytest.mark.parametrize("name", ["arm", "mdm"])
def test_deepspeed_zero2_bf16_steps_on_cuda(name):
    dist = init_distributed()
    assert dist.device.type == "cuda"
    cfg = from_dict(
        TrainConfig,
        {
            "corpus": "synthetic",
            "objective": name,
            "budget": {"steps": 4},
            "precision": "bf16",
            "zero_stage": 2,
            "batch": {"global_batch": 8, "micro_batch": 4},
            "optim": {"warmup_min": 1},
        },
    )
    objective = build_objective(name, MODEL.mask_id)
    torch.manual_seed(0)
    engine = build_engine(cfg, Transformer(MODEL, causal=objective.causal), 4, dist.world_size)
    loader = RandomRows(4)
    results = [train_step(engine, loader, objective, 2, dist.device, s + 1) for s in range(4)]
    assert all(math.isfinite(r.loss) for r in results)
    assert all(r.grad_norm is None or math.isfinite(r.grad_norm) for r in results)
    assert results[-1].lr == pytest.approx(cfg.optim.lr_min)
    assert memory_metrics(dist.device)["memory/max_allocated_gb"] > 0


def test_peak_known_for_this_gpu():
    name = torch.cuda.get_device_name()
    if not any(k in name for k in ("H100", "H200", "A100")):
        pytest.skip(f"no peak table entry expected for {name}")
    assert peak_flops(name) is not None


# ----------------------------------------------------------------------------- issue 8 on CUDA


def _engine(name: str, **overrides):
    """A real single-process DeepSpeed engine (bf16, ZeRO-2) on this GPU, seeded."""
    dist = init_distributed()
    base = {
        "corpus": "synthetic",
        "objective": name,
        "budget": {"steps": 4},
        "precision": "bf16",
        "zero_stage": 2,
        "batch": {"global_batch": 8, "micro_batch": 4},
        "optim": {"warmup_min": 1},
    }
    cfg = from_dict(TrainConfig, {**base, **overrides})
    objective = build_objective(name, MODEL.mask_id, loss_chunk=cfg.loss_chunk)
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=objective.causal)
    if cfg.compile is True:
        from trainer.compiling import compile_blocks

        compile_blocks(model)
    return build_engine(cfg, model, 4, dist.world_size), objective, dist


@pytest.mark.parametrize("name", ["arm", "mdm"])
def test_compiled_chunked_and_checkpointed_steps_match_eager_plain_on_cuda(name):
    """compile, the chunked head loss and activation checkpointing change speed and memory, not
    the losses: 3 bf16 steps each agree with the eager, plain-loss run (bf16 tolerance)."""
    runs = {}
    for label, kw in {
        "plain": {"compile": False, "loss_chunk": 0},
        "compiled+chunked": {"compile": True, "loss_chunk": 64},
        "checkpointed": {"compile": False, "loss_chunk": 64, "activation_checkpointing": True},
    }.items():
        engine, objective, dist = _engine(name, **kw)
        engine.module.checkpoint_every = int(kw.get("activation_checkpointing", 0))
        loader = RandomRows(4)
        runs[label] = [
            train_step(engine, loader, objective, 2, dist.device, s + 1).loss for s in range(3)
        ]
    for label in ("compiled+chunked", "checkpointed"):
        assert runs[label] == pytest.approx(runs["plain"], rel=2e-2), label


def test_cut_rows_stay_equal_to_the_dense_mask_on_cuda():
    """Per-row fused attention for cut rows equals the dense-mask attention in bf16."""
    from trainer.model import cut_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(3, 4, 64, 32, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    )
    lengths = torch.tensor([64, 17, 40])
    keys = torch.arange(64, device="cuda")
    mask = (keys < lengths.cuda()[:, None])[:, None, None, :]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fused = cut_attention(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(fused[b, :, :n], dense[b, :, :n], atol=2e-2, rtol=2e-2)


def test_auto_precision_is_bf16_on_this_gpu():
    from trainer.precision import resolve_precision

    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == expected


# ----------------------------------------------------------------------------- issue 17 item 9


def test_fused_adamw_is_the_cuda_default():
    from trainer.engine import build_optimizer, resolve_fused

    engine, _, _ = _engine("arm")
    assert [g["fused"] for g in engine.lr_scheduler.optimizer.param_groups] == [True]
    model = Transformer(MODEL, causal=True).cuda()
    cfg = from_dict(TrainConfig, {"corpus": "x", "budget": {"steps": 1}})
    assert resolve_fused("auto", torch.device("cuda"))
    assert build_optimizer(model, cfg.optim, torch.device("cuda")).param_groups[0]["fused"]


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
@pytest.mark.parametrize("causal", [True, False])
def test_pinned_attention_kernels_match_math_in_bf16(backend, causal):
    """Each CUDA kernel, pinned, runs (or is refused at build with a ConfigError naming it) and
    agrees with the math kernel on full and cut rows."""
    from pipeline.configlib import ConfigError
    from trainer.model import set_attention_backend

    torch.manual_seed(0)
    model = Transformer(MODEL, causal=causal).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, MODEL.vocab_size, (3, MODEL.seq_len), device="cuda")
    lengths = None if causal else torch.tensor([MODEL.seq_len, 17, 40])
    dev = torch.device("cuda")
    try:
        set_attention_backend(model, backend, dev, torch.bfloat16)
    except ConfigError as e:  # e.g. cuDNN attention on a GPU or torch build without it
        assert f"attention_backend={backend}" in str(e)
        pytest.skip(str(e))
    with torch.no_grad():
        got = model(ids, lengths).float()
        set_attention_backend(model, "math", dev, torch.bfloat16)
        want = model(ids, lengths).float()
    keep = slice(None) if causal else (lengths[:, None] > torch.arange(MODEL.seq_len)).cuda()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-2, rtol=5e-2)


def test_flash_in_fp32_is_refused_at_build():
    from pipeline.configlib import ConfigError
    from trainer.model import set_attention_backend

    model = Transformer(MODEL, causal=False).cuda()
    with pytest.raises(ConfigError, match="attention_backend=flash.*bf16"):
        set_attention_backend(model, "flash", torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("name", ["arm", "mdm"])
def test_plain_engine_bf16_steps_follow_zero2_on_cuda(name):
    """engine=plain (autocast bf16, fp32 weights, fused AdamW) against DeepSpeed ZeRO-2 bf16:
    same losses to bf16 tolerance over 3 steps."""
    runs = {}
    for label, kw in {"zero2": {}, "plain": {"engine": "plain", "zero_stage": 0}}.items():
        engine, objective, dist = _engine(name, **kw)
        loader = RandomRows(4)
        runs[label] = [
            train_step(engine, loader, objective, 2, dist.device, s + 1) for s in range(3)
        ]
    assert [r.loss for r in runs["plain"]] == pytest.approx(
        [r.loss for r in runs["zero2"]], rel=2e-2
    )
    assert all(r.grad_norm is not None and math.isfinite(r.grad_norm) for r in runs["plain"])
