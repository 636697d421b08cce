"""Modelling file of a maskscale masked diffusion model (MDM) in a Hugging Face directory.

``maskscale export RUN --format hf`` copies this file into the export as
``modeling_maskscale_mdm.py``; ``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` loads
it, as LLaDA ships its model. Why a file of our own: transformers has no bidirectional Llama
with a mask token, and an MDM is exactly maskscale's Llama (same weight names as
``LlamaForCausalLM``, so the weights are the ARM export's layout) with full attention.

Self-contained on purpose: it imports only torch and transformers' base classes (no maskscale,
no Llama internals, which change between transformers versions), so the directory works
wherever transformers does. The maths is maskscale's ``trainer/model.py``: pre-norm RMSNorm
(fp32), rotate-half RoPE (angles in float64, tables in fp32), SwiGLU, no biases, untied head.
``vocab_size`` counts the input embedding's rows as in every HF config; the last row is the
mask token (``mask_token_id == vocab_size - 1``), which the head never predicts: logits cover
the ``vocab_size - 1`` real tokens.
``attention_mask`` (1 = real, 0 = padding) hides padded keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class MaskscaleMDMConfig(PretrainedConfig):
    """Llama field names; ``vocab_size`` = real tokens + the mask token (the last id)."""

    model_type = "maskscale_mdm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        mask_token_id: int | None = None,
        mdm_eps: float = 1e-3,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = vocab_size - 1 if mask_token_id is None else mask_token_id
        self.mdm_eps = mdm_eps
        self.hidden_act = "silu"
        self.attention_bias = False
        self.mlp_bias = False
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def _rope_tables(head_dim: int, length: int, base: float, device) -> tuple[torch.Tensor, ...]:
    half = torch.arange(0, head_dim, 2).double() / head_dim
    angles = torch.outer(torch.arange(length).double(), base**-half)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, config: MaskscaleMDMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, key_mask):
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # bidirectional
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, config: MaskscaleMDMConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, config: MaskscaleMDMConfig) -> None:
        super().__init__()
        self.input_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = _Attention(config)
        self.post_attention_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = _MLP(config)

    def forward(self, x, cos, sin, key_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, config: MaskscaleMDMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)


class MaskscaleMDMForMaskedLM(PreTrainedModel):
    """Logits over the real tokens (not the mask) at every position, attention both ways."""

    config_class = MaskscaleMDMConfig
    base_model_prefix = "model"
    _no_split_modules = ["_Layer"]

    def __init__(self, config: MaskscaleMDMConfig) -> None:
        super().__init__(config)
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size - 1, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.data.normal_(0.0, (2.0 / (5.0 * self.config.hidden_size)) ** 0.5)
        elif isinstance(module, _RMSNorm):
            module.weight.data.fill_(1.0)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """``labels``: -100 where not scored; the loss is the mean cross-entropy of the rest
        (maskscale's 1/t-weighted ELBO is ``maskscale eval ppl``'s job, see the model card)."""
        t = input_ids.shape[1]
        cos, sin = _rope_tables(
            self.config.hidden_size // self.config.num_attention_heads,
            t,
            self.config.rope_theta,
            input_ids.device,
        )
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()[:, None, None, :]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, key_mask)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return MaskedLMOutput(loss=loss, logits=logits)
