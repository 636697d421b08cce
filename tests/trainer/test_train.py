"""End to end: real DeepSpeed engines (gloo), real MLflow sqlite store, real Arrow corpus.

One reference ARM run (module fixture) serves several assertions: loss falls, run files,
MLflow record, export; and it is the uninterrupted baseline that killed-and-resumed runs
(1 process, and 2 processes resumed on 1) must reproduce step for step.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil  # a DeepSpeed dependency
import pytest
import torch
import yaml

from pipeline.configlib import ConfigError
from pipeline.shards import MANIFEST, ShardWriter, file_sha256, open_shard, shard_tokens
from trainer.checkpoint import CheckpointManager, consolidated_state_dict, load_export
from trainer.cli import load_train_config
from trainer.data import CorpusMismatchError
from trainer.engine import TrainingDiverged
from trainer.loop import train
from trainer.objectives import MDMObjective

from .conftest import make_corpus

REPO = Path(__file__).resolve().parents[2]
STEPS = 50
BASE = [
    "model=tiny-0.3M",
    "model_overrides.n_layer=2",
    "model_overrides.n_head=2",
    "model_overrides.d_model=32",
    "precision=fp32",
    "zero_stage=2",
    "batch.global_batch=8",
    "batch.micro_batch=4",
    "optim.lr=3e-3",
    "optim.lr_min=3e-4",
    "optim.warmup_min=5",
    "log.every=1",
    "log.row_keys=true",
    "eval.every=25",
    "eval.n_samples=4",
    "eval.batch_size=16",
    "eval.max_rows=32",
    "checkpoint.every=10",
    "checkpoint.keep=5",
    "tracking.enabled=false",
]


def config(corpus: Path, run_dir: Path, *extra: str):
    return load_train_config(None, [*BASE, f"corpus={corpus}", f"run_dir={run_dir}", *extra])


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> merged record of metrics.jsonl (a step logged twice: the last value wins)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in metrics(run_dir).items() if "loss" in r}


def row_keys(run_dir: Path) -> dict[int, list[int]]:
    out = {}
    for line in (run_dir / "row_keys" / "rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["keys"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    args: list[str], fault: str | None = None, nproc: int = 1
) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli train ...` (or torchrun with nproc).

    The environment is inherited as is: after the in-process runs of this module it holds the
    single-process RANK/WORLD_SIZE/MASTER_PORT that init_distributed set, which the child must
    recognise as not coming from a launcher.
    """
    env = dict(os.environ, MASKSCALE_FAULT=fault or "")
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.cli", "train", *args]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd = [*torchrun, f"--master_port={free_port()}", "-m", "pipeline.cli", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def halve_tokens(corpus: Path) -> Path:
    """Map every token id t to t // 2 in place (shards and manifest checksums).

    Half of the vocabulary then never occurs, which both objectives learn within a few dozen
    steps, while the ramps keep a sequential structure for the ARM to pick up.
    """
    manifest = json.loads((corpus / MANIFEST).read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = corpus / shard["path"]
            table, meta = open_shard(path)
            rows, sources = shard_tokens(table) // 2, set(table.column("source").to_pylist())
            assert sources == {"web"}
            with ShardWriter(path.with_suffix(".tmp"), meta) as writer:
                writer.write(rows, "web")
            del table, rows
            os.replace(path.with_suffix(".tmp"), path)
            shard["sha256"] = file_sha256(path)
    (corpus / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_corpus") / "corpus"
    splits = {"train": 1024, "validation": 32, "holdout_2024": 32}
    return halve_tokens(make_corpus(root, vocab_size=64, seq_len=32, splits=splits, kind="ramp"))


@pytest.fixture(scope="module")
def arm_run(corpus, tmp_path_factory):
    """The reference: ARM, 50 steps, one process, MLflow on a fresh sqlite store."""
    base = tmp_path_factory.mktemp("arm")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    cfg = config(
        corpus,
        base / "run",
        f"steps={STEPS}",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.experiment=test-train",
    )
    return base / "run", train(cfg), uri


def test_arm_loss_falls_and_schedule_ends_at_lr_min(arm_run):
    run_dir, summary, _ = arm_run
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(46, 51)) / 5
    assert last < first - 0.5, (first, last)
    assert metrics(run_dir)[STEPS]["lr"] == pytest.approx(3e-4, rel=1e-12)
    assert summary["steps"] == STEPS and summary["final_loss"] == loss[STEPS]


def test_run_files_metrics_and_export(arm_run, corpus):
    run_dir, summary, _ = arm_run
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model_overrides"]["vocab_size"] == 64
    assert resolved["model_overrides"]["seq_len"] == 32
    rec = metrics(run_dir)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory/rss_gb"):
        assert key in rec[10], key
    assert "mfu" not in rec[10]  # no peak for a CPU
    assert rec[10]["tokens"] == 10 * 8 * 32
    for split in ("validation", "holdout_2024"):
        assert f"val/{split}/loss" in rec[25] and f"val/{split}/ppl" in rec[STEPS]
    assert summary["val"]["val/validation/loss"] < rec[1]["loss"]
    assert summary["N"] == 2 * (4 * 32**2 + 3 * 32 * 128 + 2 * 32) + 32
    assert summary["tokens"] == STEPS * 8 * 32
    assert summary["flops"] == 6 * summary["N"] * summary["tokens"]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    model, info = load_export(run_dir / "export")
    assert info["objective"] == "arm" and info["step"] == STEPS and info["causal"]
    assert (run_dir / "export/tokenizer.json").read_bytes() == (
        corpus / "tokenizer.json"
    ).read_bytes()
    logits = model(torch.zeros(1, 32, dtype=torch.long))
    assert logits.shape == (1, 32, 64)


def test_mlflow_run_holds_params_metrics_artifacts(arm_run):
    from mlflow.tracking import MlflowClient

    run_dir, summary, uri = arm_run
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.003" and params["objective"] == "arm"
    assert params["resolved.N"] == str(summary["N"]) and len(params["corpus_manifest_sha256"]) == 64
    assert run.data.tags["family"] == "arm" and run.data.tags["N"] == str(summary["N"])
    assert "C" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == STEPS
    assert "val/holdout_2024/loss" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "summary.json"} <= names


