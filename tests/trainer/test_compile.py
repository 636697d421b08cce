"""torch.compile: resolution of the `compile` setting, fusion of the small ops, and compiled
training steps on a real DeepSpeed engine equal to eager ones (CPU inductor: C++ kernels)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from pipeline.configlib import ConfigError, from_dict, load_config
from trainer.compiling import compile_blocks, use_compile
from trainer.config import TrainConfig
from trainer.engine import build_engine, init_distributed
from trainer.model import ModelConfig, RMSNorm, Rotary, SwiGLU, Transformer
from trainer.objectives import build_objective

torch.set_num_threads(1)

MODEL = ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=64, seq_len=16)


def test_compile_setting_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_compile("auto", cuda) and not use_compile("auto", cpu)
    assert use_compile(True, cpu) and not use_compile(False, cuda)
    with pytest.raises(ConfigError, match="compile"):
        use_compile("yes", cpu)
    cfg = load_config(TrainConfig, None, ["corpus=c", "budget.steps=1", "compile=true"])
    assert cfg.compile is True and cfg.loss_chunk == 4096
    assert from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 1}}).compile == "auto"
    with pytest.raises(ConfigError, match="compile"):
        from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 1}, "compile": "sometimes"})
    bad = from_dict(TrainConfig, {"corpus": "c", "budget": {"steps": 1}, "loss_chunk": -1})
    with pytest.raises(ConfigError, match="loss_chunk"):
        bad.validate()


def _kernel_calls(sources: list[str]) -> list[str]:
    """Generated (non-library) kernels the compiled code calls: C++ on CPU, Triton on CUDA."""
    pattern = re.compile(r"^\s+(cpp_fused_\w+|triton_\w+\.run)\(", re.M)
    return [m.group(1) for src in sources for m in pattern.finditer(src)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_and_swiglu_each_compile_to_one_fused_kernel(dtype):
    """With gradients on (training), each op's forward is a single generated kernel: no graph
    break and no dtype round trip that splits it (the matmuls are library calls)."""
    x = torch.randn(2, 8, 32, dtype=dtype, requires_grad=True)
    heads = torch.randn(2, 2, 8, 16, dtype=dtype, requires_grad=True)
    cases = {
        "rmsnorm": (RMSNorm(32, 1e-5).to(dtype), x),
        "rope": (Rotary(16, 16, 1e4), heads),
        "swiglu": (SwiGLU(32, 64).to(dtype), x),
    }
    for name, (module, inp) in cases.items():
        torch._dynamo.reset()
        compiled = torch.compile(module)
        out, sources = run_and_get_code(compiled, inp)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # inductor skips bf16 roundings
        torch.testing.assert_close(out, module(inp), rtol=tol, atol=tol)
        assert len(_kernel_calls(sources)) == 1, (name, _kernel_calls(sources))


def _engine(objective: str, compiled: bool):
    init_distributed()
    cfg = from_dict(
        TrainConfig,
        {
            "corpus": "unused",
            "objective": objective,
            "budget": {"steps": 10},
            "precision": "fp32",
            "zero_stage": 2,
            "batch": {"global_batch": 4, "micro_batch": 2},
            "optim": {"lr": 1e-2, "warmup_min": 1},
        },
    )
    torch.manual_seed(0)
    model = Transformer(MODEL, causal=objective == "arm")
    if compiled:
        assert compile_blocks(model) == MODEL.n_layer
    return build_engine(cfg, model, total_steps=10, world_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["arm", "mdm"])
def test_compiled_training_steps_equal_eager(name):
    """Three optimizer steps (2 micro-batches each, chunked loss): the same losses and weights
    compiled and eager; the MDM's keys cut rows, so the compiled blocks also run the cut path."""
    kw = {"random_length_prob": 0.5} if name == "mdm" else {}
    objective = build_objective(name, MODEL.vocab_size, loss_chunk=8, **kw)
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len + 1), generator=g) for _ in "123456"
    ]
    keys = [torch.tensor([2 * i + 13, 2 * i + 14]) for i in range(6)]
    if name == "mdm":
        cut = [objective.train_weights(k, MODEL.seq_len)[1] is not None for k in keys]
        assert any(cut) and not all(cut)
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        engine = _engine(name, compiled)
        losses = []
        for i in range(6):
            loss = objective.train_loss(engine, batches[i], keys[i])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[compiled] = (
            losses,
            {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        )
    (eager, eager_w), (comp, comp_w) = results[False], results[True]
    torch.testing.assert_close(torch.tensor(comp), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert comp_w.keys() == eager_w.keys()  # compiling in place keeps parameter names
    for n, w in comp_w.items():
        # AdamW turns a rounding-level difference in a near-zero gradient into an update of up
        # to lr (1e-2) for that one element: allow 10% of lr on at most 1% of the elements.
        off = ~torch.isclose(w, eager_w[n], rtol=1e-4, atol=1e-5)
        assert off.float().mean() <= 0.01, (n, int(off.sum()), w.numel())
        torch.testing.assert_close(w, eager_w[n], rtol=1e-4, atol=1e-3, msg=n)
