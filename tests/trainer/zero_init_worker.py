"""Worker for test_zero_init.py, started by torchrun: ``zero_init_worker.py OUT CORPUS RUN_DIR``.

On every rank: build the model under ZeRO-3 ``zero.Init`` (fp32 and bf16), record how many
elements this rank stores, gather the full weights and compare them with a plain build from
the same seed; then train a short MDM run with ZeRO-3, activation checkpointing and explicit
communication settings (``trainer.loop.train``, as the CLI does). Rank r writes OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.configlib import from_dict
from trainer.build import build_model, local_numel
from trainer.cli import load_train_config
from trainer.config import TrainConfig
from trainer.engine import init_distributed
from trainer.loop import train
from trainer.model import ModelConfig, Transformer

MODEL = ModelConfig(n_layer=3, n_head=2, d_model=64, vocab_size=100, seq_len=16)


def init_check(precision: str, world_size: int) -> dict:
    import deepspeed

    data = {"corpus": "c", "budget": {"steps": 1}, "zero_stage": 3, "precision": precision}
    cfg = from_dict(TrainConfig, {**data, "batch": {"global_batch": 2 * world_size}})
    torch.manual_seed(11)
    model = build_model(cfg, MODEL, causal=False, world_size=world_size)
    after_zero = torch.randn(4).tolist()  # the generator ends where a plain build leaves it
    local, full = local_numel(model)
    torch.manual_seed(11)
    ref = Transformer(MODEL, causal=False)
    after_plain = torch.randn(4).tolist()
    if precision == "bf16":
        ref = ref.bfloat16()
    mismatched = []
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if p.dtype != q.dtype or not torch.equal(p.detach().cpu(), q.detach()):
                mismatched.append(name)
    return {
        "local": local,
        "full": full,
        "plain": sum(p.numel() for p in ref.parameters()),
        "mismatched": mismatched,
        "rng_in_step": after_zero == after_plain,
    }


def main(out: Path, corpus: str, run_dir: str, *overrides: str) -> None:
    dist = init_distributed()
    result = {p: init_check(p, dist.world_size) for p in ("fp32", "bf16")}
    cfg = load_train_config(None, [f"corpus={corpus}", f"run_dir={run_dir}", *overrides])
    result["summary"] = train(cfg)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
