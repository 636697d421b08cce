"""Checkpoints on a real DeepSpeed engine (gloo, one process): round trip, atomicity, pruning,
RNG state, export to safetensors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.configlib import from_dict
from trainer.checkpoint import (
    LATEST,
    CheckpointManager,
    consolidated_state_dict,
    export_checkpoint,
    load_export,
    tag_for,
)
from trainer.config import TrainConfig
from trainer.engine import build_engine, init_distributed
from trainer.model import ModelConfig, Transformer
from trainer.objectives import ARMObjective

MODEL = ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=32, seq_len=8)


def make_engine(zero_stage: int = 2, seed: int = 0):
    init_distributed()
    cfg = from_dict(
        TrainConfig,
        {
            "corpus": "unused",
            "budget": {"steps": 10},
            "precision": "fp32",
            "zero_stage": zero_stage,
            "batch": {"global_batch": 4},
            "optim": {"lr": 1e-2, "warmup_min": 2},
        },
    )
    torch.manual_seed(seed)
    return build_engine(cfg, Transformer(MODEL, causal=True), total_steps=10, world_size=1)


def step(engine, i: int) -> float:
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, MODEL.vocab_size, (4, MODEL.seq_len + 1), generator=g)
    loss = ARMObjective().train_loss(engine, tokens, torch.arange(4))
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def meta(stage: int = 2) -> dict:
    return {
        "zero_stage": stage,
        "model": MODEL.__dict__,
        "objective": "arm",
        "causal": True,
        "mask_id": MODEL.vocab_size,
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An engine trained 3 steps and saved at step 3, plus what happened after the save."""
    run_dir = tmp_path_factory.mktemp("ckpt_run")
    engine = make_engine()
    for i in range(3):
        step(engine, i)
    mgr = CheckpointManager(run_dir, keep=2)
    random.seed(7)
    torch.manual_seed(7)
    np.random.seed(7)
    ref = mgr.save(engine, 3, {"step": 3, "loader": {"position": 12}}, meta())
    after = {
        "python": random.random(),
        "torch": torch.rand(1).item(),
        "numpy": np.random.rand(),
        "losses": [step(engine, i) for i in range(3, 6)],
        "lr": engine.get_lr()[0],
    }
    return run_dir, ref, after, engine


def test_save_writes_a_complete_checkpoint(saved):
    run_dir, ref, _, _ = saved
    root = run_dir / "checkpoints"
    assert ref.path == root / tag_for(3) and ref.step == 3
    assert (root / LATEST).read_text() == tag_for(3)
    assert (ref.path / "meta.json").is_file() and (ref.path / "rng_rank0.pt").is_file()
    assert json.loads((ref.path / "meta.json").read_text())["world_size"] == 1
    assert not list(root.glob(".tmp-*"))


def test_resume_restores_weights_optimizer_schedule_rng_and_client_state(saved):
    run_dir, ref, after, _ = saved
    engine = make_engine(seed=123)  # different init: everything must come from the checkpoint
    mgr = CheckpointManager(run_dir, keep=2)
    client = mgr.load(engine, mgr.resolve("auto"), universal=False)
    assert client["step"] == 3 and client["loader"] == {"position": 12}
    assert "universal_checkpoint_info" in client and "rng" in client
    assert random.random() == after["python"]
    assert torch.rand(1).item() == after["torch"]
    assert np.random.rand() == after["numpy"]
    losses = [step(engine, i) for i in range(3, 6)]
    assert losses == pytest.approx(after["losses"], abs=1e-6)
    assert engine.get_lr()[0] == pytest.approx(after["lr"], rel=1e-12)


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    engine = make_engine()
    step(engine, 0)
    mgr = CheckpointManager(tmp_path, keep=3)
    good = mgr.save(engine, 1, {"step": 1}, meta())
    step(engine, 1)
    real_save = engine.save_checkpoint

    def dies_midway(save_dir, tag, client_state, save_latest):
        real_save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest)
        (tmp_path / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(engine, "save_checkpoint", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(engine, 2, {"step": 2}, meta())
    assert list((tmp_path / "checkpoints").glob(".tmp-*"))  # the half-written save is there...
    assert mgr.resolve("auto").path == good.path  # ...but resume ignores it
    fresh = make_engine(seed=5)
    assert mgr.load(fresh, mgr.resolve("auto"), universal=False)["step"] == 1
    # a `latest` naming a vanished checkpoint falls back to the newest complete one
    (tmp_path / "checkpoints" / LATEST).write_text(tag_for(99))
    assert mgr.latest().path == good.path
    monkeypatch.undo()
    mgr.save(engine, 2, {"step": 2}, meta())  # the next save cleans the temporaries
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert mgr.latest().step == 2


def test_keep_last_k_and_resume_modes(tmp_path):
    engine = make_engine()
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in range(1, 5):
        step(engine, s)
        mgr.save(engine, s, {"step": s}, meta())
    assert [r.step for r in mgr.complete()] == [3, 4]
    assert mgr.resolve(str(tmp_path / "checkpoints" / tag_for(3))).step == 3
    assert mgr.resolve(str(tmp_path / "checkpoints")).step == 4
    with pytest.raises(FileExistsError, match="resume=auto"):
        mgr.resolve("none")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        mgr.resolve(str(tmp_path / "nowhere"))
    assert CheckpointManager(tmp_path / "fresh", keep=1).resolve("none") is None
    ref = mgr.latest()
    assert not mgr.needs_universal(ref, 2)
    assert CheckpointManager(tmp_path, keep=2, world_size=2).needs_universal(ref, 2)
    with pytest.raises(ValueError, match="zero_stage=2"):
        mgr.needs_universal(ref, 3)


@pytest.mark.parametrize("stage", [0, 2])
def test_export_matches_engine_weights(tmp_path, stage):
    engine = make_engine(zero_stage=stage)
    for i in range(2):
        step(engine, i)
    ref = CheckpointManager(tmp_path, keep=1).save(engine, 2, {"step": 2}, meta(stage))
    state = consolidated_state_dict(ref)
    module = {k: v for k, v in engine.module.state_dict().items() if k in state}
    assert set(state) == {k for k, _ in engine.module.named_parameters()}
    for k, v in module.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    out = export_checkpoint(ref, tmp_path / "export", tok)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    model, info = load_export(out)
    assert info["causal"] is True and info["mask_id"] == MODEL.vocab_size
    x = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(model(x), engine.module.eval()(x))
