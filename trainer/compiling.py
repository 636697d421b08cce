"""``torch.compile`` for training: when it is on, and what gets compiled.

Why per block: every Transformer block has the same code, so compiling ``Block`` once yields
one graph (forward and backward) that all L blocks reuse; the compiler fuses RMSNorm, RoPE,
the SwiGLU gate and the residual adds into a few kernels around the matmuls and attention.
The embedding, the chunked head loss (a Python loop over chunks, ``trainer/losses.py``) and the
per-row attention of length-cut rows (``trainer/model.py: cut_attention``, excluded with
``torch.compiler.disable``) stay eager: they have data-dependent shapes that would recompile.

Why in place and before DeepSpeed: ``nn.Module.compile()`` keeps the module objects and their
parameter names (a ``torch.compile(model)`` wrapper would prefix every checkpoint key with
``_orig_mod.``), so checkpoints, exports and resumes are the same compiled or not, and
``deepspeed.initialize`` sees the ordinary module tree. DeepSpeed's own ``engine.compile()``
compiles the whole module (head loss included), which is why it is not used.

``compile: auto`` is meant to mean "on where measured faster". On CPU it is off: compiling
costs about 30 s of a 2-core machine per process, more than short CPU runs gain. On CUDA it
is on, but that is an expectation, not a measurement: no GPU was available when this was
written. ``benchmarks/trainer_bench.py --compile-compare`` measures compiled and eager steps
in one run; flip the CUDA default if compiled loses.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.configlib import ConfigError


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """Resolve the ``compile`` config value (true, false or auto) for ``device``."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"compile: true, false or auto, got {setting!r}")


def compile_blocks(model: nn.Module, **kwargs) -> int:
    """Compile each of ``model.blocks`` in place (``kwargs`` go to ``torch.compile``);
    returns how many. Compilation itself happens lazily, in the first forward pass."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks to compile")
    for block in blocks:
        block.compile(**kwargs)
    return len(blocks)
