"""DeepSpeed, driven from our config: process group, engine, LR schedule, steps, validation.

Everything that talks to DeepSpeed or ``torch.distributed`` lives here so the training loop
only orchestrates. Choices, and why:

* One process by default: when no launcher set ``RANK``/``WORLD_SIZE``, we set the
  single-process variables ourselves (else DeepSpeed looks for MPI). ``torchrun`` and the
  ``deepspeed`` launcher set them for many processes and nodes.
* On CPU (gloo) DeepSpeed would compile a shared-memory all-reduce op on first use (~30 s,
  and a killed compile leaves a lock that hangs later runs). That op only serves inference
  all-reduce, so it is switched off for training on CPU.
* The optimizer is ``torch.optim.AdamW`` handed to DeepSpeed as a client optimizer: no
  compiled FusedAdam, identical on CPU and GPU, and ZeRO 1-3 partition it as usual. On CUDA
  it runs torch's fused kernel (``optim.fused: auto``), which updates every tensor of a group
  in a few launches instead of several per parameter; a resume keeps this run's choice (the
  optimizer state a checkpoint restores would otherwise bring back the writer's flag).
* ``engine: plain`` (one process, zero_stage=0) skips DeepSpeed: :class:`PlainEngine`.
* The LR schedule is our own ``WarmupCosine``: linear warmup over max(1% of steps, 100)
  then a cosine that ends *exactly* at lr_min on the last step (cos(pi) = -1 exactly).
* bf16 accumulates gradients in fp32 at every ZeRO stage; stage 0 with bf16 runs DeepSpeed's
  BF16_Optimizer (see trainer/precision.py for what DeepSpeed does at each stage, and why).
* Global batch -> micro-batch x accumulation x world size is derived here; a geometry that
  does not divide is refused before anything starts.
* One optimizer step (:func:`train_step`) reduces the loss over micro-batches and ranks
  *before* the update, so a NaN/inf loss stops every rank before the weights change.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LRScheduler

from pipeline.configlib import ConfigError
from trainer.config import BatchConfig, OptimConfig, TrainConfig
from trainer.precision import deepspeed_precision, resolve_precision


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stops, checkpoints stay intact."""


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OWNER_ENV, PORT_ENV = "MASKSCALE_SINGLE_PROCESS_PID", "MASKSCALE_SINGLE_PROCESS_PORT"
"""Mark the variables we set for a single process, so that a child process inheriting them
(e.g. a training subprocess started after an in-process run) does not mistake them for a
launcher's and reuse the parent's rendezvous port."""


