"""One Llama-style Transformer shared by the autoregressive (ARM) and masked diffusion (MDM) models.

The study compares the two objectives on *the same network*: they differ only in whether
attention is causal and in the loss (see ``trainer/objectives.py``). Keeping a single class with a
``causal`` flag means every size, init and FLOP count is identical by construction, so scaling
curves compare objectives and nothing else.

Architecture (paper-notes.md): pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP, no
biases, multi-head attention through ``F.scaled_dot_product_attention`` (fused kernels on GPU),
untied input/output embeddings. The input embedding has ``vocab_size + 1`` rows: the last row is
the MDM mask token (``mask_id == vocab_size``); the output head predicts only real tokens.
``forward(ids, lengths)`` can cut rows to shorter lengths inside one pass (the MDM's stochastic
sequence length) without leaving the fused attention kernels: see :func:`cut_attention`.
``forward(ids, loss=HeadLoss(...))`` returns a loss instead of logits, computed through the head
in chunks of tokens (``trainer/losses.py``), so no step holds the logits of every position.

Attention kernel: ``F.scaled_dot_product_attention`` picks its kernel per call (flash, then
memory-efficient, then cuDNN or math, as dtype, shape and mask allow). For the bidirectional
MDM on an H100 the cuDNN kernel may beat flash, so ``attention_backend`` (TrainConfig) can pin
one: :func:`set_attention_backend` checks, once at build time, that the kernel runs on this
device and dtype (a forward and backward on a tiny input) and refuses it with a ConfigError
otherwise; each attention call then runs inside ``torch.nn.attention.sdpa_kernel`` with that
one kernel, which raises rather than falls back. ``auto`` adds nothing to the call.

Compilation: RMSNorm, RoPE and the SwiGLU gate are written as plain tensor expressions (no
Python-side branching on values, casts inside the expression) so ``torch.compile`` fuses each
into one kernel; ``tests/trainer/test_compile.py`` checks that.

Precision: parameters may be fp32 (optionally run under ``torch.autocast(bf16)``) or cast to bf16
as a whole (DeepSpeed's bf16 mode). RMSNorm and RoPE compute in fp32 either way, and the RoPE
tables are rebuilt in fp32 whenever the module is moved or cast, so positions stay exact.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from pipeline.configlib import ConfigError
from trainer.losses import HeadLoss


@dataclass
class ModelConfig:
    """Shape of the network. Presets live in ``configs/model/<name>.yaml`` (trainer/presets.py)."""

    n_layer: int
    """Number of Transformer blocks (L)."""
    n_head: int
    """Attention heads; must divide d_model."""
    d_model: int
    """Width of the residual stream (d)."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width; None means 4 * d_model, which reproduces every size of the paper grid."""
    vocab_size: int = 32000
    """Real tokens (output head rows). The embedding has one extra row, the MDM mask token."""
    seq_len: int = 2048
    """Longest sequence the model accepts (length of the RoPE tables)."""
    rope_base: float = 10000.0
    """Rotary embedding base (theta)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    @property
    def ffn(self) -> int:
        """SwiGLU hidden width actually used."""
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mask_id(self) -> int:
        """Token id of the MDM mask token (the extra embedding row)."""
        return self.vocab_size

    def validate(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "vocab_size", "seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}: must be a positive integer, got {value!r}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ConfigError(
                f"model.ffn_hidden: must be a positive integer or null (= 4 * d_model), "
                f"got {self.ffn_hidden!r}"
            )
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "choose n_head dividing d_model"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.d_model / model.n_head = {self.head_dim} must be even for rotary "
                "embeddings; change n_head or d_model"
            )
        if not self.rope_base > 1:
            raise ConfigError(f"model.rope_base: must be > 1, got {self.rope_base!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"model.norm_eps: must be > 0, got {self.norm_eps!r}")


def non_embedding_params(cfg: ModelConfig) -> int:
    """N = L (4 d^2 + 3 d ffn + 2 d) + d: attention (q, k, v, out), SwiGLU (gate, up, down),
    two RMSNorm weights per block, and the final RMSNorm. Excludes both embedding matrices."""
    d, f = cfg.d_model, cfg.ffn
    return cfg.n_layer * (4 * d * d + 3 * d * f + 2 * d) + d


def flops_per_token(
    cfg: ModelConfig, seq_len: int | None = None, *, include_head: bool = False
) -> float:
    """Training FLOPs per token (forward + backward): ``6 N + 12 L d T``.

    * ``6 N``: every non-embedding weight does one multiply-add (2 FLOPs) per token in the
      forward pass and two in the backward pass (input and weight gradients): 2 + 4 = 6.
      This is the paper's compute accounting, ``C = 6 N D``.
    * ``12 L d T``: attention scores ``Q K^T`` and the weighted sum ``A V`` are matmuls without
      weights. Per layer and token the forward pass costs ``2 T d`` for each (T = sequence
      length), i.e. ``4 T d``; times 3 for forward + backward gives ``12 T d`` per layer.
      We count the full ``T x T`` matrix for both objectives: causal kernels skip about half of
      it, bidirectional (MDM) ones do not, but counting the same work makes MFU comparable
      between ARM and MDM (this is also the usual PaLM-style MFU convention).
    * The output head (``6 d V``) is excluded by default, as in ``C = 6 N D``; pass
      ``include_head=True`` for a hardware-utilisation figure that counts it (it dominates for
      small models with a 32k vocabulary). The embedding lookup costs no FLOPs.
    """
    t = cfg.seq_len if seq_len is None else seq_len
    flops = 6.0 * non_embedding_params(cfg) + 12.0 * cfg.n_layer * cfg.d_model * t
    if include_head:
        flops += 6.0 * cfg.d_model * cfg.vocab_size
    return flops


def all_params(cfg: ModelConfig) -> int:
    """Every parameter of the Transformer: N plus the input embedding ((V + 1) x d, the mask
    row included) and the output head (V x d)."""
    d, v = cfg.d_model, cfg.vocab_size
    return non_embedding_params(cfg) + (v + 1) * d + v * d


def flops_per_token_litgpt(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token in litgpt's MFU convention: ``6 P + 12 L d T``, P = *all*
    parameters (:func:`all_params`).

    litgpt (``estimate_flops``) counts 2 FLOPs per parameter and token for every trainable
    parameter, embedding and head included, plus ``4 L d T^2`` per sequence for attention,
    all times 3 for forward + backward. The attention term equals ours; the difference is
    ``6 (2V + 1) d``: the head's real matmul (``6 d V``, which :func:`flops_per_token` leaves
    out) and the embedding, which costs no matmul FLOPs, so this count is the larger one and
    flatters MFU by the embedding's share. Reported next to ours so numbers compare with
    runs that quote litgpt's.
    """
    t = cfg.seq_len if seq_len is None else seq_len
    return 6.0 * all_params(cfg) + 12.0 * cfg.n_layer * cfg.d_model * t


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding tables (fp32, not saved in checkpoints).

    ``_apply`` is overridden so that ``.to(device)``, ``.bfloat16()`` or ``.to_empty()`` rebuild
    the tables in fp32 on the new device instead of rounding or emptying them.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, seq_len: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.seq_len, self.base = head_dim, seq_len, base
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(self.cos.device)

    def _build(self, device: torch.device) -> None:
        # Exact angles in float64, then fp32 on the target device. Integer aranges are cast
        # explicitly: DeepSpeed's zero.Init rounds *floating* constructor results to bf16.
        half = torch.arange(0, self.head_dim, 2, device="cpu").double() / self.head_dim
        inv_freq = self.base**-half
        angles = torch.outer(torch.arange(self.seq_len, device="cpu").double(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim], rotate-half layout
        self.cos = angles.cos().to(device=device, dtype=torch.float32)
        self.sin = angles.sin().to(device=device, dtype=torch.float32)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._build(self.cos.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [B, H, T, head_dim]; math in fp32, result in x's dtype."""
        t = x.shape[-2]
        cos, sin = self.cos[:t], self.sin[:t]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


@torch.compiler.disable
def cut_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Bidirectional attention in which row b sees only its first ``lengths[b]`` keys.

    A dense boolean mask would push the whole micro-batch off the flash kernels (SDPA's
    math / memory-efficient paths). Instead the uncut rows run as one fused call and each cut
    row runs alone on its kept prefix, also fused: the extra cost is about one row's attention
    per cut row (1% of rows in MDM training). Outputs past a row's cut are zero (they are
    meaningless either way: no kept position attends to them). Kept outputs equal the masked
    computation up to float rounding. Runs eagerly under ``torch.compile`` (a graph break
    only in micro-batches with a cut), since the per-row slicing depends on the values of
    ``lengths`` (CPU int[B]).
    """
    t = q.shape[-2]
    keep = lengths.tolist()
    full = [b for b, n in enumerate(keep) if n >= t]
    rows: list[torch.Tensor | None] = [None] * len(keep)
    if len(full) == len(keep):
        return F.scaled_dot_product_attention(q, k, v)
    if full:
        index = torch.tensor(full, device=q.device)
        y = F.scaled_dot_product_attention(*(z.index_select(0, index) for z in (q, k, v)))
        for i, b in enumerate(full):
            rows[b] = y[i]
    for b, n in enumerate(keep):
        if n < t:
            y = F.scaled_dot_product_attention(
                q[b, None, :, :n], k[b, None, :, :n], v[b, None, :, :n]
            )
            rows[b] = F.pad(y[0], (0, 0, 0, t - n))
    return torch.stack(rows)


class Attention(nn.Module):
    """Multi-head self-attention; ``causal`` selects ARM (True) or MDM (False) masking."""

    def __init__(self, cfg: ModelConfig, causal: bool, rotary: Rotary) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.causal = cfg.n_head, cfg.head_dim, causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = [rotary]  # shared tables; a list so it is not registered as a child
        self.backends: list[SDPBackend] | None = None
        """The only SDPA kernels attention may use (set_attention_backend); None = torch's."""

    def forward(self, x: torch.Tensor, cut: torch.Tensor | None = None) -> torch.Tensor:
        """``cut``: None (plain causal or full attention, the fused kernels) or, for a
        bidirectional model, CPU int[B] row lengths (see :func:`cut_attention`)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        rotary = self.rotary[0]
        q, k = rotary(q), rotary(k)
        pinned = sdpa_kernel(self.backends) if self.backends else contextlib.nullcontext()
        with pinned:
            if cut is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            else:
                y = cut_attention(q, k, v, cut)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""``attention_backend`` names -> torch's kernels; ``auto`` (not listed) leaves torch's choice."""


def check_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool
) -> list[SDPBackend] | None:
    """The kernels for ``attention_backend=name`` (None for auto), after a forward and backward
    on a tiny input of this device, dtype, head_dim and masking show the kernel runs; else a
    ConfigError that names the setting and what to use instead."""
    if name == "auto":
        return None
    if name not in SDPA_BACKENDS:
        raise ConfigError(
            f"attention_backend: auto or one of {sorted(SDPA_BACKENDS)}, got {name!r}"
        )
    backends = [SDPA_BACKENDS[name]]
    q = torch.randn(1, 1, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with sdpa_kernel(backends), torch.enable_grad():
            F.scaled_dot_product_attention(q, q, q, is_causal=causal).sum().backward()
            if not causal:  # the cut rows' path (cut_attention) runs shorter rows alone
                F.scaled_dot_product_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5]).sum()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "flash and cudnn need bf16 (precision=bf16); " if device.type == "cuda" else ""
        raise ConfigError(
            f"attention_backend={name}: torch cannot run this attention kernel on "
            f"{device.type} with {dtype} (head_dim {head_dim}): {first}. {hint}Use "
            "attention_backend=auto (torch's choice) or math (runs anywhere)"
        ) from None
    return backends


