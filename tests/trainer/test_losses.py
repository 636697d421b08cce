"""Chunked head cross-entropy: same loss and gradients as the plain path, without all logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.configlib import ConfigError
from trainer.losses import HeadLoss, chunked_head_ce
from trainer.model import ModelConfig, Transformer
from trainer.objectives import ARMObjective, MDMObjective, build_objective

torch.set_num_threads(1)

V = 512  # large against d_model, so logits are by far the largest [..., V] tensors
CFG = ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=V, seq_len=48)


def _model(causal: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG, causal=causal)


def _batch(b: int = 4, t: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, V, (b, t + 1), generator=torch.Generator().manual_seed(3))
    return tokens, torch.arange(b) * 7919 + 13  # row 1 cut to 1 token, row 2 to 34


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_ce_equals_plain_loss_and_gradients(chunk, weighted):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    y = torch.randint(0, V, (40,), generator=g)
    tw = torch.rand(40, generator=g) if weighted else None
    loss = chunked_head_ce(h, w, y, tw, chunk)
    (loss * 0.37).backward()  # a grad_output other than 1 reaches the stored gradients
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ce = F.cross_entropy(h_ref @ w_ref.t(), y, reduction="none")
    ref = (ce * tw).sum() if weighted else ce.sum()
    (ref * 0.37).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no autograd: the loss alone, same value
        torch.testing.assert_close(chunked_head_ce(h, w, y, tw, chunk), ref.detach())


def test_head_loss_refuses_mismatched_targets_and_bad_chunks():
    hidden, weight = torch.randn(2, 3, 16), torch.randn(V, 16)
    with pytest.raises(ValueError, match="6 scored positions but 5 targets"):
        HeadLoss(torch.zeros(5, dtype=torch.long))(hidden, weight)
    with pytest.raises(ValueError, match="chunk"):
        HeadLoss(torch.zeros(6, dtype=torch.long), chunk=0)(hidden, weight)
    with pytest.raises(ConfigError, match="loss_chunk"):
        build_objective("arm", mask_id=V, loss_chunk=-1)


def _loss_and_grads(objective, tokens, keys):
    model = _model(objective.causal)
    loss = objective.train_loss(model, tokens, keys)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


OBJECTIVES = {
    "arm": lambda chunk: ARMObjective(loss_chunk=chunk),
    "mdm": lambda chunk: MDMObjective(V, loss_chunk=chunk),
    "mdm-cut": lambda chunk: MDMObjective(V, random_length_prob=0.5, loss_chunk=chunk),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_chunked_objective_loss_and_gradients_equal_plain(name):
    tokens, keys = _batch()
    if name == "mdm-cut":  # the keys really cut some rows
        lengths = OBJECTIVES[name](0).train_weights(keys, 48)[1]
        assert lengths is not None and (lengths < 48).any() and (lengths == 48).any()
    loss, grads = _loss_and_grads(OBJECTIVES[name](32), tokens, keys)
    ref, ref_grads = _loss_and_grads(OBJECTIVES[name](0), tokens, keys)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


class LargestLogits(TorchDispatchMode):
    """Records the largest tensor with a last dimension of V created by any op (forward and
    backward, every dtype): logits, their fp32 copies, softmax and gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("name", ["arm", "mdm-cut"])
def test_chunked_loss_never_holds_all_logits(name):
    tokens, keys = _batch()
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    sizes = {}
    for chunk in (0, 32):
        model, objective = _model(name == "arm"), OBJECTIVES[name](chunk)
        with LargestLogits() as spy:
            objective.train_loss(model, tokens, keys).backward()
        sizes[chunk] = spy.numel
    assert sizes[0] >= n_tokens * V  # the plain path holds every position's logits
    assert sizes[32] == 32 * V  # chunked: one chunk's at a time


@pytest.mark.parametrize("name", ["arm", "mdm-cut"])
def test_chunked_loss_in_bf16_matches_plain(name):
    """DeepSpeed's bf16 mode casts the whole model: matmuls in bf16, loss and softmax in fp32,
    gradients returned in bf16, as on the plain path."""
    tokens, keys = _batch()
    results = []
    for chunk in (0, 32):
        model = _model(name == "arm").to(torch.bfloat16)
        loss = OBJECTIVES[name](chunk).train_loss(model, tokens, keys)
        loss.backward()
        assert loss.dtype == torch.float32 and model.head.weight.grad.dtype == torch.bfloat16
        results.append((loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (loss, grads), (ref, ref_grads) = results[1], results[0]
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    for n, grad in grads.items():
        rel = (grad - ref_grads[n]).norm() / ref_grads[n].norm()
        assert rel < 2e-2, n


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_chunked_loss_inside_deepspeed_engine_equals_plain(zero_stage):
    """Through a real engine (ZeRO-3 gathers the head weight for the loss inside forward):
    three optimizer steps give the same losses with and without chunking."""
    from pipeline.configlib import from_dict
    from trainer.config import TrainConfig
    from trainer.engine import build_engine, init_distributed

    init_distributed()
    cfg = from_dict(
        TrainConfig,
        {
            "corpus": "unused",
            "objective": "mdm",
            "budget": {"steps": 10},
            "precision": "fp32",
            "zero_stage": zero_stage,
            "batch": {"global_batch": 4},
            "optim": {"lr": 1e-2, "warmup_min": 1},
        },
    )
    tokens, keys = _batch()
    losses = {}
    for chunk in (0, 32):
        objective = OBJECTIVES["mdm-cut"](chunk)
        engine = build_engine(cfg, _model(causal=False), total_steps=10, world_size=1)
        losses[chunk] = []
        for _ in range(3):
            loss = objective.train_loss(engine, tokens, keys)
            engine.backward(loss)
            engine.step()
            losses[chunk].append(loss.item())
    assert losses[0][2] < losses[0][0]  # the steps really train
    torch.testing.assert_close(torch.tensor(losses[32]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
