"""Resuming with changed settings: refuse by default, or reschedule when asked to.

Why: DeepSpeed restores the LR scheduler's state with a checkpoint, and our ``WarmupCosine``
keeps its schedule (total steps, warmup, peak, lr_min) in that state; ``load_state_dict`` of
AdamW likewise puts the saved betas / eps / weight decay back into its param groups, and
DeepSpeed's ZeRO-1/2 and bf16 optimizers their saved gradient-clipping norm. A resume
with a new budget or recipe would therefore train to the *new* number of steps on the *old*
schedule and hyperparameters, without a word. So the settings a run's optimisation depends on
form its *schedule record* (:func:`schedule_record`), written into every checkpoint's
``meta.json``; a resume whose config resolves to a different record is refused with every
changed key, old and new value. With ``checkpoint.reschedule=true`` (extending or re-tuning a
run on purpose) the new record is applied at the resumed step instead: the cosine is recomputed
for the new budget, so step k+1 uses ``lr_at(k)`` of the new schedule, AdamW gets the new
hyperparameters, and the change is recorded (log line, checkpoint meta ``reschedules``, MLflow
params ``rescheduled.step<k>.<key>``, summary.json).

The check runs twice: from ``meta.json`` before the engine is built (fails in seconds, even at
1B), and after the load against what DeepSpeed actually restored (scheduler attributes and
optimizer param groups; this also covers checkpoints written before the record existed).
"""

from __future__ import annotations

from typing import Any

from pipeline.configlib import ConfigError
from trainer.config import TrainConfig
from trainer.engine import warmup_steps

SCHEDULE_KEYS = {
    "steps": "budget.flops / budget.tokens / budget.steps",
    "warmup_steps": "optim.warmup_frac, optim.warmup_min",
    "optim.lr": "optim.lr",
    "optim.lr_min": "optim.lr_min",
    "optim.warmup_frac": "optim.warmup_frac",
    "optim.warmup_min": "optim.warmup_min",
    "optim.betas": "optim.betas",
    "optim.eps": "optim.eps",
    "optim.weight_decay": "optim.weight_decay",
    "optim.grad_clip": "optim.grad_clip",
}
"""Record key -> the config setting(s) it comes from. ``steps`` and ``warmup_steps`` are the
resolved values (a budget given as flops or tokens that resolves to the same steps is no
change); the optim.* keys are the settings themselves."""


def schedule_record(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """The settings the optimisation of a run depends on (JSON-able, compared on resume)."""
    o = cfg.optim
    return {
        "steps": int(total_steps),
        "warmup_steps": warmup_steps(total_steps, o.warmup_frac, o.warmup_min),
        "optim.lr": float(o.lr),
        "optim.lr_min": float(o.lr_min),
        "optim.warmup_frac": float(o.warmup_frac),
        "optim.warmup_min": int(o.warmup_min),
        "optim.betas": [float(b) for b in o.betas],
        "optim.eps": float(o.eps),
        "optim.weight_decay": float(o.weight_decay),
        "optim.grad_clip": float(o.grad_clip),
    }


def schedule_changes(saved: dict, now: dict) -> dict[str, list]:
    """{key: [saved value, new value]} for every key both records hold and that differs."""
    return {k: [saved[k], now[k]] for k in SCHEDULE_KEYS if k in saved and saved[k] != now[k]}


def describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def refuse(path, step: int, changes: dict[str, list]) -> ConfigError:
    """The error for a resume that changes the schedule without checkpoint.reschedule."""
    sources = sorted({SCHEDULE_KEYS[k] for k in changes})
    return ConfigError(
        f"cannot resume {path} at step {step}: the config changes what the run was trained "
        f"with ({describe(changes)}; set by {'; '.join(sources)}). The checkpoint would "
        "restore the old LR schedule and AdamW settings. Restore the old values to continue "
        "the run as it was, or set checkpoint.reschedule=true to continue with the new ones "
        f"(the LR schedule is recomputed for the new budget from step {step} on)."
    )


def check_saved(cfg: TrainConfig, ref, record: dict) -> None:
    """Before the engine is built: the checkpoint's meta against the new record."""
    if record["steps"] < ref.step:
        raise ConfigError(
            f"cannot resume {ref.path}: it is at step {ref.step}, beyond the budget of "
            f"{record['steps']} steps; raise the budget (budget.steps/tokens/flops) or resume "
            "an earlier checkpoint"
        )
    changes = schedule_changes(ref.meta.get("schedule", {}), record)
    if changes and not cfg.checkpoint.reschedule:
        raise refuse(ref.path, ref.step, changes)


def restored_record(engine, client: dict) -> dict[str, Any]:
    """What the loaded checkpoint put back: scheduler attributes, optimizer param groups, the
    DeepSpeed optimizer's clipping norm, and (for warmup_frac/min, which nothing restores) the
    config saved in the client state."""
    sched = engine.lr_scheduler
    group = sched.optimizer.param_groups[0]
    saved_optim = (client.get("config") or {}).get("optim", {})
    clip = getattr(engine.optimizer, "clip_grad", None)  # ZeRO-1/2, bf16: restored from the file
    out = {
        "steps": int(sched.total_steps),
        "warmup_steps": int(sched.warmup),
        "optim.lr": float(sched.peak),
        "optim.lr_min": float(sched.lr_min),
        "optim.betas": [float(b) for b in group["betas"]],
        "optim.eps": float(group["eps"]),
        "optim.weight_decay": float(group["weight_decay"]),
        "optim.grad_clip": float(engine.gradient_clipping() if clip is None else clip),
    }
    for key in ("warmup_frac", "warmup_min"):
        if key in saved_optim:
            out[f"optim.{key}"] = saved_optim[key]
    return out


def apply_record(engine, record: dict) -> float:
    """Put ``record`` into the restored scheduler, AdamW param groups and clipping norm (the
    engine's own copy comes from the DeepSpeed config, built from the new config); returns the
    LR the next step will use."""
    for group in engine.lr_scheduler.optimizer.param_groups:
        group["betas"] = tuple(record["optim.betas"])
        group["eps"] = record["optim.eps"]
        group["weight_decay"] = record["optim.weight_decay"]
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = record["optim.grad_clip"]
    return engine.lr_scheduler.reschedule(
        record["steps"], record["warmup_steps"], record["optim.lr"], record["optim.lr_min"]
    )


def reconcile(cfg: TrainConfig, engine, client: dict, record: dict, ref) -> dict | None:
    """After the load: refuse a changed schedule, or (checkpoint.reschedule) apply the new
    one. Returns the reschedule entry to record ({step, changes, lr}), or None if unchanged."""
    changes = schedule_changes(restored_record(engine, client), record)
    if not changes:
        return None
    step = int(client.get("step", ref.step))
    if not cfg.checkpoint.reschedule:
        raise refuse(ref.path, step, changes)
    old_lr = float(engine.lr_scheduler.optimizer.param_groups[0]["lr"])
    new_lr = apply_record(engine, record)
    return {"step": step, "changes": changes, "next_lr": [old_lr, new_lr]}