def _launched() -> bool:
    """True when RANK/WORLD_SIZE come from a launcher (torchrun, deepspeed, Slurm wrappers)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return False
    inherited = env.get(OWNER_ENV) not in (None, str(os.getpid()))
    return not (inherited and env.get("MASTER_PORT") == env.get(PORT_ENV))


def init_distributed() -> DistInfo:
    """Initialise (once) the process group: env from a launcher, or a single process."""
    if not torch.distributed.is_initialized() and not _launched():
        port = str(_free_port())
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.update(MASTER_PORT=port, **{PORT_ENV: port, OWNER_ENV: str(os.getpid())})
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device
    )


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (float64, so losses reduce without extra rounding)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- schedule


def warmup_steps(total_steps: int, frac: float, minimum: int) -> int:
    """max(ceil(frac * S), minimum), capped at S // 2 so short runs still reach the cosine."""
    return min(max(math.ceil(frac * total_steps), minimum), total_steps // 2)


def lr_at(step: int, total_steps: int, warmup: int, lr: float, lr_min: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup ``lr * (step + 1) / warmup`` reaching ``lr`` at step warmup-1, then a
    cosine from ``lr`` down to exactly ``lr_min`` at the last step ``total_steps - 1``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    span = total_steps - 1 - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """``lr_at`` as a torch scheduler (DeepSpeed steps it once per optimizer step and
    saves/restores its state with every checkpoint)."""

    def __init__(self, optimizer, total_steps: int, warmup: int, lr: float, lr_min: float):
        self.total_steps, self.warmup, self.peak, self.lr_min = total_steps, warmup, lr, lr_min
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        value = lr_at(self.last_epoch, self.total_steps, self.warmup, self.peak, self.lr_min)
        return [value for _ in self.optimizer.param_groups]

    def reschedule(self, total_steps: int, warmup: int, lr: float, lr_min: float) -> float:
        """Replace the schedule a checkpoint restored (``load_state_dict`` brings back the old
        total_steps/warmup/peak/lr_min) with a new one at the current step: the next optimizer
        step uses ``lr_at(last_epoch)`` of the new schedule. Returns that learning rate."""
        self.total_steps, self.warmup, self.peak, self.lr_min = total_steps, warmup, lr, lr_min
        self.base_lrs = [lr for _ in self.optimizer.param_groups]
        values = self.get_lr()
        for group, value in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"], group["initial_lr"] = value, lr
        self._last_lr = list(values)
        return values[0]


# ----------------------------------------------------------------------------- engine


def batch_geometry(batch: BatchConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch per process, gradient accumulation steps) for this world size."""
    g = batch.global_batch
    micro = batch.micro_batch if batch.micro_batch is not None else g // world_size
    if micro < 1 or g % (micro * world_size):
        raise ConfigError(
            f"batch.global_batch={g} is not divisible by batch.micro_batch={micro} x "
            f"world_size={world_size}; choose global_batch = micro_batch x world_size x "
            "accumulation steps (set batch.micro_batch or change the number of processes)"
        )
    return micro, g // (micro * world_size)


def build_ds_config(
    cfg: TrainConfig, world_size: int, load_universal: bool = False, d_model: int | None = None
) -> dict:
    """The DeepSpeed JSON config implied by ``cfg`` (optimizer and scheduler are clients).

    ``d_model`` sizes the communication buckets left to ``auto`` in ``cfg.comm`` (without it
    DeepSpeed's defaults apply)."""
    micro, accum = batch_geometry(cfg.batch, world_size)
    precision = deepspeed_precision(cfg.precision, cfg.zero_stage)  # fp32 grad accumulation
    ds = {
        "train_batch_size": cfg.batch.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": precision.pop("stage"),  # bf16 at stage 0 runs as DeepSpeed stage 1
            **cfg.comm.zero_settings(cfg.zero_stage, d_model, world_size),
        },
        **precision,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if cfg.zero_stage == 3:
        # Gather the full weights on rank 0 for saving 16-bit copies; fp32 export reads
        # the ZeRO shards instead (trainer/checkpoint.py).
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    return ds


def resolve_fused(setting: bool | str, device: torch.device | None = None) -> bool:
    """``optim.fused``: auto -> True when training on CUDA (``device``; None: CUDA if
    available), else False; true/false unchanged."""
    if setting == "auto":
        return torch.cuda.is_available() if device is None else device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"optim.fused: true, false or auto, got {setting!r}")


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, device: torch.device | None = None
) -> torch.optim.AdamW:
    """Plain torch AdamW over every parameter (weight decay on all, as in the reference);
    torch's fused kernel per ``optim.fused`` for the training ``device``."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=resolve_fused(optim.fused, device),
    )


def keep_fused(engine, fused: bool) -> None:
    """After a checkpoint load: put this run's fused flag back into the AdamW param groups
    (``load_state_dict`` restores the writer's). The update is the same either way."""
    for group in engine.lr_scheduler.optimizer.param_groups:
        group["fused"] = fused


def build_engine(
    cfg: TrainConfig,
    model: torch.nn.Module,
    total_steps: int,
    world_size: int,
    load_universal: bool = False,
):
    """``deepspeed.initialize`` with our config, a torch AdamW and the warmup-cosine schedule;
    with ``engine: plain`` a :class:`PlainEngine` instead."""
    warm = warmup_steps(total_steps, cfg.optim.warmup_frac, cfg.optim.warmup_min)
    if cfg.engine == "plain":
        return PlainEngine(cfg, model, total_steps, warm, world_size)
    import deepspeed

    optimizer = build_optimizer(model, cfg.optim)
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)  # a Transformer's width

    def schedule(opt):
        return WarmupCosine(opt, total_steps, warm, cfg.optim.lr, cfg.optim.lr_min)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=build_ds_config(cfg, world_size, load_universal, d_model=d_model),
    )
    return engine


