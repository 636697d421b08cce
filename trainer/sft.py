"""Fine-tuning (``maskscale train task=sft init=RUN sft.data=FILE.jsonl``): what differs from
pretraining, in one place.

Why this module: SFT runs the same loop as pretraining (DeepSpeed engine, checkpoints, resume,
MLflow, export; ``trainer/loop.py``); only the source of the model, the data and the loss
differ. ``trainer/loop.py`` asks this module for those pieces when ``task=sft``:

* :func:`resolve_init` finds the initial weights, model config and tokenizer in a run directory
  (its ``export/``, or its newest checkpoint if that is newer), a checkpoint directory or an
  export directory, with ``trainer.checkpoint`` only (the trainer never imports ``eval``).
* :func:`prepare_sft` reads the SFT file(s) with the init's tokenizer (``trainer/sft_data.py``)
  and describes them like a corpus manifest (tokenizer, seq_len), so the rest of the loop reads
  no corpus; :func:`sft_budget` turns ``sft.epochs`` into steps.
* :class:`SFTEvaluator` reports ``val/sft/loss`` on the held-out records with the SFT objective.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.configlib import ConfigError, to_dict
from pipeline.shards import TOKENIZER, file_sha256
from trainer.checkpoint import (
    CKPT_DIR,
    CheckpointManager,
    CheckpointRef,
    consolidated_state_dict,
    read_checkpoint,
)
from trainer.config import BudgetConfig, TrainConfig
from trainer.model import ModelConfig
from trainer.sft_data import ReadReport, SFTRows, hold_out, iter_sft_eval_batches, read_sft_file

EOS_TOKEN = "<|endoftext|>"
EXPORT = "export"


@dataclass
class InitSource:
    """Where the fine-tuning starts: weights, model config, tokenizer and their provenance."""

    path: Path
    """The export or checkpoint directory the weights come from."""
    info: dict
    """Export config.json or checkpoint meta.json (model, objective, causal, mask_id, ...)."""
    tokenizer: Path
    checkpoint: CheckpointRef | None = None
    """Set when the weights are read from a DeepSpeed checkpoint (else an export)."""
    hf: Any = None
    """Set (a ``trainer.hf.HFDir``) for ``init=hf:DIR``: Llama weight names, converted."""

    @property
    def model_cfg(self) -> ModelConfig:
        return ModelConfig(**self.info["model"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 weights (merged from ZeRO shards for a checkpoint)."""
        if self.checkpoint is not None:
            return consolidated_state_dict(self.checkpoint)
        if self.hf is not None:
            return self.hf.state_dict(self.model_cfg, seed=0)
        from safetensors.torch import load_file

        return load_file(str(self.path / "model.safetensors"))


def _is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _tokenizer_near(*folders: Path) -> Path:
    for folder in folders:
        if (folder / TOKENIZER).is_file():
            return folder / TOKENIZER
    raise ConfigError(
        f"init: no {TOKENIZER} in {', '.join(map(str, folders))}; copy the corpus's "
        f"{TOKENIZER} into the run directory"
    )


