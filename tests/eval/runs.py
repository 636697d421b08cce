"""Tiny run directories for the eval tests, built in a second without the trainer.

A tiny causal Transformer *trained* (100 CPU steps, ~1 s) on arithmetic sequences of word
tokens (``w3 w5 w7 ...``, the trainer fixtures' "ramp" rows), or a random-weight bidirectional
MDM; each written as a run directory looks like a trained one: ``export/`` in the format of
trainer.checkpoint.export_checkpoint, ``config.yaml`` (corpus, tracking) and an MLflow run in a
real sqlite store. Shared by the zero-shot and generation tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from tests.trainer.conftest import write_tokenizer
from trainer.model import ModelConfig, Transformer
from trainer.objectives import build_objective

V, T = 32, 16
"""Vocabulary and row length of the tiny runs."""


def cloze_words(vocab_size: int = V) -> list[str]:
    """Words for ids 2..vocab_size-1 with every kind a cloze target can be: letter-only words
    (``w`` + the id's digits as letters: 12 -> ``wbc``), years (every 5th id: ``1885``...) and
    letters with digits (every 7th id otherwise: ``n7``)."""
    out = []
    for i in range(2, vocab_size):
        if i % 5 == 0:
            out.append(str(1880 + i))
        elif i % 7 == 0:
            out.append(f"n{i}")
        else:
            out.append("w" + "".join(chr(ord("a") + int(d)) for d in str(i)))
    return out


def ramp_batch(g: torch.Generator, b: int = 32) -> torch.Tensor:
    """Rows like make_corpus(kind="ramp"): x_i = (start + stride * i) mod V, stride 1..3."""
    start = torch.randint(0, V, (b, 1), generator=g)
    stride = torch.randint(1, 4, (b, 1), generator=g)
    return (start + stride * torch.arange(T + 1)) % V


def tiny_model(objective: str, train_steps: int) -> tuple[Transformer, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=V, seq_len=32)
    obj = build_objective(objective, mask_id=cfg.mask_id)
    model = Transformer(cfg, causal=obj.causal)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy CPU: more threads only contend (10x slower)
    try:
        for step in range(train_steps):  # new row keys each step: new MDM masks each step
            loss = obj.train_loss(model, ramp_batch(g), torch.arange(32) + 32 * step)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), cfg


def make_run(
    root: Path, objective: str, train_steps: int, corpus: Path, uri: str, words=None
) -> Path:
    """RUN_DIR with export/ (export_checkpoint's format), config.yaml and an MLflow run;
    ``words``: the tokenizer's words for ids 2.. (default ``w2 w3 ...``)."""
    from trainer.tracking import Tracker, TrackingConfig

    model, cfg = tiny_model(objective, train_steps)
    export = root / "export"
    export.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, export / "model.safetensors"
    )
    info = {
        "model": dataclasses.asdict(cfg),
        "objective": objective,
        "causal": objective == "arm",
        "mask_id": cfg.mask_id,
        "step": train_steps,
        "tokens": train_steps * 32 * T,
        "n_params": sum(p.numel() for p in model.parameters()),
        "corpus": str(corpus.resolve()),
        "format": "maskscale-export-v1",
        "checkpoint": str(root / "checkpoints" / f"step_{train_steps:08d}"),
    }
    (export / "config.json").write_text(json.dumps(info, indent=2))
    write_tokenizer(export / "tokenizer.json", V, words)
    tracking = {"uri": uri, "experiment": "eval-tests"}
    conf = {
        "corpus": str(corpus),
        "objective": objective,
        "run_dir": str(root),
        "tracking": tracking,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(conf))
    tracker = Tracker(TrackingConfig(**tracking), root)
    tracker.start({"objective": objective})
    tracker.finish()
    return root
