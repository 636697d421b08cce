"""Load a trained run for evaluation: from its export, never from DeepSpeed state.

Why: evaluation must work on any machine that has the exported weights (``RUN_DIR/export/``:
fp32 ``model.safetensors`` + ``config.json`` + ``tokenizer.json``, written by ``maskscale
export`` and at the end of training), without DeepSpeed or the optimizer state. ``path`` is a
run directory or an export directory; ``checkpoint=STEP`` first exports that checkpoint of the
run (``trainer.checkpoint.export_checkpoint``) into ``RUN_DIR/exports/stepNNNNNNNN/``, so the
final export stays untouched.

Every user mistake (no export, unknown checkpoint, a corpus built with another tokenizer, an
unknown split) raises :class:`EvalError` with a message that says what to do; the CLIs turn it
into exit code 2 before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.shards import MANIFEST, TOKENIZER, file_sha256
from trainer.config import MDMConfig

EXPORT = "export"
EXPORTS = "exports"
"""Per-checkpoint exports made by ``--checkpoint STEP`` live in ``RUN_DIR/exports/<tag>/``."""
EOS_TOKEN = "<|endoftext|>"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class EvalError(Exception):
    """A user error in an eval command; the message says what to do (exit code 2)."""


def jsonl_records(path: str | Path, flag: str):
    """(``file:line``, parsed object) for each non-blank line of a JSONL input given as ``flag``
    (``--prompts``, ``--input``); a missing file or a line that is not JSON is an EvalError
    naming it. Callers validate the fields and name ``file:line`` in their own errors."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{flag} {path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(
                    f"{where}: not valid JSON ({e.msg}); fix or remove the line"
                ) from None
            yield where, obj


@dataclass
class LoadedModel:
    """An exported model on its device, with everything evaluation needs to know about it."""

    model: torch.nn.Module | None
    """trainer.model.Transformer in eval mode, on ``device`` in ``dtype`` (None when loaded
    with ``weights=False``)."""
    info: dict
    """The export's config.json (model config, objective, causal, mask_id, step, tokens, ...)."""
    family: str
    """"arm" or "mdm"."""
    causal: bool
    tokenizer: object
    """tokenizers.Tokenizer of the run."""
    tokenizer_sha256: str
    eos_id: int
    mask_id: int
    seq_len: int
    device: torch.device
    dtype: torch.dtype
    run_dir: Path | None
    """The training run directory, or None for a bare export folder."""
    export_dir: Path
    mdm_eps: float = MDMConfig.eps
    """The run's MDM mask-probability floor (``mdm.eps`` of its config.yaml; the trainer's
    default when the run records none), for ELBO evaluation and the 1/t likelihood."""

    @property
    def step(self) -> int | None:
        return self.info.get("step")

    @property
    def name(self) -> str:
        """Short label for tables and plots: the run directory's (or export's) name."""
        if self.run_dir is None:
            return self.export_dir.name
        tag = "" if self.export_dir == self.run_dir / EXPORT else f"@{self.export_dir.name}"
        return self.run_dir.name + tag

    @property
    def out_dir(self) -> Path:
        """Where eval results go: RUN_DIR/eval (RUN_DIR/eval/<tag> for a checkpoint export)."""
        if self.run_dir is None:
            return self.export_dir / "eval"
        if self.export_dir == self.run_dir / EXPORT:
            return self.run_dir / "eval"
        return self.run_dir / "eval" / self.export_dir.name

    @property
    def corpus(self) -> Path | None:
        """The corpus the run was trained on (its config.yaml, else the export's record)."""
        recorded = _run_config(self.run_dir).get("corpus") or self.info.get("corpus")
        return Path(recorded) if recorded else None

    def objective(self):
        """The run's objective (trainer.objectives), whose eval losses match training's."""
        from trainer.objectives import ARMObjective, MDMObjective

        if self.family == "arm":
            return ARMObjective()
        return MDMObjective(self.mask_id, eps=self.mdm_eps)

    def fingerprint(self) -> dict:
        """Identifies these weights, so cached results of other weights are not reused."""
        weights = self.export_dir / "model.safetensors"
        stat = weights.stat()
        return {
            "export": str(self.export_dir.resolve()),
            "step": self.step,
            "checkpoint": self.info.get("checkpoint"),
            "weights_bytes": stat.st_size,
            "weights_mtime_ns": stat.st_mtime_ns,
        }


