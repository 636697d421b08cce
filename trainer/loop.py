"""The training loop: wires data, model, objective, engine, checkpoints, tracking, validation.

This module only orchestrates; each piece lives in its own module (data.py, model.py,
objectives.py, engine.py, checkpoint.py, tracking.py, budget.py). Read ``train`` top to
bottom: check the corpus against the model, resolve the budget, build the engine, resume,
then step -> log -> validate -> checkpoint until the budget is spent, save, export, summarise.

Everything a run needs to be re-created is written down: ``run_dir/config.yaml`` (the
resolved config, also in every checkpoint and as MLflow params), ``metrics.jsonl``,
``summary.json``, ``loss_curve.png`` and ``export/`` (plain fp32 safetensors).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipeline.configlib import ConfigError, to_dict
from pipeline.shards import MANIFEST, TOKENIZER, read_manifest
from trainer.budget import Budget, mfu_counts, peak_flops, resolve_budget
from trainer.checkpoint import CheckpointManager, CheckpointRef, export_checkpoint, fault_point
from trainer.config import TrainConfig
from trainer.engine import (
    DistInfo,
    barrier,
    batch_geometry,
    build_engine,
    eval_splits,
    init_distributed,
    keep_fused,
    memory_metrics,
    resolve_fused,
    train_step,
    warmup_steps,
)
from trainer.model import ModelConfig, non_embedding_params
from trainer.precision import resolve_precision
from trainer.resume import check_saved, describe, reconcile, schedule_record
from trainer.validation import Evaluator

IDENTITY_KEYS = ("objective", "model", "global_batch", "seed", "precision", "tokenizer_sha256")
"""What a checkpoint must share with the config that resumes it."""
IDENTITY_KEYS += ("task",)  # pretrain | sft (checkpoints from before it have no such key)
IDENTITY_KEYS += ("engine",)  # deepspeed | plain: their checkpoint layouts differ


@dataclass
class Setup:
    """Everything resolved before the first step."""

    cfg: TrainConfig
    dist: DistInfo
    manifest: dict
    model_cfg: ModelConfig
    budget: Budget
    micro: int
    accum: int
    identity: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    """The settings the optimisation depends on (trainer/resume.py), saved in checkpoints."""
    reschedules: list = field(default_factory=list)
    """Every resume that changed ``schedule`` (checkpoint.reschedule=true), oldest first."""
    sft: Any = None
    """task=sft: the ``trainer.sft.SFTSource`` (init, rows, reports); None when pretraining."""
    loss_window: list[float] = field(default_factory=list)
    """Losses of the steps since the last log point, restored from the checkpoint on resume."""


def say(dist: DistInfo, text: str) -> None:
    if dist.rank == 0:
        print(f"[maskscale] {text}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_model(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    """Preset + overrides; vocab_size and seq_len come from the corpus unless overridden."""
    from trainer.data import check_corpus
    from trainer.presets import load_preset

    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", manifest["tokenizer"]["vocab_size"])
    overrides.setdefault("seq_len", manifest["seq_len"])
    model_cfg = load_preset(cfg.model, **overrides)
    check_corpus(cfg.corpus, model_cfg.vocab_size, model_cfg.seq_len)
    cfg.model_overrides = overrides  # the resolved config records what was used
    return model_cfg


def prepare(cfg: TrainConfig, dist: DistInfo, ref: CheckpointRef | None) -> Setup:
    """Check the corpus, resolve model, budget and batch geometry; refuse a foreign resume."""
    sft, budget_cfg = None, cfg.budget
    if cfg.task == "sft":  # model, tokenizer and data from the init run and the SFT file
        from trainer.sft import prepare_sft, sft_budget

        sft = prepare_sft(cfg)
        manifest, model_cfg = sft.manifest, sft.model_cfg
        budget_cfg = sft_budget(cfg, len(sft.train))
    else:
        manifest = read_manifest(cfg.corpus)
        model_cfg = resolve_model(cfg, manifest)
        if cfg.init and ref is None:  # hf:DIR: checked before anything is built
            from trainer.hf import check_pretrain_init

            check_pretrain_init(cfg, model_cfg, manifest)
    micro, accum = batch_geometry(cfg.batch, dist.world_size)
    n = non_embedding_params(model_cfg)
    rows_len = manifest["seq_len"]  # = model_cfg.seq_len, except for shorter SFT rows
    budget = resolve_budget(budget_cfg, n, cfg.batch.global_batch, rows_len)
    identity = {
        "objective": cfg.objective,
        "model": to_dict(model_cfg),
        "global_batch": cfg.batch.global_batch,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "tokenizer_sha256": manifest["tokenizer"].get("sha256"),
        "task": cfg.task,
        "engine": cfg.engine,
    }
    if ref is not None:
        saved = ref.meta.get("identity", {})
        diff = [k for k in IDENTITY_KEYS if k in saved and saved[k] != identity[k]]
        if diff:
            raise ConfigError(
                f"cannot resume {ref.path}: it was trained with different "
                + ", ".join(f"{k} ({saved[k]!r} vs now {identity[k]!r})" for k in diff)
                + "; restore those settings or start a new run_dir"
            )
    schedule = schedule_record(cfg, budget.steps)
    if ref is not None:
        check_saved(cfg, ref, schedule)
    reschedules = list(ref.meta.get("reschedules", [])) if ref is not None else []
    return Setup(
        cfg, dist, manifest, model_cfg, budget, micro, accum, identity, schedule, reschedules, sft
    )


def write_run_files(s: Setup) -> None:
    """config.yaml and a copy of the tokenizer in run_dir (rank 0)."""
    run_dir = Path(s.cfg.run_dir)
    if s.dist.rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(s.cfg), sort_keys=False))
    tokenizer = Path(s.cfg.corpus) / s.manifest["tokenizer"].get("path", TOKENIZER)
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, run_dir / TOKENIZER)
    if s.sft is not None:
        from trainer.sft import describe as describe_sft

        (run_dir / "sft_data.json").write_text(json.dumps(describe_sft(s.sft), indent=2))


def tracking_params(s: Setup) -> tuple[dict, dict, dict]:
    """(MLflow params, tags, run-name fields): the resolved config plus what it resolved to."""
    manifest_sha = manifest_sha256(s)
    b = s.budget
    resolved = {
        "N": b.n_params,
        "steps": b.steps,
        "tokens": b.tokens,
        "flops": b.flops,
        "micro_batch": s.micro,
        "grad_accum": s.accum,
        "world_size": s.dist.world_size,
        "warmup_steps": warmup_steps(b.steps, s.cfg.optim.warmup_frac, s.cfg.optim.warmup_min),
        "model": to_dict(s.model_cfg),
    }
    if s.sft is None:
        params = {**to_dict(s.cfg), "resolved": resolved, "corpus_manifest_sha256": manifest_sha}
    else:
        from trainer.sft import describe as describe_sft

        params = {**to_dict(s.cfg), "resolved": resolved, "sft_data": describe_sft(s.sft)}
    if s.reschedules:  # new keys per resume: MLflow params cannot change
        params["rescheduled"] = {
            f"step{e['step']}": {k: f"{old} -> {new}" for k, (old, new) in e["changes"].items()}
            for e in s.reschedules
        }
    tags = {
        "family": s.cfg.objective,
        "model": s.cfg.model,
        "N": str(b.n_params),
        "C": f"{b.flops:.4g}",
        **s.cfg.tracking.tags,
    }
    fields = {"objective": s.cfg.objective, "model": s.cfg.model, "seed": s.cfg.seed}
    fields.update(flops=b.flops, tokens=b.tokens, N=b.n_params, steps=b.steps)
    return params, tags, fields


class Meter:
    """Per logging window: step times -> tokens/s and MFU (``mfu``: the project's count,
    ``mfu_litgpt``: litgpt's; trainer/budget.py); step losses -> the logged loss.

    One MDM step's loss is very noisy (1/p weights), so the logged ``loss`` is the mean over
    the steps since the previous log point; ``loss_last`` is the last step's own value.
    """

    def __init__(self, s: Setup):
        self.tokens_per_step = s.budget.tokens_per_step
        self.model_cfg, self.seq_len = s.model_cfg, s.manifest["seq_len"]
        name = torch.cuda.get_device_name(s.dist.device) if s.dist.device.type == "cuda" else None
        self.peak, self.world = peak_flops(name), s.dist.world_size
        self.window: list[float] = []
        self.all: list[float] = []
        self.losses: list[float] = list(s.loss_window)

    def add(self, seconds: float, loss: float) -> None:
        self.window.append(seconds)
        self.all.append(seconds)
        self.losses.append(loss)

    def read_loss(self) -> dict[str, float]:
        """{"loss": mean over the window, "loss_last": last step} and start a new window."""
        losses, self.losses = self.losses, []
        return {"loss": math.fsum(losses) / len(losses), "loss_last": losses[-1]}

    def read(self) -> dict[str, float]:
        seconds, n = sum(self.window) or float("nan"), max(len(self.window), 1)
        self.window = []
        tps = self.tokens_per_step * n / seconds
        out = {"tokens_per_s": tps, "step_time_s": seconds / n}
        out.update(self.mfu(tps))
        return out

    def mfu(self, tokens_per_s: float | None) -> dict[str, float]:
        """Both MFU counts at ``tokens_per_s`` (empty on CPU or an unlisted GPU)."""
        if tokens_per_s is None:
            return {}
        return mfu_counts(self.model_cfg, self.seq_len, tokens_per_s, self.world, self.peak)

    def median_tokens_per_s(self) -> float | None:
        steady = self.all[1:] or self.all  # the first step pays for warm-up
        return self.tokens_per_step / statistics.median(steady) if steady else None


def step_metrics(result, step: int, s: Setup, meter: Meter, loader) -> dict[str, float]:
    metrics = {**meter.read_loss(), "lr": result.lr, "tokens": step * s.budget.tokens_per_step}
    if result.grad_norm is not None:
        metrics["grad_norm"] = result.grad_norm
    metrics["epoch"] = loader.epoch
    metrics.update(meter.read())
    metrics.update(memory_metrics(s.dist.device))
    return metrics


def write_row_keys(s: Setup, step: int, keys: list[int]) -> None:
    folder = Path(s.cfg.run_dir) / "row_keys"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{s.dist.rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def manifest_sha256(s: Setup) -> str | None:
    """sha256 of the corpus manifest.json a pretraining run reads (None for SFT)."""
    if s.sft is not None:
        return None
    return hashlib.sha256((Path(s.cfg.corpus) / MANIFEST).read_bytes()).hexdigest()


def checkpoint_meta(s: Setup, step: int) -> dict:
    return {
        "identity": s.identity,
        "zero_stage": s.cfg.zero_stage,
        "engine": s.cfg.engine,
        "precision": s.cfg.precision,
        "objective": s.cfg.objective,
        "causal": s.cfg.objective == "arm",
        "mask_id": s.model_cfg.mask_id,
        "mdm_eps": s.cfg.mdm.eps,  # the MDM's mask-probability floor (its 1/t ELBO needs it)
        "model": to_dict(s.model_cfg),
        "preset": s.cfg.model,
        "tokens": step * s.budget.tokens_per_step,
        "n_params": s.budget.n_params,
        "corpus": str(Path(s.cfg.corpus).resolve()) if s.sft is None else s.manifest["corpus"],
        "corpus_manifest_sha256": manifest_sha256(s),  # for model cards (trainer/hf.py)
        "tokenizer_sha256": s.identity["tokenizer_sha256"],
        "eos_id": s.manifest["tokenizer"].get("eos_id"),
        "schedule": s.schedule,
        "reschedules": s.reschedules,
    }


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def run_steps(s, engine, loader, objective, ckpt, tracker, evaluator, step: int) -> dict:
    """Train from ``step`` to the budget; returns the last step and validation metrics."""
    cfg, total, meter = s.cfg, s.budget.steps, Meter(s)
    final, last_val = {}, {}
    while step < total:
        start = time.perf_counter()
        result = train_step(engine, loader, objective, s.accum, s.dist.device, step + 1)
        step += 1
        meter.add(time.perf_counter() - start, result.loss)
        if cfg.log.row_keys:
            write_row_keys(s, step, result.keys)
        if due(step, cfg.log.every) or step == total:
            window = len(meter.losses)
            metrics = step_metrics(result, step, s, meter, loader)
            final = {"loss": metrics["loss"], "last": metrics["loss_last"]}
            final["steps"] = [step - window + 1, step]
            tracker.log_metrics(metrics, step)
            say(s.dist, f"step {step}/{total} " + _fmt(metrics))
        if due(step, cfg.eval.every) or (step == total and cfg.eval.at_end):
            last_val = evaluator.run(engine, objective)
            tracker.log_metrics(last_val, step)
            say(s.dist, f"step {step} " + _fmt(last_val))
        if due(step, cfg.checkpoint.every) or step == total:
            client = {"loader": loader.state_dict(), "step": step, "config": to_dict(cfg)}
            client["tokens"] = step * s.budget.tokens_per_step
            client["loss_window"] = list(meter.losses)
            ckpt.save(engine, step, client, checkpoint_meta(s, step))
        fault_point("step", step)
    tps = meter.median_tokens_per_s()
    counts = {"mfu": None, "mfu_litgpt": None} | meter.mfu(tps)
    return {"step": step, "loss": final, "val": last_val, "tokens_per_s": tps, **counts}


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float | int))


def plot_loss_curve(metrics_path: Path, out: Path) -> Path | None:
    """loss (and validation losses) against step from metrics.jsonl, as a PNG."""
    if not metrics_path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k == "loss" or (k.startswith("val/") and k.endswith("/loss")):
                series.setdefault(k, {})[int(rec["step"])] = v  # a resumed step: last wins
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        steps = sorted(points)
        marker = None if name == "loss" else "o"
        ax.plot(steps, [points[i] for i in steps], marker=marker, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def finish_run(s: Setup, ckpt: CheckpointManager, tracker, outcome: dict, t0: float) -> dict:
    """Export weights, write summary.json and loss_curve.png, log them as artifacts."""
    run_dir = Path(s.cfg.run_dir)
    export_dir = run_dir / "export"
    latest = ckpt.latest()
    if s.dist.rank == 0 and s.cfg.checkpoint.export and latest is not None:
        export_checkpoint(latest, export_dir, run_dir / TOKENIZER)
    b = s.budget
    summary = {
        "run_dir": str(run_dir.resolve()),
        "objective": s.cfg.objective,
        "model": s.cfg.model,
        "N": b.n_params,
        "steps": outcome["step"],
        "tokens": outcome["step"] * b.tokens_per_step,
        "flops": 6.0 * b.n_params * outcome["step"] * b.tokens_per_step,
        "budget": b.as_dict(),
        "final_loss": outcome["loss"].get("loss"),
        "final_loss_is": "mean training loss over steps final_loss_steps (the last log interval)",
        "final_loss_steps": outcome["loss"].get("steps"),
        "final_loss_last_step": outcome["loss"].get("last"),
        "val": outcome["val"],
        "tokens_per_s": outcome["tokens_per_s"],
        "mfu": outcome["mfu"],
        "mfu_litgpt": outcome["mfu_litgpt"],
        "mfu_is": "at the median tokens_per_s; mfu counts 6N + 12LdT FLOPs per token, "
        "mfu_litgpt 6 x all parameters + 12LdT (trainer/budget.py); null without a known peak",
        "checkpoint": str(latest.path) if latest else None,
        "export": str(export_dir) if s.cfg.checkpoint.export else None,
        "mlflow_run_id": tracker.run_id,
        "world_size": s.dist.world_size,
        "reschedules": s.reschedules,
        "wall_s": time.time() - t0,
    }
    if s.dist.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        png = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        for path in (run_dir / "config.yaml", png, run_dir / "summary.json"):
            if path is not None:
                tracker.log_artifact(path)
    barrier()
    return summary


def build(s: Setup, ckpt: CheckpointManager, ref: CheckpointRef | None):
    """Objective, DeepSpeed engine and data loader, restored from ``ref`` when resuming."""
    from trainer.build import build_model
    from trainer.compiling import compile_blocks, use_compile
    from trainer.data import CorpusLoader
    from trainer.model import set_attention_backend
    from trainer.objectives import build_objective

    cfg, dist = s.cfg, s.dist
    seed_everything(cfg.seed)
    kw = {"eps": cfg.mdm.eps, "random_length_prob": cfg.mdm.random_length_prob}
    kw["t_sampling"] = cfg.mdm.t_sampling
    kw["loss_weighting"] = cfg.mdm.loss_weighting
    objective = build_objective(
        cfg.objective,
        s.model_cfg.mask_id,
        loss_chunk=cfg.loss_chunk,
        **(kw if cfg.objective == "mdm" else {}),
    )
    if s.sft is not None:
        from trainer.sft_objectives import build_sft_objective

        drop = cfg.sft.cfg_prompt_drop
        objective = build_sft_objective(
            cfg.objective, s.model_cfg.mask_id, cfg.mdm.eps, drop, cfg.mdm.loss_weighting
        )
    universal = ref is not None and ckpt.needs_universal(ref, cfg.zero_stage)
    model = build_model(cfg, s.model_cfg, objective.causal, dist.world_size)
    if s.sft is not None and ref is None:  # a resume restores the fine-tuned weights instead
        from trainer.sft import load_init_weights

        load_init_weights(model, s.sft.init.state_dict())
        say(dist, f"initialised from {s.sft.init.path}")
    elif cfg.init and ref is None:  # pretraining from init=hf:DIR
        from trainer.hf import HFDir
        from trainer.sft import load_init_weights

        load_init_weights(model, HFDir.open(cfg.init).state_dict(s.model_cfg, cfg.seed))
        say(dist, f"initialised from {cfg.init}")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    set_attention_backend(model, cfg.attention_backend, dist.device, dtype)  # refused: here
    compiled = use_compile(cfg.compile, dist.device)
    if compiled:
        compile_blocks(model)  # in place, before DeepSpeed wraps the model
    say(
        dist,
        f"engine={cfg.engine} zero_stage={cfg.zero_stage} precision={cfg.precision} "
        f"fused_adamw={cfg.optim.fused} attention_backend={cfg.attention_backend} "
        f"compile={compiled}",
    )
    engine = build_engine(cfg, model, s.budget.steps, dist.world_size, load_universal=universal)
    if s.sft is not None:
        from trainer.sft_data import SFTLoader

        loader = SFTLoader(
            s.sft.train,
            micro_batch=s.micro,
            global_batch=cfg.batch.global_batch,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=cfg.seed,
        )
    else:
        loader = CorpusLoader(
            cfg.corpus,
            cfg.data.split,
            micro_batch=s.micro,
            global_batch=cfg.batch.global_batch,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=cfg.seed,
            weights=cfg.data.weights,
        )
    step = 0
    if ref is not None:
        client = ckpt.load(engine, ref, universal)
        keep_fused(engine, cfg.optim.fused)  # this run's choice, not the checkpoint's
        loader.load_state_dict(client["loader"])
        step = int(client["step"])
        s.loss_window = [float(x) for x in client.get("loss_window", [])]
        say(dist, f"resumed from {ref.path} at step {step}" + (" (universal)" if universal else ""))
        if (entry := reconcile(cfg, engine, client, s.schedule, ref)) is not None:
            s.reschedules.append(entry)
            old_lr, new_lr = entry["next_lr"]
            say(
                dist,
                f"rescheduled at step {step} (checkpoint.reschedule=true): "
                f"{describe(entry['changes'])}; lr of step {step + 1}: {old_lr:.4g} -> {new_lr:.4g}",
            )
    return objective, engine, loader, step


def make_evaluator(s: Setup):
    """Validation: SFT rows for task=sft, else the corpus splits (``eval.splits``)."""
    e = s.cfg.eval
    if s.sft is not None:
        from trainer.sft import SFTEvaluator

        return SFTEvaluator(s.sft.val, e, s.dist.rank, s.dist.world_size, s.dist.device)
    splits = eval_splits(s.manifest, e.splits)
    trained = {s.cfg.data.split} if isinstance(s.cfg.data.split, str) else set(s.cfg.data.split)
    if overlap := sorted(trained & set(splits)):
        say(s.dist, f"warning: evaluating on {overlap}, which this run also trains on")
    return Evaluator(
        s.cfg.corpus,
        splits,
        e.batch_size,
        e.max_rows,
        e.n_samples,
        s.dist.rank,
        s.dist.world_size,
        s.dist.device,
    )


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training run to its budget; returns the summary dict."""
    from trainer.tracking import Tracker

    t0 = time.time()
    cfg.validate()
    dist = init_distributed()
    cfg.precision = resolve_precision(cfg.precision, dist.device)  # auto -> what is recorded
    cfg.optim.fused = resolve_fused(cfg.optim.fused, dist.device)  # likewise
    ckpt = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep, dist.rank, dist.world_size)
    ref = ckpt.resolve(cfg.checkpoint.resume)
    s = prepare(cfg, dist, ref)
    write_run_files(s)
    b = s.budget
    say(
        dist,
        f"{cfg.objective} {cfg.model}: N={b.n_params:,} D={b.tokens:,} C={b.flops:.3e} "
        f"steps={b.steps} micro={s.micro} accum={s.accum} world={dist.world_size}",
    )
    objective, engine, loader, step = build(s, ckpt, ref)
    evaluator = make_evaluator(s)
    tracker = Tracker(cfg.tracking, cfg.run_dir, dist.rank)
    params, tags, name_fields = tracking_params(s)
    tracker.start({**params, "eval_sample": evaluator.params()}, tags, name_fields)
    record = evaluator.write_record(cfg.run_dir) if dist.rank == 0 else None
    if record is not None:
        tracker.log_artifact(record)
    try:
        outcome = run_steps(s, engine, loader, objective, ckpt, tracker, evaluator, step)
        summary = finish_run(s, ckpt, tracker, outcome, t0)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    say(dist, f"done: loss={summary['final_loss']} -> {summary['run_dir']}")
    return summary
