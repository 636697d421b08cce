"""Compute budgets and throughput accounting: C = 6 N D, steps from C, MFU.

The study compares ARMs and MDMs at equal *training compute* C, so the number of steps of a
run is derived from C with the paper's convention C = 6 N D (N non-embedding parameters, D
training tokens): steps = C / (6 N * global_batch * seq_len), rounded to the nearest step.
The realised D and C (after rounding) are what gets logged.

MFU is reported in two counts against a table of dense bf16 peaks, because published MFU
figures differ mostly in what they count, not in how fast they ran:

* ``mfu``: the project's count, ``6 N + 12 L d T`` per token (``trainer.model.flops_per_token``:
  non-embedding weights plus attention; the C = 6 N D of the budget plus attention).
* ``mfu_litgpt``: litgpt's, ``6 P + 12 L d T`` with P = all parameters, embedding and head
  included (``trainer.model.flops_per_token_litgpt``). Larger by ``6 (2V + 1) d`` per token:
  1.10x ours at 1028M and 1.22x at 170M (32k vocabulary, T = 2048).

The goal for the first GPU run (issue 17, item 9) is >= 50% MFU (ours) for the 1028M ARM in bf16
on one H100; unmeasured until a GPU run reports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.configlib import ConfigError
from trainer.config import BudgetConfig
from trainer.model import ModelConfig, flops_per_token, flops_per_token_litgpt

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, from the vendors' data sheets
# (SXM parts). Matched by substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


@dataclass(frozen=True)
class Budget:
    """A resolved budget: every quantity of C = 6 N D and the steps that realise it."""

    n_params: int
    """N: non-embedding parameters."""
    steps: int
    """Optimizer steps S."""
    tokens_per_step: int
    """global_batch * seq_len."""
    tokens: int
    """D = S * tokens_per_step (realised, after rounding S)."""
    flops: float
    """C = 6 N D (realised)."""
    requested: str
    """What the config asked for, e.g. 'flops=6e+18'."""

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_budget(cfg: BudgetConfig, n_params: int, global_batch: int, seq_len: int) -> Budget:
    """Turn the one budget given (flops, tokens or steps) into steps, tokens and FLOPs."""
    cfg.validate()
    if n_params <= 0:
        raise ValueError(f"n_params must be > 0, got {n_params}")
    per_step = global_batch * seq_len
    if cfg.flops is not None:
        steps = round(cfg.flops / (6 * n_params * per_step))
        requested = f"flops={cfg.flops:g}"
    elif cfg.tokens is not None:
        steps = round(cfg.tokens / per_step)
        requested = f"tokens={cfg.tokens}"
    else:
        steps = int(cfg.steps)
        requested = f"steps={steps}"
    if steps < 1:
        raise ConfigError(
            f"budget {requested} is less than one step of {per_step} tokens "
            f"(N={n_params}); raise the budget or lower batch.global_batch"
        )
    tokens = steps * per_step
    return Budget(
        n_params=n_params,
        steps=steps,
        tokens_per_step=per_step,
        tokens=tokens,
        flops=6.0 * n_params * tokens,
        requested=requested,
    )


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (CPU, other GPUs)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(
    flops_per_token: float, tokens_per_s: float, n_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' bf16 peak."""
    if not peak or n_devices < 1:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)


def mfu_counts(
    model_cfg: ModelConfig, seq_len: int, tokens_per_s: float, n_devices: int, peak: float | None
) -> dict[str, float]:
    """``{"mfu": ours, "mfu_litgpt": litgpt's}`` for rows of ``seq_len`` tokens (see the module
    docstring); empty when the peak is unknown (CPU, unlisted GPUs)."""
    counts = {
        "mfu": flops_per_token(model_cfg, seq_len),
        "mfu_litgpt": flops_per_token_litgpt(model_cfg, seq_len),
    }
    out = {k: mfu(fpt, tokens_per_s, n_devices, peak) for k, fpt in counts.items()}
    return {k: v for k, v in out.items() if v is not None}
