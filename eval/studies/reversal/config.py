"""Settings of the reversal-curse study (``maskscale study reverse``), checked before any work.

Why its own module: the fine-tunes (``finetune``) and the study itself (``study``) both read
them; neither has to import the other to know what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.configlib import ConfigError

TRAIN_FILE = "all_prompts_train.jsonl"
FAMILIES = ("arm", "mdm")


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
    """key=value overrides for both fine-tunes."""
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