# ----------------------------------------------------------------------------- device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto -> CUDA (this process's LOCAL_RANK under torchrun) if present, else CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvalError(
            f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto -> bf16 on GPU, fp32 on CPU; else fp32 | bf16 | fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: choose auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ----------------------------------------------------------------------------- locating


def _is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _is_run(path: Path) -> bool:
    from trainer.checkpoint import CKPT_DIR

    return (path / "config.yaml").is_file() or (path / CKPT_DIR).is_dir()


def _run_config(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise EvalError(f"{run_dir / 'config.yaml'} is not valid YAML ({e}); restore it") from None


def _available_steps(run_dir: Path) -> list[int]:
    from trainer.checkpoint import CheckpointManager

    return [ref.step for ref in CheckpointManager(run_dir, keep=1).complete()]


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def export_step(run_dir: Path, step: int) -> Path:
    """Export checkpoint ``step`` of ``run_dir`` (once; reused while it is current)."""
    from trainer.checkpoint import CKPT_DIR, export_checkpoint, read_checkpoint, tag_for

    ref = read_checkpoint(run_dir / CKPT_DIR / tag_for(step))
    if ref is None:
        steps = _available_steps(run_dir)
        raise EvalError(
            f"run {run_dir} has no complete checkpoint at step {step}; available steps: "
            f"{steps or 'none'} (pass one of them to --checkpoint)"
        )
    out = run_dir / EXPORTS / ref.tag
    if _is_rank0():
        current = _is_export(out) and json.loads((out / "config.json").read_text()).get(
            "checkpoint"
        ) == str(ref.path)
        if not current:
            print(f"[eval] exporting {ref.path} -> {out}", flush=True)
            export_checkpoint(ref, out, run_dir / TOKENIZER)  # atomic: tmp dir + rename
    _barrier()
    return out


def locate(path: str | Path, checkpoint: int | None = None) -> tuple[Path | None, Path]:
    """(run_dir or None, export_dir) for a run directory or an export directory."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(
            f"{path} does not exist: pass a training run directory (run_dir=... of `maskscale "
            "train`) or an export directory"
        )
    if _is_export(path):
        if checkpoint is not None:
            raise EvalError(f"--checkpoint needs a run directory, but {path} is an export")
        run_dir = path.parent if _is_run(path.parent) else None
        return run_dir, path
    if not _is_run(path):
        raise EvalError(
            f"{path} is neither a run directory (config.yaml, checkpoints/) nor an export "
            "(config.json + model.safetensors)"
        )
    if checkpoint is not None:
        return path, export_step(path, checkpoint)
    export = path / EXPORT
    if not _is_export(export):
        steps = _available_steps(path)
        raise EvalError(
            f"run {path} has no export ({export}/model.safetensors): run `maskscale export "
            f"{path}` or pass --checkpoint STEP (complete checkpoints: {steps or 'none'})"
        )
    return path, export


# ----------------------------------------------------------------------------- loading


def _tokenizer(run_dir: Path | None, export_dir: Path):
    from tokenizers import Tokenizer

    for folder in (export_dir, run_dir):
        if folder is not None and (folder / TOKENIZER).is_file():
            return Tokenizer.from_file(str(folder / TOKENIZER)), folder / TOKENIZER
    raise EvalError(
        f"export {export_dir} has no {TOKENIZER}: copy the corpus's {TOKENIZER} there (or "
        "re-export with `maskscale export RUN_DIR`)"
    )


def _mdm_eps(cfg: dict, info: dict) -> float:
    """The run's ``mdm.eps``: its config.yaml, else the export's config.json (an export copied
    without its run), else the default (exports written before it was recorded)."""
    eps = (cfg.get("mdm") or {}).get("eps", info.get("mdm_eps"))
    return float(MDMConfig.eps if eps is None else eps)


def _eos_id(info: dict, tokenizer, manifest_eos: int | None) -> int:
    for candidate in (info.get("eos_id"), tokenizer.token_to_id(EOS_TOKEN), manifest_eos):
        if candidate is not None:
            return int(candidate)
    raise EvalError(f"cannot tell the EOS id: the export records none and {EOS_TOKEN!r} is unknown")


def load_model(
    path: str | Path,
    checkpoint: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    weights: bool = True,
) -> LoadedModel:
    """Load the export of a run (or an export folder) onto ``device`` in ``dtype``.

    ``weights=False`` reads everything but the weights (``model`` is None): a cheap check of
    many runs before any of them is evaluated.
    """
    from trainer.checkpoint import load_export

    run_dir, export_dir = locate(path, checkpoint)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        if weights:
            model, info = load_export(export_dir, device="cpu")
            model = model.to(device=dev, dtype=dt).eval()
        else:
            model, info = None, json.loads((export_dir / "config.json").read_text())
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise EvalError(
            f"cannot load export {export_dir} ({type(e).__name__}: {str(e)[:300]}); re-create "
            "it with `maskscale export RUN_DIR`"
        ) from None
    family = info.get("objective")
    if family not in ("arm", "mdm"):
        raise EvalError(f"{export_dir}/config.json: objective {family!r} is not arm or mdm")
    tokenizer, tok_path = _tokenizer(run_dir, export_dir)
    cfg = _run_config(run_dir)
    manifest_eos = None
    corpus = cfg.get("corpus") or info.get("corpus")
    if corpus and (Path(corpus) / MANIFEST).is_file():
        manifest_eos = json.loads((Path(corpus) / MANIFEST).read_text())["tokenizer"].get("eos_id")
    return LoadedModel(
        model=model,
        info=info,
        family=family,
        causal=bool(info["causal"]),
        tokenizer=tokenizer,
        tokenizer_sha256=info.get("tokenizer_sha256") or file_sha256(tok_path),
        eos_id=_eos_id(info, tokenizer, manifest_eos),
        mask_id=int(info.get("mask_id") or info["model"]["vocab_size"]),
        seq_len=int(info["model"]["seq_len"]),
        device=dev,
        dtype=dt,
        run_dir=run_dir,
        export_dir=export_dir,
        mdm_eps=_mdm_eps(cfg, info),
    )


# ----------------------------------------------------------------------------- corpus


def open_corpus(loaded: LoadedModel, corpus: str | Path | None = None) -> tuple[Path, dict]:
    """(corpus dir, manifest) after checking it was built for this model and tokenizer."""
    from trainer.data import CorpusMismatchError, check_corpus

    corpus_dir = Path(corpus) if corpus is not None else loaded.corpus
    if corpus_dir is None:
        raise EvalError(f"run {loaded.name} records no corpus: pass --corpus DIR")
    if not (corpus_dir / MANIFEST).is_file():
        raise EvalError(
            f"{corpus_dir} has no {MANIFEST}: pass --corpus DIR of a corpus built with "
            "`maskscale corpus build`"
        )
    vocab = int(loaded.info["model"]["vocab_size"])
    try:
        manifest = check_corpus(corpus_dir, vocab, loaded.seq_len, loaded.tokenizer_sha256)
    except (CorpusMismatchError, ValueError) as e:
        raise EvalError(f"run {loaded.name} cannot be evaluated on {corpus_dir}: {e}") from None
    return corpus_dir, manifest


def evaluable_splits(manifest: dict) -> list[str]:
    """Splits with at least one full row."""
    return [s for s, info in manifest.get("splits", {}).items() if info.get("rows", 0) > 0]


def resolve_splits(manifest: dict, requested: list[str] | None, corpus_dir: Path) -> list[str]:
    """The requested splits (checked), or ``validation`` plus every ``holdout_*`` split."""
    available = evaluable_splits(manifest)
    if requested:
        unknown = [s for s in requested if s not in available]
        if unknown:
            raise EvalError(
                f"corpus {corpus_dir} has no split {', '.join(map(repr, unknown))} with rows; "
                f"choose from {available} (--splits)"
            )
        return list(dict.fromkeys(requested))
    default = [s for s in available if s == "validation" or s.startswith("holdout_")]
    if not default:
        raise EvalError(
            f"corpus {corpus_dir} has no validation or holdout_* split with rows; pass --splits "
            f"(available: {available})"
        )
    return default
