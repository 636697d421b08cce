"""The study's fine-tunes: one ``python -m pipeline.cli train task=sft`` run per family.

Why its own module: what a fine-tune was asked for (``study_run.json``) decides whether a rerun
into the same ``--out`` skips it, resumes it, extends it to more epochs or refuses it; that
bookkeeping is checkable without a model and apart from sampling and scoring.

Each fine-tune is an ordinary run directory (checkpoints, resume, export, MLflow) under
``OUT/runs/<family>-sft``. The MDM trains with the unconditional loss on prompt + completion
(``sft.target=all``), as the paper; the ARM on completions. Both at a global batch of 64 rows,
SMDM's (``config.SFT_GLOBAL_BATCH``), unless an override ``batch.global_batch=N`` says
otherwise: the steps of an epoch, and so the fine-tune, depend on it, so a fine-tune run at
another batch is refused on a rerun, with the batch it had.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from eval.studies.reversal.config import (
    SFT_GLOBAL_BATCH,
    TRAIN_FILE,
    ReverseStudyConfig,
    override_key,
)
from pipeline.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[3]
"""The repository root, put on the fine-tunes' PYTHONPATH."""
STAMP_FILE = "study_run.json"


def say(text: str) -> None:
    print(f"[study reverse] {text}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_uri(cfg: ReverseStudyConfig) -> str:
    from eval.measure.outputs import mlflow_target

    if cfg.tracking_uri:
        return cfg.tracking_uri
    target = mlflow_target(Path(cfg.arm))
    return target[0] if target else f"sqlite:///{(Path(cfg.out) / 'mlflow.db').resolve()}"


def sft_command(cfg: ReverseStudyConfig, family: str, data: Path, run_dir: Path) -> list[str]:
    """The ``python -m pipeline.cli train task=sft`` command of one fine-tune."""
    cmd = [sys.executable, "-m", "pipeline.cli", "train"]
    cmd += ["--config", str(cfg.config)] if cfg.config else []
    init = Path(getattr(cfg, family)).resolve()
    cmd += [
        "task=sft", f"init={init}", f"objective={family}", f"sft.data={data / TRAIN_FILE}",
        f"sft.epochs={cfg.epochs_of(family):g}", "budget.steps=null", "sft.val_fraction=0", f"run_dir={run_dir.resolve()}",
        f"sft.target={'all' if family == 'mdm' else 'answer'}", "checkpoint.resume=auto",
        "sft.seq_len=auto",  # rows as long as the longest fact, not the pretraining context
        f"batch.global_batch={SFT_GLOBAL_BATCH}",  # SMDM's; an override below wins
        f"tracking.experiment={cfg.experiment}", f"tracking.run_name={family}-sft-reverse",
    ]  # fmt: skip
    cmd += [f"tracking.uri={resolve_uri(cfg)}"] if cfg.mlflow else ["tracking.enabled=false"]
    return cmd + list(cfg.overrides)


def study_stamp(cfg: ReverseStudyConfig, data_sha: str) -> dict:
    """What a fine-tune was asked for: compared on every rerun into the same ``--out``."""
    config = str(Path(cfg.config).resolve()) if cfg.config else None
    return {
        "train_sha256": data_sha, "config": config, "overrides": list(cfg.overrides),
        "global_batch": cfg.global_batch(),
    }  # fmt: skip


def saved_setting(run_dir: Path, section: str, key: str):
    """``section.key`` of the run's saved config (after any extension), None before it exists."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get(section) or {}).get(key)


def saved_epochs(run_dir: Path) -> float | None:
    """``sft.epochs`` of the run's saved config, None before it exists."""
    if not (run_dir / "config.yaml").is_file():
        return None
    return float(saved_setting(run_dir, "sft", "epochs") or 0)


def _settings(overrides: list[str]) -> list[str]:
    """Overrides compared between reruns: all but the batch, which is compared by its value."""
    return [o for o in overrides if override_key(o) != "batch.global_batch"]


def plan_fine_tune(run_dir: Path, stamp: dict, epochs: float) -> str:
    """``"skip"`` (finished as asked), ``"extend"`` (fewer epochs so far) or ``"run"``.

    A fine-tune asked for with another training file, other settings or another global batch
    (its saved config's, else its stamp's) is refused (its answers would not be the asked-for
    study); one asked for more epochs continues from its last checkpoint with
    ``checkpoint.reschedule=true``; one with more epochs than asked is refused.
    """
    path, legacy = run_dir / STAMP_FILE, run_dir / "study_data.sha256"
    if path.is_file():
        old = json.loads(path.read_text())
    elif legacy.is_file():  # stamps of earlier versions: the training file's hash only
        old = {"train_sha256": legacy.read_text().strip()}
    else:
        return "run"
    redo = "use another --out or delete it"
    if old["train_sha256"] != stamp["train_sha256"]:
        raise ConfigError(f"{run_dir} was fine-tuned on another training file; {redo}")
    changed = [k for k in ("config", "overrides") if k in old and old[k] != stamp[k]]
    if "overrides" in changed and _settings(old["overrides"]) == _settings(stamp["overrides"]):
        changed.remove("overrides")  # only the batch differs: checked by value below
    if changed:
        was = "; ".join(f"{k}: {old[k]} -> {stamp[k]}" for k in changed)
        raise ConfigError(f"{run_dir} was fine-tuned with other settings ({was}); {redo}")
    _check_batch(run_dir, old, stamp, redo)
    had = saved_epochs(run_dir)
    if had is not None and had > epochs:
        raise ConfigError(
            f"{run_dir} is fine-tuned for {had:g} epochs, more than {epochs:g}; {redo}"
        )
    if had is not None and had < epochs:
        return "extend"
    done = (run_dir / "summary.json").is_file() and (run_dir / "export/config.json").is_file()
    return "skip" if done else "run"


def _check_batch(run_dir: Path, old: dict, stamp: dict, redo: str) -> None:
    """Refuse a fine-tune run at another global batch than asked (unknown for stamps of earlier
    versions without a saved config: not checked)."""
    had = saved_setting(run_dir, "batch", "global_batch") or old.get("global_batch")
    asked = stamp.get("global_batch")
    if had is None or asked is None or int(had) == int(asked):
        return
    raise ConfigError(
        f"{run_dir} was fine-tuned at batch.global_batch={had}, the study asks for {asked} "
        f"(its default is SMDM's {SFT_GLOBAL_BATCH}; pass batch.global_batch={had} to keep that "
        f"fine-tune, or {redo})"
    )


def fine_tune(cfg: ReverseStudyConfig, family: str, data: Path) -> Path:
    """Fine-tune one family (skipped when finished, extended when asked for more epochs)."""
    run_dir = Path(cfg.out) / "runs" / f"{family}-sft"
    stamp = study_stamp(cfg, file_sha256(data / TRAIN_FILE))
    plan = plan_fine_tune(run_dir, stamp, cfg.epochs_of(family))
    if plan == "skip":
        say(f"{family.upper()} fine-tune finished already: {run_dir} (skipped)")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=1) + "\n")
    cmd = sft_command(cfg, family, data, run_dir)
    if plan == "extend":
        cmd.append("checkpoint.reschedule=true")
        say(f"{family.upper()} fine-tune: extending to {cfg.epochs_of(family):g} epochs")
    say(f"fine-tuning {family.upper()}: {' '.join(cmd[1:])}")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise ConfigError(
            f"{family.upper()} fine-tune failed (exit {result.returncode}); see its output above; "
            f"rerunning the study resumes it from {run_dir}"
        )
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{family.upper()} fine-tune ended without {run_dir}/summary.json")
    say(f"{family.upper()} fine-tune done in {time.perf_counter() - start:.0f} s")
    return run_dir