def test_mdm_trains_and_reports_elbo(corpus, tmp_path):
    summary = train(
        config(
            corpus,
            tmp_path / "mdm",
            "objective=mdm",
            f"steps={STEPS}",
            "checkpoint.every=0",
            "log.row_keys=false",
        )
    )
    loss = losses(tmp_path / "mdm")
    first = sum(loss[s] for s in range(1, 11)) / 10
    last = sum(loss[s] for s in range(41, 51)) / 10
    assert last < first - 0.1, (first, last)  # the MDM loss is noisy (1/p weights)
    # the validation ELBO (fixed draws) ends well below an untrained model's ~ln(64) = 4.16
    assert summary["val"]["val/validation/loss"] < 3.7
    info = json.loads((tmp_path / "mdm/export/config.json").read_text())
    assert info["objective"] == "mdm" and info["causal"] is False and info["mask_id"] == 64
    assert info["mdm_eps"] == 1e-3  # the floor of its 1/t ELBO travels with the export


def test_kill_during_save_then_resume_reproduces_the_run(arm_run, corpus, tmp_path):
    """SIGKILL inside the save of step 30 (after the shards, before the rename): the run
    resumes from step 20 and every loss and every row of steps 1..50 match the reference."""
    ref_dir = arm_run[0]
    run_dir = tmp_path / "killed"
    args = [*BASE, f"corpus={corpus}", f"run_dir={run_dir}", f"steps={STEPS}"]
    proc = run_cli(args, fault="save:30")
    assert proc.returncode == -9, proc.stderr[-2000:]
    mgr = CheckpointManager(run_dir, keep=5)
    assert mgr.latest().step == 20
    assert list((run_dir / "checkpoints").glob(".tmp-step00000030"))  # the half-done save
    summary = train(config(corpus, run_dir, f"steps={STEPS}"))
    assert summary["steps"] == STEPS
    got, want = losses(run_dir), losses(ref_dir)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6), s
    keys, ref_keys = row_keys(run_dir), row_keys(ref_dir)
    assert keys == ref_keys
    flat = [k for s in sorted(keys) for k in keys[s]]
    assert len(flat) == len(set(flat)) == STEPS * 8  # no row repeated or skipped


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(arm_run, corpus, tmp_path):
    """torchrun 2 x ZeRO-2 (micro 4, no accumulation) vs the 1-process reference (micro 4,
    accumulation 2); killed after step 27, resumed on 1 process from its step-20 checkpoint
    (universal checkpoint conversion)."""
    ref_dir = arm_run[0]
    run_dir = tmp_path / "two"
    args = [*BASE, f"corpus={corpus}", f"run_dir={run_dir}", f"steps={STEPS}"]
    proc = run_cli(args, fault="step:27", nproc=2)
    assert proc.returncode != 0 and "step 27/50" in proc.stdout, proc.stderr[-3000:]
    two, want = losses(run_dir), losses(ref_dir)
    assert sorted(two) == list(range(1, 28))
    for s in two:
        assert two[s] == pytest.approx(want[s], abs=1e-5), s
    ref = CheckpointManager(run_dir, keep=5).latest()
    assert ref.step == 20 and ref.meta["world_size"] == 2
    summary = train(config(corpus, run_dir, f"steps={STEPS}"))
    assert (run_dir / "checkpoints/universal/step00000020/zero").is_dir()
    assert summary["world_size"] == 1
    resumed = losses(run_dir)
    for s in range(21, STEPS + 1):
        assert resumed[s] == pytest.approx(want[s], abs=1e-5), s


