"""Settings of the reversal-curse study (``maskscale study reverse``), checked before any work.

Why its own module: the fine-tunes (``finetune``) and the study itself (``study``) both read
them; neither has to import the other to know what was asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.configlib import ConfigError

TRAIN_FILE = "all_prompts_train.jsonl"
FAMILIES = ("arm", "mdm")
SFT_GLOBAL_BATCH = 64
"""The fine-tunes' global batch unless an override says otherwise: SMDM's reversal fine-tune
(``sft/finetune_mdm_reverse.py``, ``--bs 64``); a ``--config`` file's batch is not used."""


@dataclass
class ReverseStudyConfig:
    """Settings of one reversal-curse study (the CLI's options)."""

    arm: str
    """Pretrained ARM run directory (or export) the ARM fine-tune starts from."""
    mdm: str
    """Pretrained MDM run directory (or export) the MDM fine-tune starts from."""
    out: str = "studies/reverse"
    """Study folder: data/, runs/<family>-sft, answers, table, plot, results."""
    data: str | None = None
    """Folder with Berglund et al.'s files; None = generate into OUT/data."""
    seed: int = 0
    """Generator seed (with ``data`` None)."""
    people: int = 30
    """Generated people per group (30 = the paper's 3600 training prompts)."""
    train_templates: int = 30
    """Generated training templates per direction."""
    test_templates: int = 10
    """Generated held-out test templates per direction."""
    epochs: float = 10.0
    """Fine-tuning passes over the training file (the paper: 10)."""
    mdm_epochs: float | None = None
    """The MDM's passes, when they differ (None = ``epochs``): a tiny MDM memorises the facts
    far more slowly than an ARM (benchmarks/reverse_study.md); reported in the table."""
    config: str | None = None
    """Training recipe YAML for both fine-tunes (default: the trainer's paper recipe)."""
    overrides: list[str] = field(default_factory=list)
    """key=value overrides for both fine-tunes (after the study's own, so they win)."""
    steps: int = 32
    """MDM reverse-process steps (low-confidence, temperature 0)."""
    block_length: int | None = None
    """MDM semi-autoregressive blocks (``SamplingConfig.block_length``); None =
    the paper's plain reverse process over all L slots."""
    length: int | None = None
    """Answer tokens; None = longest tokenised reference + 4."""
    batch_size: int = 32
    """Prompts per sampling batch."""
    tracking_uri: str | None = None
    """MLflow URI for the fine-tunes and the study run; None = the ARM init run's, else
    sqlite:///OUT/mlflow.db."""
    experiment: str = "study-reverse"
    """MLflow experiment of the fine-tunes and the study run."""
    mlflow: bool = True
    """False: no MLflow for the fine-tunes nor the study run."""
    device: str = "auto"
    dtype: str = "auto"
    choice: bool = True
    """Also rank every candidate answer by likelihood (:mod:`eval.studies.reversal.choice`)."""
    cfg_scale: float = 0.0
    """``--cfg``: unsupervised classifier-free guidance scale w of the MDM's sampling and
    likelihoods (SMDM's ``evaluate_reverse.py`` samples with 0.8). w > 0 reports the MDM twice,
    unguided and guided, side by side; 0 = the paper-notes protocol, unguided only."""

    def validate(self) -> None:
        for key in ("arm", "mdm"):
            if not Path(getattr(self, key)).exists():
                raise ConfigError(f"--{key} {getattr(self, key)}: no such run directory")
        if self.data is not None and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data}: no such folder")
        if not self.epochs > 0:
            raise ConfigError(f"--epochs: must be > 0, got {self.epochs}")
        if self.mdm_epochs is not None and not self.mdm_epochs > 0:
            raise ConfigError(f"--mdm-epochs: must be > 0, got {self.mdm_epochs}")
        for key in ("steps", "batch_size", "people", "train_templates", "test_templates"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1")
        if self.length is not None and self.length < 1:
            raise ConfigError(f"--length: must be >= 1, got {self.length}")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        if self.block_length is not None and self.block_length < 1:
            raise ConfigError(f"--block-length: must be >= 1, got {self.block_length}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ConfigError(f"--cfg: must be a finite number >= 0, got {self.cfg_scale}")
        self.global_batch()  # a malformed batch.global_batch override fails here, named
        if self.block_length and self.length and self.steps % -(-self.length // self.block_length):
            raise ConfigError(
                f"--steps {self.steps}: not a multiple of the blocks of {self.block_length} in "
                f"--length {self.length}"
            )

    def epochs_of(self, family: str) -> float:
        """Fine-tuning epochs of ``family``."""
        return self.mdm_epochs if family == "mdm" and self.mdm_epochs else self.epochs

    def epochs_text(self) -> str:
        """ "10 epochs", or "ARM 30 / MDM 100 epochs" when they differ."""
        arm, mdm = self.epochs_of("arm"), self.epochs_of("mdm")
        return f"{arm:g} epochs" if arm == mdm else f"ARM {arm:g} / MDM {mdm:g} epochs"

    def cfg_scales(self, family: str) -> list[float]:
        """Guidance scales ``family`` is sampled and scored at: 0, and ``--cfg`` for the MDM."""
        return [0.0, self.cfg_scale] if family == "mdm" and self.cfg_scale else [0.0]

    def global_batch(self) -> int:
        """The fine-tunes' global batch: the last ``batch.global_batch=N`` override, else
        ``SFT_GLOBAL_BATCH`` (SMDM's 64)."""
        asked = [
            o.partition("=")[2] for o in self.overrides if override_key(o) == "batch.global_batch"
        ]
        if not asked:
            return SFT_GLOBAL_BATCH
        try:
            value = int(asked[-1])
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"batch.global_batch: must be an integer >= 1, got {asked[-1]!r}")
        return value


def override_key(override: str) -> str:
    """``a.b`` of a ``a.b=value`` override."""
    return override.partition("=")[0].strip()


def variant(family: str, cfg_scale: float) -> str:
    """The report's name of a family sampled and scored at guidance ``cfg_scale``: ``mdm``,
    ``mdm-cfg0.8`` (its column in the tables, its bar in the plot, its MLflow metric prefix)."""
    return family if cfg_scale == 0 else f"{family}-cfg{cfg_scale:g}"