def resolve_init(init: str) -> InitSource:
    """The initial model of ``init``: an export dir, a checkpoint dir, or a run dir (its
    export, or its newest complete checkpoint when that is newer or there is no export)."""
    if init.startswith("hf:"):
        from trainer.hf import HFDir

        hf = HFDir.open(init)
        if hf.tokenizer is None:
            raise ConfigError(
                f"init={init}: no tokenizer.json in {hf.path}; SFT reads its data with the "
                "init's tokenizer (save one with tokenizer.save_pretrained(DIR))"
            )
        return InitSource(hf.path, hf.info(), hf.tokenizer, hf=hf)
    path = Path(init)
    if not path.is_dir():
        raise ConfigError(
            f"init={init}: not a directory; pass a pretraining run directory, one of its "
            f"checkpoints ({CKPT_DIR}/stepNNNNNNNN) or an export directory"
        )
    if _is_export(path):
        info = json.loads((path / "config.json").read_text())
        return InitSource(path, info, _tokenizer_near(path, path.parent))
    ref = read_checkpoint(path)
    if ref is not None:
        return InitSource(ref.path, ref.meta, _tokenizer_near(ref.path.parents[1]), ref)
    latest = CheckpointManager(path, keep=1).latest()
    export = path / EXPORT
    if _is_export(export):
        info = json.loads((export / "config.json").read_text())
        if latest is None or latest.step <= int(info.get("step") or 0):
            return InitSource(export, info, _tokenizer_near(export, path))
    if latest is not None:
        return InitSource(latest.path, latest.meta, _tokenizer_near(path), latest)
    raise ConfigError(
        f"init={init}: neither an export (config.json + model.safetensors) nor a run "
        f"directory with an export or a complete checkpoint"
    )


@dataclass
class SFTSource:
    """Everything the loop needs from the SFT side, read once in ``prepare``."""

    init: InitSource
    model_cfg: ModelConfig
    manifest: dict
    """Corpus-manifest stand-in: ``tokenizer`` (path, sha256, vocab_size, eos_id, mask_id),
    ``seq_len`` and the init's ``corpus`` (for evaluation defaults)."""
    train: SFTRows
    val: SFTRows | None
    reports: dict[str, ReadReport]


def _check_model(cfg: TrainConfig, init: InitSource) -> ModelConfig:
    model_cfg = init.model_cfg
    family = init.info.get("objective")
    if family and family != cfg.objective:
        raise ConfigError(
            f"init={cfg.init} is an {family} model but objective={cfg.objective}; pass "
            f"objective={family} (an ARM and an MDM differ in attention, not only in the loss)"
        )
    given = dict(cfg.model_overrides)
    changed = {k: v for k, v in given.items() if to_dict(model_cfg).get(k) != v}
    if changed:
        raise ConfigError(
            f"model_overrides {changed} differ from the init model {to_dict(model_cfg)}: "
            "fine-tuning keeps the initial shape; drop these overrides"
        )
    cfg.model = init.info.get("preset") or cfg.model  # the resolved config records the truth
    cfg.model_overrides = to_dict(model_cfg)
    return model_cfg


def _row_width(cfg: TrainConfig, model_len: int) -> int | None:
    """``sft.seq_len`` as a row width (None = auto, known after reading the file)."""
    width = cfg.sft.seq_len
    if width == "auto":
        return None
    if width is not None and width > model_len:
        raise ConfigError(
            f"sft.seq_len={width} exceeds the init model's seq_len {model_len} (its rotary "
            f"table); pass sft.seq_len<={model_len}, auto or null"
        )
    return width or model_len