# ----------------------------------------------------------------------------- plain engine


MODEL_FILE = "mp_rank_00_model_states.pt"
FORMAT = "maskscale-plain-engine/1"


class PlainEngine:
    """``engine: plain``: one process, torch AdamW, no DeepSpeed (the one-GPU zero_stage=0 path).

    Why: on one GPU DeepSpeed has nothing to partition or communicate, yet its stage-0 bf16 path
    (trainer/precision.py) runs ``BF16_Optimizer``: bf16 module weights, a flat fp32 master copy,
    fp32 gradient buffers filled from the bf16 ``.grad`` after every micro-batch, and a copy back
    of the updated weights after every step. That bookkeeping costs memory traffic per step and
    may cost MFU; this engine is the smallest real alternative, so the two can be measured against
    each other (benchmarks: ``engine=plain`` vs ``engine=deepspeed zero_stage=2``).

    What it is: fp32 weights on the device, bf16 (``precision: bf16``) as ``torch.autocast`` around
    the forward pass, so matmuls and attention run in bf16 while weights, gradients (accumulated
    over micro-batches in fp32 ``.grad``) and Adam states stay fp32 -- the same guarantees as the
    DeepSpeed path (fp32 master weights, fp32 accumulation), reached without a second copy.
    fp32 runs train exactly as DeepSpeed's fp32 stage 0 does, up to float rounding.

    It implements what the loop, the checkpoints and validation call on a DeepSpeed engine and
    nothing more: ``engine(...)`` (forward), ``backward`` (loss / accumulation steps, as DeepSpeed
    scales it), ``step`` (an update only at the accumulation boundary: clip, AdamW, zero the
    gradients, schedule), ``get_lr``, ``get_global_grad_norm`` (the norm before clipping),
    ``train``/``eval``, ``save_checkpoint``/``load_checkpoint``. A checkpoint is one
    ``mp_rank_00_model_states.pt`` (module, optimizer, scheduler, client state), the file
    DeepSpeed's stage 0 writes and the one ``trainer/checkpoint.py`` exports from; runs resume only
    with the engine that wrote them (``engine`` is part of the run identity).
    """

    reports_grad_norm = True
    """``get_global_grad_norm`` always holds the last step's norm (train_step need not
    measure it again)."""

    def __init__(
        self, cfg: TrainConfig, model: torch.nn.Module, total_steps: int, warmup: int, world: int
    ):
        if world != 1 or cfg.zero_stage != 0:
            raise ConfigError(
                f"engine=plain trains in one process at zero_stage=0 (got world_size={world}, "
                f"zero_stage={cfg.zero_stage}); use engine=deepspeed for several processes"
            )
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        self.device = self.device or torch.device("cpu")
        self.module = model.to(self.device)
        self.bf16 = resolve_precision(cfg.precision, self.device) == "bf16"
        self.optimizer = build_optimizer(model, cfg.optim, self.device)
        o = cfg.optim
        self.lr_scheduler = WarmupCosine(self.optimizer, total_steps, warmup, o.lr, o.lr_min)
        self.accum = batch_geometry(cfg.batch, 1)[1]
        self.clip = float(o.grad_clip)
        self.micro_steps = self.global_steps = 0
        self._norm: float | None = None

    # --------------------------------------------------------------------- DeepSpeed's API

    def __call__(self, *args, **kwargs):
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with autocast:
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss / accumulation steps`` added into the fp32 ``.grad``."""
        (loss / self.accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def step(self) -> None:
        """Called after every micro-batch; updates only at the accumulation boundary."""
        if self.is_gradient_accumulation_boundary():
            params = [p for p in self.module.parameters() if p.grad is not None]
            limit = self.clip if self.clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
            self._norm = float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self._norm

    def zero_optimization(self) -> bool:
        return False

    def zero_optimization_stage(self) -> int:
        return 0

    def bfloat16_enabled(self) -> bool:
        return self.bf16

    def gradient_clipping(self) -> float:
        return self.clip

    def train(self, mode: bool = True) -> PlainEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PlainEngine:
        return self.train(False)

    # --------------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict | None = None, save_latest: bool = False
    ) -> None:
        """``save_dir/tag/mp_rank_00_model_states.pt``; the caller (CheckpointManager) makes
        the save atomic and writes ``latest``."""
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "global_steps": self.global_steps,
            "micro_steps": self.micro_steps,
            "client_state": dict(client_state or {}),
        }
        torch.save(state, folder / MODEL_FILE)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict]:
        """Restore module, optimizer, schedule and counters; returns (path, client_state)."""
        path = Path(load_dir) / tag / MODEL_FILE
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("format") != FORMAT:
            raise ConfigError(
                f"checkpoint {path.parent} was not written by engine=plain (DeepSpeed's "
                "layout); resume it with engine=deepspeed, or start a new run_dir"
            )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]
        return str(path.parent), state["client_state"]


# ----------------------------------------------------------------------------- steps


@dataclass
class StepResult:
    loss: float
    """Mean training loss of the step over all micro-batches and ranks."""
    grad_norm: float | None
    """Global gradient 2-norm before clipping (None if DeepSpeed did not compute it)."""
    lr: float
    """Learning rate used by this step's update."""
    keys: list[int]
    """Row keys this rank consumed (for data-order audits)."""


