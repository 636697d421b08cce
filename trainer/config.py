"""The training run's configuration: one tree of dataclasses, paper recipe by default.

A run is fully described by a ``TrainConfig``: which corpus, which objective (ARM or MDM),
which model size, how much compute, and the optimisation recipe. The defaults reproduce the
recipe of Nie et al. (2025) (AdamW 2e-4, betas 0.9/0.95, wd 0.1, clip 1.0, warmup
max(1% of steps, 100) then cosine to 2e-5, global batch 256 rows, bf16, seed 3407), so a
YAML file only states what differs. The resolved tree is saved with every checkpoint, into
``run_dir/config.yaml`` and as MLflow params, so any run can be re-created from its record.

Loaded with :func:`pipeline.configlib.load_config` (YAML + ``key=value`` overrides); the CLI
adds shortcuts (``flops=``, ``tokens=``, ``steps=``) through :func:`apply_shortcuts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.configlib import ConfigError
from trainer.tracking import TrackingConfig

BUDGET_KEYS = ("flops", "tokens", "steps")


@dataclass
class BudgetConfig:
    """How much training: exactly one of the three (the others are derived, see budget.py)."""

    flops: float | None = None
    """Training compute C in FLOPs; steps = C / (6 N * global_batch * seq_len)."""
    tokens: int | None = None
    """Training tokens D; steps = D / (global_batch * seq_len)."""
    steps: int | None = None
    """Optimizer steps S."""

    def validate(self) -> None:
        given = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"budget: set exactly one of budget.flops / budget.tokens / budget.steps "
                f"(got {given or 'none'}); e.g. steps=1000 or flops=6e18"
            )
        if getattr(self, given[0]) <= 0:
            raise ConfigError(f"budget.{given[0]}: must be > 0")


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay (the paper's recipe)."""

    lr: float = 2e-4
    """Peak learning rate."""
    lr_min: float = 2e-5
    """Learning rate at the last step (the cosine ends exactly here)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to every parameter as in the reference code."""
    grad_clip: float = 1.0
    """Clip the global gradient 2-norm to this value (0 disables clipping)."""
    warmup_frac: float = 0.01
    """Warmup steps = max(warmup_frac * steps, warmup_min) (capped at half the run)."""
    warmup_min: int = 100
    """Lower bound on the warmup length in steps."""

    def validate(self) -> None:
        if not 0 < self.lr:
            raise ConfigError("optim.lr: must be > 0")
        if not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"optim.lr_min: must be in [0, optim.lr={self.lr}]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas: two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay / optim.grad_clip: must be >= 0")
        if not 0 <= self.warmup_frac < 1 or self.warmup_min < 0:
            raise ConfigError("optim.warmup_frac: in [0, 1); optim.warmup_min: >= 0")


@dataclass
class BatchConfig:
    """Global batch in rows of seq_len tokens; accumulation is derived from the world size."""

    global_batch: int = 256
    """Rows per optimizer step over all processes (paper: 256 x 2048 tokens)."""
    micro_batch: int | None = None
    """Rows per process per forward pass; None = global_batch / world_size (no accumulation).
    Gradient accumulation steps = global_batch / (micro_batch * world_size)."""

    def validate(self) -> None:
        if self.global_batch <= 0:
            raise ConfigError("batch.global_batch: must be > 0")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise ConfigError("batch.micro_batch: must be > 0 (or null for global_batch/world)")
        if self.micro_batch is not None and self.global_batch % self.micro_batch:
            raise ConfigError(
                f"batch.micro_batch={self.micro_batch} must divide batch.global_batch="
                f"{self.global_batch}"
            )


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints under run_dir/checkpoints (atomic, last `keep` kept)."""

    every: int = 1000
    """Save every this many steps (0 = only at the end). The end of the run always saves."""
    keep: int = 3
    """Keep the newest `keep` checkpoints, delete older ones."""
    resume: str = "auto"
    """auto = continue from the newest checkpoint in run_dir if any; none = start fresh
    (refused if run_dir already has checkpoints); or a path to a checkpoint directory."""
    export: bool = True
    """At the end, write consolidated fp32 safetensors + config + tokenizer to run_dir/export."""

    def validate(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError("checkpoint.every: >= 0; checkpoint.keep: >= 1")
        if not self.resume:
            raise ConfigError("checkpoint.resume: auto, none or a checkpoint path")


@dataclass
class EvalConfig:
    """Validation on the `validation` split and every `holdout_*` split of the corpus."""

    every: int = 1000
    """Evaluate every this many steps (0 = only at the end)."""
    at_end: bool = True
    """Also evaluate after the last step."""
    n_samples: int = 128
    """MDM: Monte Carlo draws of t per row for the ELBO (stratified). ARM is exact."""
    batch_size: int = 8
    """Rows per evaluation forward pass (per process)."""
    max_rows: int | None = 1024
    """Rows evaluated per split (null = the whole split, in file order): a seeded uniform sample
    over all shards, the same rows for every run on the corpus (run_dir/eval_rows.json).
    Why 1024: what runs need is the *difference* of two runs on the same rows (and, for MDMs,
    the same masks), with 95% half-width 1.96 sigma_diff / sqrt(n). Per-row losses of two
    models are strongly correlated (demo corpus, seq 256, tiny-1M checkpoints 16 steps apart,
    benchmarks/val_rows_variance.py: ARM sigma_row 0.24, sigma_diff 0.0076, corr 0.9995; MDM
    at 8 samples sigma_row 0.46 of which Monte Carlo 0.32, sigma_diff 0.0055: same masks).
    At paper scale (1B, seq 2048, SlimPajama) we assume sigma_row ~0.6 nats (its sources differ
    by > 1 nat/token: code vs web) and sigma_diff <= 0.16 between runs worth comparing (corr
    >= 0.96): 1024 rows give +-0.01 paired. One run's absolute loss is only +-0.04 (an
    unpaired +-0.01 needs ~14k rows: use `maskscale eval ppl --rows`). Cost per evaluation:
    1024 forwards (ARM, ~1.3 training steps at global batch 256) or 1024 x n_samples (MDM,
    ~170 steps at 128 samples: lower n_samples or raise `every` if that is too much)."""
    splits: list[str] | None = None
    """Splits to evaluate; null = `validation` plus every `holdout_*` present."""

    def validate(self) -> None:
        if self.every < 0 or self.n_samples < 1 or self.batch_size < 1:
            raise ConfigError("eval.every: >= 0; eval.n_samples, eval.batch_size: >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError("eval.max_rows: >= 1 or null")


@dataclass
class LogConfig:
    """What is logged per step (to MLflow and run_dir/metrics.jsonl)."""

    every: int = 10
    """Log loss, lr, grad norm, tokens/s, MFU and memory every this many steps."""
    row_keys: bool = False
    """Debug: write each step's row keys to run_dir/row_keys/rank<r>.jsonl (data-order audits)."""

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("log.every: must be >= 1")