def torchrun_train(args: list[str], nproc: int, timeout: float = 120) -> tuple[str, str]:
    """`torchrun --nproc_per_node=nproc -m pipeline.cli train ...`; fails the test on a
    non-zero exit, or after ``timeout`` s on a hang (torchrun and its workers are killed)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd = [*torchrun, f"--master_port={free_port()}", "-m", "pipeline.cli", "train", *args]
    env = dict(os.environ, MASKSCALE_FAULT="")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in its own session: kill them by pid, then torchrun
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{nproc}-process run hung; stderr tail:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
def test_mdm_zero3_two_processes_with_length_cuts(corpus, tmp_path):
    """MDM under ZeRO-3 on 2 processes with half of the rows cut equals the 1-process run.

    Ranks draw different cuts, yet each runs one forward per micro-batch, so ZeRO-3's
    collective weight gathers stay in step (a hang fails after 120 s). Masks and cuts come
    from row keys, and rank r's micro-batch holds the same rows as micro-step r of the
    1-process run (micro 4, accumulation 2), so each forward/backward computes the same
    numbers. The runs differ only in how two gradients combine: (g0 + g1) / 2 over ranks vs
    g0 / 2 + g1 / 2 accumulated; with two addends both are one correctly rounded fp32 add
    (halving is exact), so losses and validation must agree bit for bit. Both runs go through
    torchrun, so they use the same intra-op thread count (torchrun sets OMP_NUM_THREADS=1).
    """
    args = [
        *BASE,
        f"corpus={corpus}",
        "objective=mdm",
        "mdm.random_length_prob=0.5",
        "zero_stage=3",
        "steps=4",
        "eval.every=2",
        "eval.max_rows=16",
        "checkpoint.every=2",
    ]
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    torchrun_train([*args, f"run_dir={two_dir}"], nproc=2)
    torchrun_train([*args, f"run_dir={one_dir}"], nproc=1)
    keys = [k for ks in row_keys(two_dir).values() for k in ks]
    seq_len = 32
    cuts = [MDMObjective(64, random_length_prob=0.5).draw_row(k, seq_len).length for k in keys]
    assert sum(n < seq_len for n in cuts) >= 4  # the run really cut rows
    two, one = (json.loads((d / "summary.json").read_text()) for d in (two_dir, one_dir))
    assert (two["world_size"], one["world_size"], two["steps"]) == (2, 1, 4)
    got, want = losses(two_dir), losses(one_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert got == want  # exact, see the docstring
    assert two["val"] == one["val"] and "val/validation/loss" in one["val"]
    assert metrics(two_dir)[4]["grad_norm"] == pytest.approx(metrics(one_dir)[4]["grad_norm"])


def test_zero3_bf16_smoke(corpus, tmp_path):
    summary = train(
        config(
            corpus,
            tmp_path / "z3",
            "zero_stage=3",
            "precision=bf16",
            "steps=4",
            "batch.global_batch=4",
            "eval.max_rows=16",
        )
    )
    loss = losses(tmp_path / "z3")
    assert len(loss) == 4 and all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    assert torch.isfinite(torch.tensor(summary["val"]["val/validation/loss"]))
    state = consolidated_state_dict(CheckpointManager(tmp_path / "z3", keep=1).latest())
    assert state["embed.weight"].dtype == torch.float32 and state["embed.weight"].shape == (65, 32)


def test_mismatched_corpus_refused(corpus, tmp_path, arm_run):
    with pytest.raises(CorpusMismatchError, match="vocab_size"):
        train(config(corpus, tmp_path / "bad", "steps=2", "model_overrides.vocab_size=100"))
    assert not (tmp_path / "bad" / "checkpoints").exists()
    other = make_corpus(tmp_path / "other", vocab_size=80, seq_len=32)
    resume = f"checkpoint.resume={arm_run[0] / 'checkpoints'}"
    with pytest.raises(ConfigError, match="cannot resume.*model"):
        train(config(other, tmp_path / "resumed", f"steps={STEPS}", resume))


def test_divergence_stops_with_last_good_checkpoint_intact(corpus, tmp_path):
    run_dir = tmp_path / "nan"
    cfg = config(
        corpus,
        run_dir,
        "steps=20",
        "optim.lr=1e30",
        "optim.warmup_min=1",
        "checkpoint.every=1",
        "eval.every=0",
    )
    with pytest.raises(TrainingDiverged, match="at step 2"):
        train(cfg)
    ref = CheckpointManager(run_dir, keep=5).latest()
    assert ref.step == 1
    assert all(torch.isfinite(v).all() for v in consolidated_state_dict(ref).values())


def test_dead_tracking_server_does_not_stop_training(corpus, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = config(
        corpus,
        tmp_path / "dead",
        "steps=3",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.timeout_s=1",
        "eval.every=0",
    )
    with pytest.warns(RuntimeWarning, match="MLflow"):
        summary = train(cfg)
    assert summary["steps"] == 3 and sorted(losses(tmp_path / "dead")) == [1, 2, 3]


def test_export_command(arm_run, tmp_path):
    from pipeline.cli import main

    run_dir = arm_run[0]
    assert (
        main(["export", str(run_dir), "--tag", "step00000040", "--out", str(tmp_path / "e")]) == 0
    )
    model, info = load_export(tmp_path / "e")
    assert info["step"] == 40 and (tmp_path / "e" / "tokenizer.json").is_file()
    assert main(["export", str(tmp_path / "no_run")]) == 1