def _module_grad_norm(engine) -> float:
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


def train_step(
    engine, loader, objective, accum: int, device: torch.device, step: int
) -> StepResult:
    """One optimizer step: ``accum`` micro-batches forward/backward, reduce, check, update."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    keys: list[int] = []
    for a in range(accum):
        tokens, row_keys, lengths = loader.next_micro_batch()
        keys.extend(row_keys.tolist())
        loss = objective.train_loss(engine, tokens.to(device, non_blocking=True), row_keys, lengths)
        engine.backward(loss)
        total += loss.detach().double()
        if a < accum - 1:
            engine.step()  # no update inside the accumulation window
    loss_sum, count = all_reduce_sum([float(total), accum], device)
    mean = loss_sum / count
    if not math.isfinite(mean):
        raise TrainingDiverged(
            f"loss is {mean} at step {step}: training stopped before the update; the last "
            "checkpoint is intact. Lower optim.lr, check the data, or use precision=fp32."
        )
    lr = engine.get_lr()[0]
    # Plain fp32 data parallel (stage 0) clips without recording the norm: measure it here,
    # after DeepSpeed averaged the gradients and before it clips them.
    plain = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    plain = plain and not getattr(engine, "reports_grad_norm", False)  # engine=plain has it
    norm = _module_grad_norm(engine) if plain else None
    engine.step()
    if norm is None:
        reported = engine.get_global_grad_norm()
        norm = None if reported is None else float(reported)
    if norm is not None and not math.isfinite(norm):
        raise TrainingDiverged(
            f"gradient norm is {norm} at step {step}: the weights are no longer finite; no "
            "checkpoint was written for this step. Lower optim.lr or set optim.grad_clip."
        )
    return StepResult(loss=mean, grad_norm=norm, lr=lr, keys=keys)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated on this device, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return {"memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil  # portable (Linux, macOS); /proc/self/statm exists on Linux only

    return {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}


# ----------------------------------------------------------------------------- validation


def eval_splits(manifest: dict, requested: list[str] | None) -> list[str]:
    """The requested splits, or `validation` plus every `holdout_*` split of the corpus."""
    splits = manifest.get("splits", {})
    available = [
        s for s in splits if splits[s].get("rows", 1) > 0
    ]  # format-1 corpora: a split shorter than a row had no rows
    if requested is not None:
        missing = [s for s in requested if s not in available]
        if missing:
            raise ConfigError(
                f"eval.splits: {missing} not in the corpus or without a full row "
                f"(evaluable: {available})"
            )
        return list(requested)
    return [s for s in available if s == "validation" or s.startswith("holdout_")]
