"""ZeRO-3 models built directly partitioned (``deepspeed.zero.Init``, trainer/build.py).

The 1-process checks run in this process; the 2-process one launches torchrun on
zero_init_worker.py: each rank must hold about half of the weights after construction, the
weights must equal a plain build from the same seed, and a short ZeRO-3 MDM run (with length
cuts, activation checkpointing and overlapped communication) must reproduce the losses and the
export of the same run built plainly on one process with ZeRO-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.configlib import from_dict
from trainer.build import build_model, local_numel
from trainer.checkpoint import load_export
from trainer.cli import load_train_config
from trainer.config import TrainConfig
from trainer.engine import init_distributed
from trainer.loop import train
from trainer.model import ModelConfig, Transformer

from .conftest import make_corpus
from .test_train import free_port, losses

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero_init_worker.py")
MODEL = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=50, seq_len=16)
RUN = [
    "model=tiny-0.3M",
    "model_overrides.n_layer=3",
    "model_overrides.n_head=2",
    "model_overrides.d_model=32",
    "objective=mdm",
    "mdm.random_length_prob=0.5",
    "precision=fp32",
    "steps=4",
    "batch.global_batch=8",
    "batch.micro_batch=4",
    "optim.lr=3e-3",
    "optim.warmup_min=1",
    "log.every=1",
    "eval.every=0",
    "eval.n_samples=2",
    "eval.max_rows=16",
    "checkpoint.every=0",
    "tracking.enabled=false",
]


def zero3(precision: str) -> TrainConfig:
    data = {"corpus": "c", "budget": {"steps": 1}, "zero_stage": 3, "precision": precision}
    return from_dict(TrainConfig, {**data, "batch": {"global_batch": 2}})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_process_zero_init_equals_plain_build(precision):
    import deepspeed

    dist = init_distributed()
    torch.manual_seed(3)
    model = build_model(zero3(precision), MODEL, causal=True, world_size=dist.world_size)
    assert all(hasattr(p, "ds_id") for p in model.parameters())  # really built partitioned
    assert local_numel(model)[1] == sum(p.numel() for p in Transformer(MODEL, True).parameters())
    torch.manual_seed(3)
    ref = Transformer(MODEL, causal=True)
    ref = ref.bfloat16() if precision == "bf16" else ref
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q), name


def test_init_does_not_depend_on_dtype_or_device_of_construction():
    """The draws of the submodules' own inits are forked away: only the seed matters."""
    torch.manual_seed(4)
    plain = Transformer(MODEL, causal=False)
    after = torch.randn(3)
    torch.manual_seed(4)
    with torch.device("meta"):
        Transformer(MODEL, causal=False, init=False)  # consumes nothing
    lazy = Transformer(MODEL, causal=False, init=False).bfloat16()
    lazy.reset_parameters()
    assert torch.equal(torch.randn(3), after)  # reset_parameters drew as much as a plain build
    for (name, p), (_, q) in zip(lazy.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q.bfloat16()), name


@pytest.mark.slow
def test_two_process_zero3_partitioned_build_trains_like_plain_one_process(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=32, kind="ramp")
    extra = ["zero_stage=3", "activation_checkpointing=2", "comm.overlap_comm=true"]
    out = tmp_path / "out"
    out.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd = [*torchrun, f"--master_port={free_port()}", str(WORKER), str(out), str(corpus)]
    cmd += [str(tmp_path / "z3"), *RUN, *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), MASKSCALE_FAULT="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        for precision in ("fp32", "bf16"):
            check = result[precision]
            assert check["mismatched"] == [] and check["rng_in_step"], check
            assert check["full"] == check["plain"]
            # each rank stores half of every partitioned weight (+ padding) and whole RMSNorm
            # weights (below the persistence threshold 10 d_model): 3 x 2 + 1 vectors of 64
            assert check["local"] <= check["full"] / 2 + 7 * 64 + 64, check
    # the same run, built plainly on one process with ZeRO-2 and no checkpointing
    ref = train(load_train_config(None, [f"corpus={corpus}", f"run_dir={tmp_path / 'z2'}", *RUN]))
    got, want = losses(tmp_path / "z3"), losses(tmp_path / "z2")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    assert ranks[0]["summary"]["world_size"] == 2 and ref["world_size"] == 1
    exported, info = load_export(tmp_path / "z3" / "export")
    reference, _ = load_export(tmp_path / "z2" / "export")
    assert info["step"] == 4
    for (name, p), (_, q) in zip(exported.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_zero3_partitioned_build_resumes_exactly(tmp_path):
    """Killed after step 3 (checkpoint at step 2), the resumed ZeRO-3 run rebuilt under
    zero.Init loads its shards and reproduces the uninterrupted run."""
    from .test_train import run_cli

    corpus = make_corpus(tmp_path / "corpus", vocab_size=64, seq_len=32, kind="ramp")
    args = [f"corpus={corpus}", *RUN, "zero_stage=3", "checkpoint.every=2"]
    ref = train(load_train_config(None, [*args, f"run_dir={tmp_path / 'ref'}"]))
    proc = run_cli([*args, f"run_dir={tmp_path / 'killed'}"], fault="step:3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    resumed = train(load_train_config(None, [*args, f"run_dir={tmp_path / 'killed'}"]))
    assert resumed["steps"] == ref["steps"] == 4
    got, want = losses(tmp_path / "killed"), losses(tmp_path / "ref")
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
