"""Cross-entropy through the output head, one chunk of tokens at a time.

Why: the plain loss ``cross_entropy(head(h).float(), y)`` holds the logits of every position
at once, several times over. At the paper's geometry (micro-batch 8 x 2048 tokens, 32k vocab)
that is 1 GiB of bf16 logits, a 2 GiB fp32 copy, a 2 GiB fp32 log-softmax kept for backward
and a 2 GiB fp32 gradient: the largest tensors of a 1B training step. Here the head matmul,
the softmax and both head gradients run chunk by chunk inside the forward pass, so at most one
chunk's logits (``chunk x V`` fp32) exist at a time.

How: the loss is a scalar, so its gradient with respect to the head's input ``h`` and weight
``W`` is known in the forward pass up to the one number ``grad_output`` that the backward pass
brings. Per chunk: ``g = (softmax(logits) - onehot(y)) * w``, ``dh = g W``, ``dW += g^T h``.
The backward pass only scales the stored ``dh`` (fp32, ``N x d``) and ``dW`` (fp32, ``V x d``).
That is the same three matmuls as the plain path (forward, input and weight gradient), with no
recomputation. Matmuls run in the inputs' dtype (bf16 under DeepSpeed's bf16 mode, as the plain
path does); softmax, loss and gradient sums are fp32.

``HeadLoss`` is what an objective hands to ``Transformer.forward(..., loss=...)``: the whole
computation then runs inside the model's (DeepSpeed engine's) forward call, where ZeRO-3 has
gathered the head weight. It may name a subset of positions (``positions``): the MDM scores
only masked tokens, so only their hidden states go through the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


def _chunk_loss_and_grad(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor | None,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of weighted CE over the chunk, fp32 d(sum)/d(logits) or None) for one chunk."""
    logits = (h @ weight.t()).float()  # [c, V]; a no-op cast when already fp32
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
    if token_weight is not None:
        ce = ce * token_weight
    if not want_grad:
        return ce.sum(), None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
    if token_weight is not None:
        grad.mul_(token_weight[:, None])
    return ce.sum(), grad


class _ChunkedHeadCE(torch.autograd.Function):
    """sum_i w_i CE(h_i W^T, y_i) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, token_weight, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for start in range(0, h.shape[0], chunk):
            end = min(start + chunk, h.shape[0])
            w = None if token_weight is None else token_weight[start:end]
            part, g = _chunk_loss_and_grad(h[start:end], weight, targets[start:end], w, True)
            total += part
            g = g.to(h.dtype)
            if need_h:
                grad_h[start:end] = g @ weight
            if need_w:
                grad_w += g.t() @ h[start:end]
            del g
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad_out).to(ctx.h_dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return dh, dw, None, None, None


def chunked_head_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """fp32 scalar ``sum_i token_weight_i * CE(h_i @ weight.T, targets_i)``.

    ``h`` [N, d], ``weight`` [V, d] (the head), ``targets`` int64 [N], ``token_weight`` fp32 [N]
    or None (all ones). At most ``chunk`` rows of logits exist at a time. Without autograd
    (``torch.no_grad`` or nothing requires grad) only the loss is computed.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedHeadCE.apply(h, weight, targets, token_weight, chunk)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk):
        w = None if token_weight is None else token_weight[start : start + chunk]
        sl = slice(start, start + chunk)
        total += _chunk_loss_and_grad(h[sl], weight, targets[sl], w, False)[0]
    return total


@dataclass
class HeadLoss:
    """A loss request for ``Transformer.forward``: score the head at some positions.

    The model returns ``sum_i weight_i * CE(logits at positions_i, targets_i)`` (fp32 scalar)
    instead of logits.
    """

    targets: torch.Tensor
    """int64 [N]: the token to predict at each scored position."""
    weight: torch.Tensor | None = None
    """fp32 [N] per-position loss weight, or None for 1 everywhere."""
    positions: torch.Tensor | None = None
    """int64 [N] indices into the flattened [B * T] positions, or None for all B * T."""
    chunk: int = 4096
    """Tokens per chunk of logits."""

    def __call__(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, T, d]: the model's final normed states; ``head_weight`` [V, d]."""
        h = hidden.flatten(0, 1)
        if self.positions is not None:
            h = h.index_select(0, self.positions)
        if h.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"HeadLoss: {h.shape[0]} scored positions but {self.targets.shape[0]} targets"
            )
        return chunked_head_ce(h, head_weight, self.targets, self.weight, self.chunk)