@dataclass
class DataConfig:
    """Which corpus split(s) the trainer samples, and in what mixture (see trainer/mixture.py)."""

    split: str | list[str] = "train"
    """Split to train on, or a list of splits mixed into one stream, e.g. [train, holdout_2020s]
    (the order does not matter). Evaluating on a split you train on measures memorisation."""
    weights: dict[str, float] | None = None
    """Mixture weights; null = every row of the split(s) in natural proportions. Keys: `source`
    (manifest `sources`; that source in every selected split), `split/source`, or `split/*`
    (each source of that split gets the weight). Most specific wins: split/source > split/* >
    source. Sources without a weight (or with 0) are not read; weights are normalised."""

    def __post_init__(self) -> None:
        self.validate()  # TrainConfig.validate does not visit this section; check on load

    def validate(self) -> None:
        names = [self.split] if isinstance(self.split, str) else list(self.split)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"data.split: a split name or a non-empty list of them, got {self.split!r}"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"data.split: {self.split!r} lists a split more than once")
        for key, w in (self.weights or {}).items():
            head, slash, tail = key.partition("/")
            if not key or (slash and not tail):
                raise ConfigError(
                    f"data.weights: bad key {key!r}; use source, split/source or split/*"
                )
            if not isinstance(w, int | float) or isinstance(w, bool) or not 0 <= w < float("inf"):
                raise ConfigError(f"data.weights.{key}: must be a finite number >= 0, got {w!r}")
            if slash and tail == "*" and head not in names:
                raise ConfigError(
                    f"data.weights: key {key!r} names split {head!r}, which is not in "
                    f"data.split {names}; valid split prefixes: {[n + '/' for n in names]}"
                )


@dataclass
class MDMConfig:
    """Options of the masked diffusion objective (ignored for ARM)."""

    eps: float = 1e-3
    """Mask probability p = (1 - eps) t + eps, t ~ U[0, 1)."""
    random_length_prob: float = 0.01
    """Probability that a micro-batch is cut to a random length in [1, seq_len]."""

    def validate(self) -> None:
        if not 0 < self.eps < 1 or not 0 <= self.random_length_prob <= 1:
            raise ConfigError("mdm.eps: in (0, 1); mdm.random_length_prob: in [0, 1]")


@dataclass
class TrainConfig:
    """One training run (ARM or MDM) on one packed corpus."""

    corpus: str = ""
    """Corpus directory built by `maskscale corpus build` (manifest.json, tokenizer.json)."""
    objective: Literal["arm", "mdm"] = "arm"
    """arm = next-token prediction (causal); mdm = masked diffusion (bidirectional)."""
    model: str = "170M"
    """Model preset name (configs/model/<name>.yaml), e.g. 6M ... 2121M or tiny-1M."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that replace the preset's. vocab_size and seq_len default to the
    corpus's; if given they must match it (else the corpus is refused)."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: Literal["fp32", "bf16"] = "bf16"
    """bf16 = DeepSpeed bf16 mixed precision (fp32 master weights); fp32 = full precision."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (0 = plain data parallel)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mdm: MDMConfig = field(default_factory=MDMConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl, config.yaml and the export go."""
    seed: int = 3407
    """Seeds model init, data order and every random draw of the objectives."""

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("corpus: required; pass corpus=DIR (a built corpus directory)")
        if not self.model:
            raise ConfigError("model: required; a preset name such as 170M or tiny-1M")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: {self.zero_stage} is not one of 0, 1, 2, 3")
        if not self.run_dir:
            raise ConfigError("run_dir: required")
        for section in (
            self.budget,
            self.optim,
            self.batch,
            self.checkpoint,
            self.eval,
            self.log,
            self.mdm,
            self.data,
            self.tracking,
        ):
            section.validate()


def apply_shortcuts(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Map CLI shortcuts onto the nested config, in place on the YAML dict ``data``.

    ``flops=C``, ``tokens=D`` and ``steps=S`` become ``budget.<key>`` and clear the other two
    budget keys coming from the YAML (exactly one may be set). Everything else is passed
    through (corpus=, objective=, model=, run_dir=, seed= are already top-level fields;
    nested keys use dots: optim.lr=1e-3). Returns the remaining overrides.
    """
    rest: list[str] = []
    for text in overrides:
        key = text.split("=", 1)[0].strip().lstrip("-")
        short = key.removeprefix("budget.")
        if short in BUDGET_KEYS and "=" in text:
            data["budget"] = {}
            rest.append(f"budget.{short}={text.split('=', 1)[1]}")
        else:
            rest.append(text)
    return rest