def set_attention_backend(
    model: nn.Module, name: str, device: torch.device, dtype: torch.dtype
) -> list[SDPBackend] | None:
    """Pin every attention layer of ``model`` (a Transformer) to ``attention_backend=name``,
    checked first (:func:`check_attention_backend`); auto unpins. Returns the kernels."""
    backends = check_attention_backend(name, device, dtype, model.cfg.head_dim, bool(model.causal))
    for block in model.blocks:
        block.attn.backends = backends
    return backends


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate and up are one fused matmul."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool, rotary: Rotary) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, causal, rotary)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn)

    def forward(self, x: torch.Tensor, cut: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cut)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab_size]; ``causal`` is True for ARM, False for MDM.

    ``activation_checkpointing``: False (off), True (every block) or K (every K-th block,
    counting from the first): in training, those blocks keep only their input and recompute
    their activations in the backward pass (``torch.utils.checkpoint``, non-reentrant).
    ``init=False`` skips ``reset_parameters`` (the caller runs it, e.g. after ZeRO-3's
    ``zero.Init`` has partitioned the parameters, see trainer/build.py).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        causal: bool,
        *,
        activation_checkpointing: bool | int = False,
        init: bool = True,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.causal = cfg, causal
        self.checkpoint_every = int(activation_checkpointing)  # True -> 1, False -> 0
        if self.checkpoint_every < 0:
            raise ValueError(f"activation_checkpointing must be >= 0, got {self.checkpoint_every}")
        # The submodules' own default inits draw random numbers that reset_parameters overwrites.
        # Forking the generators makes the weights a function of the seed and reset_parameters
        # only, not of the dtype or device the submodules were created with (zero.Init creates
        # them in bf16 on the GPU, where the same draws consume the generators differently).
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)  # last row: mask token
            self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base)
            self.blocks = nn.ModuleList(Block(cfg, causal, self.rotary) for _ in range(cfg.n_layer))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, sqrt(2/(5d))) everywhere; attention-out and MLP-down use 1/sqrt(d)/L.

        Values are drawn in fp32 on the CPU generator, one weight at a time in module order,
        and copied into the parameter: the same seed gives the same weights whatever the
        parameters' dtype or device. Parameters partitioned by ZeRO-3 are gathered one at a
        time, filled on every rank (the generators stay in step) and re-partitioned from rank
        0's copy; meta parameters are left alone.
        """
        d = self.cfg.d_model
        std = math.sqrt(2.0 / (5.0 * d))
        out_std = 1.0 / math.sqrt(d) / self.cfg.n_layer
        residual_out = {id(b.attn.out.weight) for b in self.blocks}
        residual_out |= {id(b.mlp.down.weight) for b in self.blocks}
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                w = module.weight
                _fill_(w, out_std if id(w) in residual_out else std)
            elif isinstance(module, RMSNorm):
                _fill_(module.weight, None)

    def count_non_embedding_params(self) -> int:
        """All parameters minus the input embedding and the output head (works on meta too)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() - self.head.weight.numel()

    def forward(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor | None = None,
        loss: HeadLoss | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab_size] for ``input_ids`` [B, T]: ``head(features(...))``; or,
        given ``loss``, that loss (fp32 scalar) computed through the head in chunks of tokens
        without materialising the logits (``trainer/losses.py``)."""
        hidden = self.features(input_ids, lengths)
        if loss is None:
            return self.head(hidden)
        return loss(hidden, self.head.weight)

    def features(
        self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, d_model] for ``input_ids`` [B, T] (the output head's
        input). Evaluation applies the head only at the positions it scores, which saves most
        of the head's cost (the largest matmul of small models with a 32k vocabulary).

        ``lengths`` (int[B], optional) cuts row b to its first ``lengths[b]`` positions inside
        the one forward pass: its queries never see keys at or beyond the cut, so outputs at
        positions ``< lengths[b]`` equal (up to float rounding) those of running the truncated
        row alone; outputs at later positions are meaningless and must be ignored. All ranks
        still run one forward per micro-batch (what ZeRO-3's collective weight gathers need).
        A causal model needs nothing for a cut (a position never sees later keys), so its
        attention stays the fused causal kernel; a bidirectional one runs cut rows through
        :func:`cut_attention`, also on fused kernels. Pass a CPU tensor to keep the
        full-length check free of a device synchronisation.
        """
        b, t = input_ids.shape
        if t > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {t} tokens exceeds model seq_len={self.cfg.seq_len}; "
                "raise model.seq_len"
            )
        cut = None
        if lengths is not None:
            if lengths.shape != (b,):
                raise ValueError(f"lengths must be [B]={b}, got shape {tuple(lengths.shape)}")
            shortest, longest = int(lengths.min()), int(lengths.max())
            if shortest < 1 or longest > t:
                raise ValueError(f"lengths must lie in [1, {t}], got {lengths.tolist()}")
            if shortest < t and not self.causal:
                cut = lengths.cpu()
        x = self.embed(input_ids)
        every = self.checkpoint_every if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if every and i % every == 0:
                # Non-reentrant: recomputation goes through block.__call__, so ZeRO-3's module
                # hooks gather the weights again; the blocks draw no random numbers, hence no
                # RNG state to save and restore.
                x = checkpoint(block, x, cut, use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(x, cut)
        return self.norm(x)


def _fill_(param: nn.Parameter, std: float | None) -> None:
    """Fill ``param`` with N(0, std) drawn in fp32 on the CPU (std None: ones), in place."""
    if param.is_meta:
        return
    gathered = contextlib.nullcontext()
    if hasattr(param, "ds_id"):  # partitioned by DeepSpeed ZeRO-3
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    with gathered, torch.no_grad():
        if std is None:
            param.fill_(1.0)
        else:
            value = torch.empty(param.shape, dtype=torch.float32, device="cpu")
            param.copy_(value.normal_(mean=0.0, std=std))
