"""Crash-safe DeepSpeed checkpoints, resume across world sizes, and plain-weights export.

Layout under ``run_dir/checkpoints``::

    step00000100/          one DeepSpeed checkpoint (model/optimizer/scheduler shards)
        meta.json          step, tokens, world size, ZeRO stage, model config (written last)
        rng_rank<r>.pt     torch/numpy/python RNG state of every rank
    latest                 the tag of the newest complete checkpoint (DeepSpeed's format)
    universal/<tag>/       on-demand conversion for resuming on another world size

Why: a save killed midway must never cost the previous checkpoint. DeepSpeed writes into a
hidden ``.tmp-<tag>`` directory; only when every rank has finished does rank 0 add
``meta.json``, check the expected files, ``rename`` the directory to its tag (atomic on POSIX)
and replace ``latest`` atomically (write + fsync + ``os.replace``). Resume trusts only
directories with ``meta.json``; stale temporaries are deleted at the next save. Multi-node
runs need a shared filesystem for ``run_dir`` (rank 0 does the renames).

The export (``maskscale export``, and the end of every run) writes the optimizer's fp32 master
weights whenever the run had them, also for bf16 at ZeRO-0/1 (DeepSpeed's BF16_Optimizer
shards, merged here), never the bf16-rounded module weights.

DeepSpeed saves no RNG state and its ZeRO-1/2/3 optimizer shards are tied to the world size;
the RNG files fill the first gap, DeepSpeed's universal-checkpoint conversion (``ds_to_universal``,
enabled by the ``universal_checkpoint_info`` entry we store in ``client_state``) the second.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
META = "meta.json"
TAG_PREFIX = "step"
TMP_PREFIX = ".tmp-"
FAULT_ENV = "MASKSCALE_FAULT"
"""Fault injection for tests: ``save:N`` kills (SIGKILL) rank 0 in the middle of the save of
step N (after the shards are written, before the rename); ``step:N`` after step N."""


def fault_point(point: str, step: int) -> None:
    """Die like ``kill -9`` when ``MASKSCALE_FAULT`` names this point and step (tests only)."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- manager


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint on disk."""

    path: Path
    meta: dict

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_checkpoint(path: str | Path) -> CheckpointRef | None:
    """The checkpoint at ``path`` if it is complete (has meta.json), else None."""
    path = Path(path)
    meta_path = path / META
    if path.name.startswith(TMP_PREFIX) or not meta_path.is_file():
        return None
    try:
        return CheckpointRef(path, json.loads(meta_path.read_text()))
    except (OSError, ValueError):
        return None


class CheckpointManager:
    """Save/resume/prune the checkpoints of one run directory (call on every rank)."""

    def __init__(
        self,
        run_dir: str | Path,
        keep: int,
        rank: int = 0,
        world_size: int = 1,
        root_name: str = CKPT_DIR,
    ):
        self.root = Path(run_dir) / root_name
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def complete(self) -> list[CheckpointRef]:
        """Every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        refs = [read_checkpoint(p) for p in self.root.glob(f"{TAG_PREFIX}*") if p.is_dir()]
        return sorted((r for r in refs if r is not None), key=lambda r: r.step)

    def latest(self) -> CheckpointRef | None:
        """The checkpoint ``latest`` names, or the newest complete one if that is unusable."""
        pointer = self.root / LATEST
        if pointer.is_file():
            ref = read_checkpoint(self.root / pointer.read_text().strip())
            if ref is not None:
                return ref
        refs = self.complete()
        return refs[-1] if refs else None

    def resolve(self, resume: str) -> CheckpointRef | None:
        """resume = auto | none | a checkpoint directory (or a directory holding `latest`)."""
        if resume == "none":
            if self.complete():
                raise FileExistsError(
                    f"{self.root} already holds checkpoints but checkpoint.resume=none; use "
                    "checkpoint.resume=auto to continue that run, or choose a new run_dir"
                )
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)  # a checkpoint, a checkpoints folder, or a run directory
        ref = read_checkpoint(path)
        for root in (path, path / CKPT_DIR):
            if ref is None and root.is_dir():
                ref = CheckpointManager(root.parent, 1, root_name=root.name).latest()
        if ref is None:
            raise FileNotFoundError(
                f"checkpoint.resume={resume}: no complete checkpoint there (a checkpoint "
                f"directory holds {META}); use auto, none, or a path like "
                f"RUN_DIR/{CKPT_DIR}/{tag_for(100)}"
            )
        return ref

    # ------------------------------------------------------------------------- save

    def save(self, engine, step: int, client_state: dict, meta: dict) -> CheckpointRef:
        """Collective: every rank calls it. Returns the new complete checkpoint."""
        from trainer.engine import barrier

        tag = tag_for(step)
        tmp = self.root / f"{TMP_PREFIX}{tag}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        state = dict(client_state, rng=rng_state(), universal_checkpoint_info={})
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=state, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        barrier()
        final = self.root / tag
        if self.rank == 0:
            fault_point("save", step)
            meta = dict(meta, step=step, world_size=self.world_size, saved_at=time.time())
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
            self._verify(tmp, meta)
            if final.exists():  # re-saving a step (e.g. a finished run resumed): swap safely
                old = self.root / f"{TMP_PREFIX}old-{tag}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _write_atomic(self.root / LATEST, tag)
            self._prune()
        barrier()
        return CheckpointRef(final, json.loads((final / META).read_text()))

    def _verify(self, path: Path, meta: dict) -> None:
        """Every file a resume needs exists and is non-empty (rank 0, after all ranks wrote)."""
        stage, world = int(meta.get("zero_stage", 0)), self.world_size
        needed = [f"rng_rank{r}.pt" for r in range(world)]
        needed.append(
            "zero_pp_rank_0_mp_rank_00_model_states.pt"
            if stage == 3
            else "mp_rank_00_model_states.pt"
        )
        optim = list(path.glob("*optim_states.pt"))
        if (stage > 0 or optim) and len(optim) != world:  # bf16 at stage 0 is sharded too
            raise RuntimeError(
                f"checkpoint {path}: {len(optim)} optimizer shards, expected {world}"
            )
        for name in needed:
            f = path / name
            if not f.is_file() or f.stat().st_size == 0:
                raise RuntimeError(f"checkpoint {path} is incomplete: {name} missing or empty")

    def _prune(self) -> None:
        refs = self.complete()
        for ref in refs[: max(0, len(refs) - self.keep)]:
            shutil.rmtree(ref.path, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / ref.tag, ignore_errors=True)

    # ------------------------------------------------------------------------- load

    def needs_universal(self, ref: CheckpointRef, zero_stage: int) -> bool:
        """True when the ZeRO shards were written for another world size."""
        saved_stage = int(ref.meta.get("zero_stage", 0))
        if saved_stage != zero_stage:
            raise ValueError(
                f"checkpoint {ref.path} was saved with zero_stage={saved_stage}; resume with "
                f"zero_stage={saved_stage} (stage changes are not supported)"
            )
        sharded = saved_stage > 0 or any(ref.path.glob("*optim_states.pt"))  # bf16 stage 0
        return sharded and int(ref.meta.get("world_size", 1)) != self.world_size

    def universal(self, ref: CheckpointRef) -> Path:
        """Convert ``ref`` to DeepSpeed's universal format once (rank 0); collective."""
        from trainer.engine import barrier

        out = self.root / "universal" / ref.tag
        if self.rank == 0 and not (out / "zero").is_dir():
            from deepspeed.checkpoint import ds_to_universal

            tmp = out.with_name(TMP_PREFIX + ref.tag)
            shutil.rmtree(tmp, ignore_errors=True)
            args = argparse.Namespace(
                input_folder=str(ref.path),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
            ds_to_universal.main(args)
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        barrier()
        return out

    def load(self, engine, ref: CheckpointRef, universal: bool) -> dict:
        """Load engine state from ``ref``, restore this rank's RNG; returns client_state."""
        path = self.universal(ref) if universal else ref.path
        if not universal and engine.zero_optimization() and not list(path.glob("*optim_states.pt")):
            raise RuntimeError(  # DeepSpeed: a bare FileNotFoundError naming a shard
                f"checkpoint {path} holds no ZeRO optimizer shards, but this run's optimizer is "
                f"sharded (e.g. a bf16 zero_stage=0 checkpoint written before bf16 ran DeepSpeed's "
                f"BF16_Optimizer, see trainer/precision.py); resume it with the code and settings "
                f"that wrote it, or start a new run_dir"
            )
        loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        own = ref.path / f"rng_rank{self.rank}.pt"
        if own.is_file():
            set_rng_state(torch.load(own, weights_only=False))
        elif client and "rng" in client:
            set_rng_state(client["rng"])
        return client or {}


# ----------------------------------------------------------------------------- export


BF16_SHARDS = "bf16_zero_pp_rank_*_optim_states.pt"
"""Optimizer shards of every bf16 ZeRO run, BF16_Optimizer's (our bf16 at ZeRO-0/1) included."""


def _shard_rank(path: Path) -> int:
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])


