"""Mixed precision: what ``precision=auto|bf16|fp32`` means and how DeepSpeed is told.

``auto`` (the default) resolves once, before anything is recorded: bf16 on a GPU that supports
it (``torch.cuda.is_bf16_supported()``), fp32 everywhere else. bf16 on a CPU is several times
slower than fp32, so a CPU run asking for nothing gets fp32. The resolved value is what
config.yaml, the checkpoint identity and MLflow hold, so a resumed ``auto`` run is compared
with the precision its checkpoint really used.

bf16 means: bf16 weights and activations in the module, fp32 master weights and Adam states in
the optimizer, and gradients *accumulated in fp32* over the micro-batches of a step. DeepSpeed
0.19.8 accumulates in the model dtype unless ``data_types.grad_accum_dtype`` says otherwise, so
with only ``bf16.enabled`` a step of 32 micro-batches sums 32 gradients in bf16 (8 mantissa
bits). What ``grad_accum_dtype=fp32`` does, read from DeepSpeed's code and checked by
tests/trainer/test_precision.py against an exact fp32 sum of the same bf16 micro-batch
gradients:

* ZeRO-1: the engine (``_do_optimizer_sanity_check``) replaces the ZeRO-1 optimizer by
  ``BF16_Optimizer``: each micro-batch's bf16 gradients are added into one fp32 buffer per
  parameter (``backward_epilogue``), fp32 master weights and Adam states are partitioned over
  the data-parallel ranks (the ZeRO-1 layout). Its one all-reduce per step casts those buffers
  to ``communication_data_type``, which for bf16 defaults to bf16 and would round the fp32 sum
  back to bf16 (measured: that alone leaves a third of the bf16-accumulation error), so this
  path also sets ``communication_data_type=fp32`` (2x bytes, but one all-reduce per *step*).
  Memory: the fp32 gradient buffer is the whole model on every rank (4 bytes/parameter);
  ZeRO-2 partitions it.
* ZeRO-2: ``DeepSpeedZeroOptimizer`` keeps the gradient partition in an fp32 buffer and adds
  each micro-batch's reduced bf16 gradient into it.
* ZeRO-3: the flat gradient-partition buffer is allocated in the accumulation dtype, fp32.
  At stages 2 and 3 gradients are reduced over ranks once per *micro-batch*; that reduction
  stays in bf16 (one rounding of one micro-batch's sum over ranks, like the bf16 gradient
  itself), halving the bytes of the collective that dominates their communication.
* ZeRO-0 (plain data parallel): DeepSpeed has no such path. Its stage-0 bf16 optimizer
  (``FP16_UnfusedOptimizer``) sums micro-batches in the bf16 ``.grad`` of the module, and asking
  for fp32 accumulation without ZeRO raises ``NotImplementedError``. We *handle* the
  combination rather than refuse it: zero_stage=0 with bf16 runs DeepSpeed's ``BF16_Optimizer``
  (DeepSpeed stage 1, above). On one GPU that is exactly plain training with fp32 master
  weights and fp32 accumulators; on several it also partitions the fp32 master weights and
  Adam states, which only saves memory. Refusing would break every zero_stage=0 config the
  moment ``auto`` resolves to bf16 on a GPU. The checkpoint then holds a
  ``bf16_zero_pp_rank_*`` optimizer shard per rank with the fp32 master weights, which the
  export (trainer/checkpoint.py) reads instead of the bf16 module weights.
"""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.configlib import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(
    precision: str, device: torch.device | None = None
) -> Literal["fp32", "bf16"]:
    """``auto`` -> bf16 on a bf16-capable GPU, else fp32; fp32/bf16 are returned unchanged.

    ``device`` is the device this process trains on (None: CUDA if available).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision  # type: ignore[return-value]
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_precision(precision: str, zero_stage: int) -> dict:
    """The DeepSpeed config entries for ``precision`` (resolved first) at ``zero_stage``.

    Returns ``bf16``, and for bf16 also ``data_types``, the ZeRO ``stage`` DeepSpeed must run
    (1 for our stage 0, see the module docstring) and, on the BF16_Optimizer path,
    ``communication_data_type``.
    """
    bf16 = resolve_precision(precision) == "bf16"
    out: dict = {"bf16": {"enabled": bf16}, "stage": zero_stage}
    if not bf16:
        return out  # fp32 weights: gradients accumulate in fp32 already
    out["data_types"] = {"grad_accum_dtype": "fp32"}
    if zero_stage <= 1:  # BF16_Optimizer: its per-step all-reduce must not round the sum
        out["stage"] = 1
        out["communication_data_type"] = "fp32"
    return out
