"""Activation checkpointing in the block loop (``Transformer(activation_checkpointing=...)``).

Recomputing a block in the backward pass must not change the loss or any gradient (both
objectives, rows cut to shorter lengths included), and it must really recompute: checkpointed
blocks run forward twice and the forward pass stores fewer activations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.configlib import ConfigError, from_dict
from trainer.config import TrainConfig
from trainer.model import ModelConfig, Transformer
from trainer.objectives import ARMObjective, MDMObjective

torch.set_num_threads(1)

CFG = ModelConfig(n_layer=3, n_head=2, d_model=32, vocab_size=50, seq_len=16)
LENGTHS = torch.tensor([16, 5, 11, 1])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g), torch.arange(4)


def loss_of(model: Transformer, causal: bool) -> torch.Tensor:
    """MDM: the training loss with every row cut (random_length_prob=1). ARM: next-token loss
    over each row's first ``LENGTHS`` positions, run through ``forward(ids, lengths)``."""
    tokens, keys = batch()
    if not causal:
        return MDMObjective(CFG.mask_id, random_length_prob=1.0).train_loss(model, tokens, keys)
    logits = model(tokens[:, :-1], LENGTHS)
    ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    keep = torch.arange(CFG.seq_len)[None, :] < LENGTHS[:, None]
    return (ce * keep).sum() / keep.sum()


def loss_and_grads(causal: bool, every: bool | int) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = Transformer(CFG, causal=causal, activation_checkpointing=every)
    loss = loss_of(model, causal)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("every", [True, 2])
def test_same_loss_and_gradients_as_without_checkpointing(causal, every):
    ref_loss, ref_grads = loss_and_grads(causal, False)
    loss, grads = loss_and_grads(causal, every)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(("every", "recomputed"), [(False, []), (True, [2, 1, 0]), (2, [2, 0])])
def test_checkpointed_blocks_recompute_and_store_less(every, recomputed):
    torch.manual_seed(0)
    model = Transformer(CFG, causal=False, activation_checkpointing=every)
    calls: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, causal=False)
    assert calls == [0, 1, 2]
    forward_saved = sum(saved)
    loss.backward()
    # backward reruns exactly the checkpointed blocks, last first (counted by a pre-hook: the
    # rerun stops as soon as the saved tensors are recomputed, a forward hook would miss it)
    assert calls[3:] == recomputed
    if every:
        # measured: 9% (every block) and 39% (every 2nd of 3) of the plain model's
        assert forward_saved < _saved_without_checkpointing() * (0.5 if every is True else 0.8)
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(batch()[0][:, :-1])
    assert calls == [0, 1, 2]  # inference never checkpoints


def _saved_without_checkpointing() -> int:
    """Elements the forward pass of the plain model stores for the backward pass."""
    torch.manual_seed(0)
    model = Transformer(CFG, causal=False)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, causal=False)
    return sum(saved)


def test_arm_objective_unchanged():
    tokens, keys = batch()
    values = []
    for every in (False, True):
        torch.manual_seed(0)
        model = Transformer(CFG, causal=True, activation_checkpointing=every)
        values.append(ARMObjective().train_loss(model, tokens, keys))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


@pytest.mark.parametrize("value", [-1, 0, 1.5, "often"])
def test_config_refuses_bad_intervals(value):
    data = {"corpus": "c", "budget": {"steps": 1}, "activation_checkpointing": value}
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        from_dict(TrainConfig, data).validate()
    for ok in (False, True, 3):
        from_dict(TrainConfig, {**data, "activation_checkpointing": ok}).validate()