def is_bf16_optimizer_checkpoint(ref: CheckpointRef) -> bool:
    """True for DeepSpeed's BF16_Optimizer shards: unlike ZeRO's, they record no ZeRO stage."""
    shards = sorted(ref.path.glob(BF16_SHARDS), key=_shard_rank)
    if not shards:
        return False
    state = torch.load(shards[0], weights_only=False, mmap=True)["optimizer_state_dict"]
    return "zero_stage" not in state and "param_slice_mappings" in state


def bf16_master_weights(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint, merged over its rank shards.

    Each shard holds, per parameter group, one flat fp32 partition and ``param_slice_mappings``
    (parameter name -> (start, numel) of its piece in that partition); a parameter's pieces,
    concatenated in rank order, are its flat fp32 weight. DeepSpeed's ``zero_to_fp32`` does
    not read these shards (they carry no ZeRO stage). The module file's weights are the
    bf16-rounded copy and only fill in what no shard holds (buffers, frozen parameters).
    """
    model = torch.load(ref.path / "mp_rank_00_model_states.pt", weights_only=False)
    shapes = {k: v for group in model["param_shapes"] for k, v in group.items()}
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for shard in sorted(ref.path.glob(BF16_SHARDS), key=_shard_rank):
        state = torch.load(shard, weights_only=False)["optimizer_state_dict"]
        groups = state["single_partition_of_fp32_groups"]
        for flat, mapping in zip(groups, state["param_slice_mappings"], strict=True):
            for name, frag in mapping.items():
                pieces[name].append(flat.narrow(0, frag.start, frag.numel))
    out = {k: v for k, v in model["module"].items() if k not in shapes}
    for name, shape in shapes.items():
        flat = torch.cat(pieces[name]) if pieces[name] else torch.empty(0)
        if flat.numel() != shape.numel():
            raise RuntimeError(
                f"checkpoint {ref.path}: the optimizer shards hold {flat.numel()} values of "
                f"{name}, its shape {tuple(shape)} needs {shape.numel()}; a shard is missing "
                "or from another save, re-export from a complete checkpoint"
            )
        out[name] = flat.view(shape)
    return out


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint of any ZeRO stage (ZeRO shards are merged).

    Always the optimizer's fp32 master weights where the run had them (bf16 at every stage),
    never the bf16-rounded module weights.
    """
    if is_bf16_optimizer_checkpoint(ref):
        state = bf16_master_weights(ref)
    elif list(ref.path.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ref.path.parent), tag=ref.tag)
    else:  # plain data parallel: the model file holds the full weights
        files = torch.load(ref.path / "mp_rank_00_model_states.pt", weights_only=False)
        state = files["module"]
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def export_checkpoint(ref: CheckpointRef, out_dir: str | Path, tokenizer: Path | None) -> Path:
    """Write ``model.safetensors`` (fp32), ``config.json`` and ``tokenizer.json`` to out_dir.

    config.json holds the model config plus objective, causal flag, mask id (and the MDM's
    ``mdm.eps``, so an export alone scores the 1/t ELBO as trained), step and tokens,
    enough to rebuild ``Transformer(ModelConfig(**model), causal)`` without DeepSpeed.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(consolidated_state_dict(ref), str(tmp / "model.safetensors"))
    keys = ("model", "objective", "causal", "mask_id", "step", "tokens", "n_params", "corpus")
    keys += ("preset", "eos_id", "tokenizer_sha256", "mdm_eps")
    info = {k: ref.meta.get(k) for k in keys}
    info["format"] = "maskscale-export-v1"
    info["checkpoint"] = str(ref.path)
    (tmp / "config.json").write_text(json.dumps(info, indent=2))
    if tokenizer is not None and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def load_export(export_dir: str | Path, device: str | torch.device = "cpu"):
    """(Transformer with the exported weights, config.json dict) from an export directory."""
    from safetensors.torch import load_file

    from trainer.model import ModelConfig, Transformer

    export_dir = Path(export_dir)
    info = json.loads((export_dir / "config.json").read_text())
    model = Transformer(ModelConfig(**info["model"]), causal=bool(info["causal"]))
    model.load_state_dict(load_file(str(export_dir / "model.safetensors")))
    return model.to(device).eval(), info
