"""Build the training model: plain, or directly partitioned under ZeRO-3.

Why: a plain build materialises every weight on every rank before DeepSpeed partitions it, so
a model larger than one host's memory (8 ranks x fp32 weights at 2B parameters is 64 GB)
cannot even start. Under ZeRO-3 we construct it inside ``deepspeed.zero.Init``: each
submodule's weights are partitioned over the ranks as soon as that submodule is built, so
a rank never holds more than one submodule's full weights plus its own 1/world share.

Initialisation stays the model's own. ``zero.Init`` partitions the submodules before
``Transformer.reset_parameters`` (the parent's init) could see them, so the model is built with
``init=False`` and ``reset_parameters`` runs afterwards, outside the context: it gathers one
weight at a time, fills it from the CPU generator in fp32 and re-partitions it. The result
equals a plain build with the same seed (to the parameter dtype) on any number of processes.
"""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.model import ModelConfig, Transformer


def build_model(
    cfg: TrainConfig, model_cfg: ModelConfig, causal: bool, world_size: int
) -> Transformer:
    """The Transformer of this run (partitioned under ZeRO-3), initialised from the current
    torch seed; needs an initialised process group when ``cfg.zero_stage == 3``."""
    kwargs = {"activation_checkpointing": cfg.activation_checkpointing}
    if cfg.zero_stage != 3:
        return Transformer(model_cfg, causal, **kwargs)
    import deepspeed

    from trainer.engine import build_ds_config

    ds_config = build_ds_config(cfg, world_size, d_model=model_cfg.d_model)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(model_cfg, causal, init=False, **kwargs)
    model.reset_parameters()
    return model


def local_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the full model): ZeRO-3 partitions count their
    local shard (``ds_tensor``), plain parameters their full size."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            full += p.ds_numel
        else:
            local += p.numel()
            full += p.numel()
    return local, full