def prepare_sft(cfg: TrainConfig) -> SFTSource:
    """Resolve the init, tokenize the SFT file(s), hold out validation rows."""
    from tokenizers import Tokenizer

    init = resolve_init(cfg.init)
    model_cfg = _check_model(cfg, init)
    tok = Tokenizer.from_file(str(init.tokenizer))
    eos = init.info.get("eos_id")
    eos = tok.token_to_id(EOS_TOKEN) if eos is None else int(eos)
    if eos is None:
        raise ConfigError(f"init={cfg.init} records no eos_id and {EOS_TOKEN!r} is unknown")
    seq_len = _row_width(cfg, model_cfg.seq_len)
    rows, report = read_sft_file(cfg.sft.data, tok, eos, seq_len or model_cfg.seq_len, cfg.sft)
    if seq_len is None:  # auto: the longest record, rounded up to a multiple of 8
        seq_len = min(model_cfg.seq_len, -(-report.longest // 8) * 8)
        rows = rows.narrow(seq_len)
    reports = {"train": report}
    if cfg.sft.validation:
        train, (val, reports["validation"]) = (
            rows,
            read_sft_file(cfg.sft.validation, tok, eos, seq_len, cfg.sft),
        )
    else:
        train, val = hold_out(rows, cfg.sft.val_fraction, cfg.seed)
    manifest = {
        "tokenizer": {
            "path": str(init.tokenizer.resolve()),
            "sha256": init.info.get("tokenizer_sha256") or file_sha256(init.tokenizer),
            "vocab_size": model_cfg.vocab_size,
            "eos_id": eos,
            "mask_id": model_cfg.mask_id,
        },
        "seq_len": seq_len,
        "splits": {},
        "corpus": init.info.get("corpus"),
    }
    return SFTSource(init, model_cfg, manifest, train, val, reports)


def sft_budget(cfg: TrainConfig, n_rows: int) -> BudgetConfig:
    """``sft.epochs`` as steps (ceil(epochs * rows / global_batch)), else the budget section."""
    if cfg.sft.epochs is None:
        return cfg.budget
    return BudgetConfig(steps=max(1, math.ceil(cfg.sft.epochs * n_rows / cfg.batch.global_batch)))


def describe(src: SFTSource) -> dict:
    """JSON record of the SFT inputs (run_dir/sft_data.json, MLflow params)."""
    out = {
        "init": str(src.init.path.resolve()),
        "init_step": src.init.info.get("step"),
        "train_rows": len(src.train),
        "val_rows": 0 if src.val is None else len(src.val),
        "seq_len": src.manifest["seq_len"],
    }
    for name, report in src.reports.items():
        out[name] = {"path": str(Path(report.path).resolve()), "sha256": file_sha256(report.path)}
        out[name].update(report.as_dict())
    return out


def load_init_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the init weights into ``model``; works on ZeRO-3-partitioned parameters too."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ConfigError(f"init weights do not fit the model: missing {missing}, extra {extra}")
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0), torch.no_grad():
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                for name, p in params.items():
                    p.copy_(state[name].to(p.dtype))
        return
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise ConfigError(f"init weight {name}: shape {tuple(state[name].shape)} vs "
                                  f"model {tuple(p.shape)}")  # fmt: skip
            p.copy_(state[name].to(p.dtype))


class SFTEvaluator:
    """``val/sft/loss`` (and ppl) on the validation rows; batches spread over ranks and every
    rank runs the same number of forwards (zero-weight repeats), as the corpus Evaluator."""

    def __init__(self, rows: SFTRows | None, eval_cfg, rank: int, world: int, device):
        self.batches = (
            [] if rows is None else list(iter_sft_eval_batches(rows, eval_cfg.batch_size,
                                                                eval_cfg.max_rows))
        )  # fmt: skip
        self.n_samples, self.rank, self.world, self.device = eval_cfg.n_samples, rank, world, device

    def params(self) -> dict:
        """MLflow params of the validation set (the rows are the SFT file's held-out records)."""
        return {"sft": {"batches": len(self.batches)}}

    def write_record(self, run_dir) -> None:
        """The corpus Evaluator writes eval_rows.json; SFT rows are described in sft_data.json."""
        return None

    def run(self, engine, objective) -> dict[str, float]:
        from trainer.engine import all_reduce_sum
        from trainer.validation import evaluating, loss_metrics

        if not self.batches:
            return {}
        loss_sum, rows = 0.0, 0
        with evaluating(engine):
            for i in range(math.ceil(len(self.batches) / self.world)):
                index = i * self.world + self.rank
                weight = 1 if index < len(self.batches) else 0
                batch, keys, lengths = self.batches[index if weight else 0]
                loss = objective.eval_loss(
                    engine, batch.to(self.device), keys, self.n_samples, lengths
                )
                loss_sum += weight * float(loss) * len(keys)
                rows += weight * len(keys)
        total, count = all_reduce_sum([loss_sum, rows], self.device)
        return loss_metrics("sft", total / max(count, 1))
