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
        return tokens, keys


@pytest.mark.parametrize("name", ["arm", "mdm"])
def test_bf16_forward_backward_on_cuda(name):
    objective = build_objective(name, MODEL.mask_id)
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=objective.causal).cuda().to(torch.bfloat16)
    tokens, keys = RandomRows(4).next_micro_batch()
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
