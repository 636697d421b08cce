"""Incremental (key/value-cached) forward passes of a causal ``trainer.model.Transformer``.

Why here and not in ``trainer/model.py``: training never needs a cache, and the model's
attention is being reworked for compilation; an incremental forward built from the model's own
modules (embedding, norms, ``qkv``/``out`` projections, SwiGLU, head and the fp32 RoPE tables)
leaves the training path untouched. ``tests/eval/generation/test_sampling.py`` that cached sampling
reproduces sampling through ``Transformer.forward`` token for token, so a change of the model's
internals that this module does not follow fails a test instead of drifting silently.

Layout: a batch of prompts of unequal length is *left*-padded to a common width P. Row b's real
tokens sit at slots ``pad[b]..P-1`` but get RoPE positions ``0..len-1`` (position = slot -
pad[b]), and no query ever attends to a pad slot, so a row's outputs equal those of running it
alone. Each pad query attends to itself only (otherwise its softmax row would be empty and
produce NaNs that would poison the cache); pad outputs are never read. New tokens are appended
at the same slot for every row, one per step.

``OutputHead`` is the samplers' way to apply the model's output head (both families, cached or
not): on a CPU it multiplies by a contiguous copy of the transposed head weight, because the
BLAS path ``F.linear`` takes for one or two rows (a matrix-vector product over the weight in
its [vocab, d] layout) streams it about 3x slower than the [d, vocab] layout: with a 32k
vocabulary that is most of an ARM decode step at batch 1. From four rows on both layouts run
the same matrix-matrix kernel (equal values, equal speed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, t, hd] by per-row tables [B, 1, t, hd]; fp32 math like ``Rotary``."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class OutputHead:
    """``head(hidden)`` -> fp32 logits [..., vocab] through the model's head weight (see the
    module docstring); the transposed CPU copy is rebuilt when the weight changes in place
    (its version counter) or is replaced. A weight created under ``torch.inference_mode`` has
    no version counter, so it goes through the plain head (correct, just slower)."""

    def __init__(self, model: nn.Module) -> None:
        self.head = model.head
        self._key: tuple | None = None
        self._weight_t: torch.Tensor | None = None

    def _transposed(self) -> torch.Tensor:
        w = self.head.weight
        key = (w.data_ptr(), w._version, w.dtype)
        if key != self._key:
            with torch.no_grad():
                self._weight_t = w.detach().t().contiguous()
            self._key = key
        return self._weight_t

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type != "cpu" or self.head.weight.is_inference():
            return self.head(hidden).float()
        return (hidden @ self._transposed()).float()


class KVCache:
    """Keys and values of every layer for a batch, plus each row's left padding."""

    def __init__(self, model: nn.Module, pad: torch.Tensor, capacity: int) -> None:
        cfg = model.cfg
        if capacity > cfg.seq_len:
            raise ValueError(
                f"prompt + new tokens = {capacity} exceeds model seq_len={cfg.seq_len}; "
                "ask for fewer new tokens or a shorter prompt"
            )
        param = next(model.parameters())
        b = pad.shape[0]
        shape = (cfg.n_layer, b, cfg.n_head, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, device=param.device, dtype=param.dtype)
        self.v = torch.zeros_like(self.k)
        self.pad = pad.to(param.device)
        self.capacity = capacity
        self.filled = 0

    def valid_keys(self, stop: int) -> torch.Tensor:
        """bool[B, stop]: slots holding real tokens."""
        slots = torch.arange(stop, device=self.pad.device)
        return slots[None, :] >= self.pad[:, None]


class CachedDecoder:
    """Prefill a left-padded prompt batch, then feed one token per row per step."""

    def __init__(self, model: nn.Module, head: OutputHead | None = None) -> None:
        if not getattr(model, "causal", False):
            raise ValueError("a KV cache needs a causal (ARM) model")
        self.model = model
        self.rotary = model.rotary
        self.head = head if head is not None else OutputHead(model)

    def _tables(self, cache: KVCache, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.arange(start, start + t, device=cache.pad.device)
        pos = (slots[None, :] - cache.pad[:, None]).clamp_min(0)  # pads: any position works
        return self.rotary.cos[pos][:, None], self.rotary.sin[pos][:, None]

    def _attention(self, layer: int, attn: nn.Module, x, cache, start, mask, tables):
        b, t, d = x.shape
        q, k, v = attn.qkv(x).view(b, t, 3, attn.n_head, attn.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, t, hd]
        q, k = _rope(q, *tables), _rope(k, *tables)
        cache.k[layer, :, :, start : start + t] = k
        cache.v[layer, :, :, start : start + t] = v
        keys = cache.k[layer, :, :, : start + t]
        values = cache.v[layer, :, :, : start + t]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return attn.out(y.transpose(1, 2).reshape(b, t, d))

    def _run(self, ids: torch.Tensor, cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the last fed position (fp32)."""
        start, t = cache.filled, ids.shape[1]
        if start + t > cache.capacity:
            raise ValueError(f"KV cache full ({cache.capacity} slots)")
        tables = self._tables(cache, start, t)
        x = self.model.embed(ids)
        for i, block in enumerate(self.model.blocks):
            x = x + self._attention(i, block.attn, block.attn_norm(x), cache, start, mask, tables)
            x = x + block.mlp(block.mlp_norm(x))
        cache.filled = start + t
        return self.head(self.model.norm(x[:, -1]))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor, capacity: int):
        """(logits of each row's last prompt token [B, V], cache) for left-padded ``ids``."""
        cache = KVCache(self.model, pad, capacity)
        p = ids.shape[1]
        slots = torch.arange(p, device=cache.pad.device)
        causal = slots[None, :] <= slots[:, None]  # [P(query), P(key)]
        valid = cache.valid_keys(p)[:, None, :]  # [B, 1, P]
        mask = (causal[None] & valid) | torch.eye(p, dtype=torch.bool, device=slots.device)
        return self._run(ids, cache, mask[:, None]), cache

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row (``tokens`` [B]); logits [B, V] for the next position."""
        mask = cache.valid_keys(cache.filled + 1)[:, None, None, :]  # [B, 1, 1, S]
        return self._run(tokens[:, None], cache, mask)
