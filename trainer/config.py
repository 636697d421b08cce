"""The training run's configuration: one tree of dataclasses, paper recipe by default.

A run is fully described by a ``TrainConfig``: which corpus, which objective (ARM or MDM),
which model size, how much compute, and the optimisation recipe. The defaults reproduce the
recipe of Nie et al. (2025) (AdamW 2e-4, betas 0.9/0.95, wd 0.1, clip 1.0, warmup
max(1% of steps, 100) then cosine to 2e-5, global batch 256 rows, bf16, seed 3407), so a
YAML file only states what differs; precision defaults to ``auto``, which is the paper's bf16 on
a GPU and fp32 on a CPU. The resolved tree is saved with every checkpoint, into
``run_dir/config.yaml`` and as MLflow params, so any run can be re-created from its record.

Loaded with :func:`pipeline.configlib.load_config` (YAML + ``key=value`` overrides); the CLI
adds shortcuts (``flops=``, ``tokens=``, ``steps=``) through :func:`apply_shortcuts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.configlib import ConfigError
from trainer.sft_config import SFTConfig
from trainer.tracking import TrackingConfig

BUDGET_KEYS = ("flops", "tokens", "steps")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


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
    fused: bool | Literal["auto"] = "auto"
    """torch AdamW's fused kernel (one launch for every parameter's update instead of a few
    per parameter): auto = on when training on CUDA, off on CPU; true/false force it (torch
    also has a CPU fused kernel). Resolved before the run is recorded, like precision: config.yaml
    and MLflow hold true or false. Not part of the schedule record: a resume may change it."""

    def validate(self) -> None:
        if self.fused not in ("auto", True, False):
            raise ConfigError(f"optim.fused: true, false or auto, got {self.fused!r}")
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
    reschedule: bool = False
    """On resume, adopt a changed budget or optimiser recipe (steps, optim.lr, lr_min, warmup,
    betas, eps, weight_decay, grad_clip; trainer/resume.py): the LR schedule is recomputed for
    the new budget from the resumed step, AdamW gets the new settings, and the change is recorded
    (log, checkpoint meta, MLflow params, summary). False: such a resume is refused, naming
    each changed key with its old and new value (the checkpoint would restore the old ones)."""
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
    t_sampling: Literal["iid", "stratified"] = "iid"
    """iid = each row draws its own t (the paper's objective); stratified = the rows of a
    micro-batch share one random offset and cover [0, 1) one per 1/B stratum (MDLM's
    low-discrepancy sampler: same expected loss, less variance; trainer/objectives.py,
    measurements in benchmarks/mdm_plateau.md). Pretraining only."""
    loss_weighting: Literal["elbo", "masked_mean", "row_mean"] = "elbo"
    """elbo = the paper's objective: each masked token's CE weighted 1/p, per row (an unbiased
    estimate of the ELBO, the number validation reports); masked_mean = the plain mean CE over
    the micro-batch's masked tokens (BERT-style; NOT the ELBO, biased towards heavily masked
    rows, but without the 1/p weights' variance, which keeps tiny CPU models on the unigram
    plateau for longer: benchmarks/mdm_plateau.md); row_mean = per row the mean CE over its
    masked tokens, then the mean over rows: the ELBO's 1/p replaced by 1/(masked count), its
    sample estimate, so every t keeps the ELBO's weight while a lightly masked row can no
    longer outweigh the batch. Validation is the ELBO in every case."""

    def validate(self) -> None:
        if not 0 < self.eps < 1 or not 0 <= self.random_length_prob <= 1:
            raise ConfigError("mdm.eps: in (0, 1); mdm.random_length_prob: in [0, 1]")
        if self.t_sampling not in ("iid", "stratified"):
            raise ConfigError(f"mdm.t_sampling: iid or stratified, got {self.t_sampling!r}")
        if self.loss_weighting not in ("elbo", "masked_mean", "row_mean"):
            raise ConfigError(
                f"mdm.loss_weighting: elbo, masked_mean or row_mean, got {self.loss_weighting!r}"
            )


@dataclass
class CommConfig:
    """DeepSpeed ZeRO communication settings (matter only with several processes).

    ``None`` means "sized from the model", as DeepSpeed's ``auto`` does in its Hugging Face
    integration: buckets grow with d_model^2 (the size of one attention weight matrix), so a
    small model does not reserve gigabytes of buffers and a large one sends large messages.
    ``allgather_bucket_size`` is not exposed: with torch >= 1.13 DeepSpeed gathers each flat
    ZeRO-1/2 parameter group in one ``all_gather_into_tensor`` call and ignores it.
    """

    overlap_comm: bool | None = None
    """Reduce gradients while the backward pass still runs (hides communication behind compute).
    None = on with several processes, off with one: its extra bucket buffers (about 4.5 x
    reduce_bucket_size elements at ZeRO-1/2) buy nothing when there is nothing to communicate."""
    contiguous_gradients: bool = True
    """Copy each gradient into one preallocated flat buffer as it is produced: no memory
    fragmentation at 1B+ parameters, one contiguous region per reduction (DeepSpeed's default)."""
    reduce_bucket_size: int | None = None
    """Elements per gradient reduce(-scatter). None = d_model^2: few enough collectives to stay
    bandwidth-bound, small enough to start reducing early in the backward pass and to keep the
    overlap buffers small (DeepSpeed's own default, 5e8, reserves GBs for any model)."""
    stage3_prefetch_bucket_size: int | None = None
    """ZeRO-3: parameter elements fetched ahead of use. None = 0.9 d_model^2 (just under one
    reduce bucket, DeepSpeed's auto rule), i.e. about one block's matrices ahead of compute."""
    stage3_param_persistence_threshold: int | None = None
    """ZeRO-3: parameters smaller than this stay whole on every rank. None = 10 d_model: keeps
    the RMSNorm weights (d_model elements each) unpartitioned; gathering them would cost one
    collective latency each for a negligible memory saving."""
    stage3_max_live_parameters: int = 1_000_000_000
    """ZeRO-3: most gathered parameter elements held at once before release (DeepSpeed's
    default, 2 GB in bf16: room for prefetching at 1-2B; lower it only when memory-bound)."""

    def validate(self) -> None:
        for key in (
            "reduce_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold",
            "stage3_max_live_parameters",
        ):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(
                    f"comm.{key}: a positive number of elements or null (sized from d_model), "
                    f"got {value!r}"
                )

    def zero_settings(self, stage: int, d_model: int | None, world_size: int) -> dict[str, Any]:
        """The ``zero_optimization`` entries for ``stage``; d_model None keeps DeepSpeed's
        defaults for the auto-sized ones."""
        if stage == 0:
            return {}
        overlap = world_size > 1 if self.overlap_comm is None else self.overlap_comm
        out: dict[str, Any] = {
            "overlap_comm": overlap,
            "contiguous_gradients": self.contiguous_gradients,
        }
        auto = {
            "reduce_bucket_size": (self.reduce_bucket_size, 1.0, 2),
            "stage3_prefetch_bucket_size": (self.stage3_prefetch_bucket_size, 0.9, 2),
            "stage3_param_persistence_threshold": (self.stage3_param_persistence_threshold, 10, 1),
        }
        for key, (value, factor, power) in auto.items():
            if stage < 3 and key.startswith("stage3_"):
                continue
            if value is None and d_model is not None:
                value = int(factor * d_model**power)
            if value is not None:
                out[key] = value
        if stage == 3:
            out["stage3_max_live_parameters"] = self.stage3_max_live_parameters
        return out


@dataclass
class TrainConfig:
    """One training run (ARM or MDM) on one packed corpus."""

    corpus: str = ""
    """Corpus directory built by `maskscale corpus build` (manifest.json, tokenizer.json).
    Not needed with task=sft (tokenizer and model come from `init`)."""
    task: Literal["pretrain", "sft"] = "pretrain"
    """pretrain = train on `corpus` from scratch; sft = fine-tune `init` on `sft.data`
    (prompt/answer JSONL, trainer/sft.py)."""
    init: str = ""
    """task=sft: the model to start from: a run directory, one of its checkpoints or an
    export directory (weights, model config and tokenizer come from it). Any task:
    ``hf:DIR``, a local Hugging Face Llama directory (trainer/hf.py); pretraining checks its
    shapes against `model` / `model_overrides` and its tokenizer against the corpus's."""
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
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 = DeepSpeed bf16 mixed precision (fp32 master weights, fp32 gradient accumulation);
    fp32 = full precision; auto = bf16 on a GPU that supports it, else fp32 (bf16 on a CPU is
    several times slower). Resolved before the run is recorded: config.yaml, checkpoints and
    MLflow hold fp32 or bf16 (trainer/precision.py)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (0 = plain data parallel). Stage 3 builds the model directly
    partitioned (``deepspeed.zero.Init``), so a model larger than one host's memory can start."""
    comm: CommConfig = field(default_factory=CommConfig)
    engine: Literal["deepspeed", "plain"] = "deepspeed"
    """deepspeed = DeepSpeed's engine at every zero_stage; plain = one process with a torch
    AdamW and no ZeRO bookkeeping (trainer/engine.py: PlainEngine): needs zero_stage=0 and one
    process; bf16 there is torch.autocast over fp32 weights (fp32 gradients and Adam states).
    Meant for one GPU, where DeepSpeed's stage-0 bf16 path runs its BF16_Optimizer (an fp32
    copy of the weights and a gradient buffer beside the module's). Checkpoints keep the
    layout the export reads; a run resumes only with the engine that wrote it."""
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """Which scaled-dot-product-attention kernel every attention call may use: auto = torch's
    choice (flash, then memory-efficient, then cuDNN/math, as the inputs allow); flash, cudnn,
    efficient = only that CUDA kernel (flash and cudnn need bf16); math = the unfused
    reference (any device). A kernel the device or precision cannot run is refused when the
    model is built, never replaced silently (trainer/model.py: attention_backends)."""
    activation_checkpointing: bool | int = False
    """Recompute block activations in the backward pass instead of storing them: false = off,
    true = every block, K = every K-th block (trades ~1/3 more compute per checkpointed block
    for its activation memory; for 1-2B models at micro-batch 8+)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each Transformer block (fuses RMSNorm, RoPE, SwiGLU; trainer/compiling.py).
    auto = on for CUDA, off on CPU: meant as "on where measured faster"; CPU is measured
    slower to start (about 30 s of compiling), the CUDA default is not yet measured here
    (benchmarks/trainer_bench.py --compile-compare measures it)."""
    loss_chunk: int = 4096
    """Tokens per chunk of the output head + cross-entropy (trainer/losses.py); 0 = plain (all
    logits at once). 4096 x 32k vocab = 0.5 GiB of fp32 logits at a time, against ~7 GiB of
    logits, fp32 copies and gradients for the paper's 8 x 2048-token micro-batch."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mdm: MDMConfig = field(default_factory=MDMConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl, config.yaml and the export go."""
    seed: int = 3407
    """Seeds model init, data order and every random draw of the objectives."""

    def validate(self) -> None:
        if self.task == "sft":
            self.validate_sft()
        elif not self.corpus:
            raise ConfigError("corpus: required; pass corpus=DIR (a built corpus directory)")
        elif self.init and not self.init.startswith("hf:"):
            raise ConfigError(
                f"init={self.init}: pretraining starts from scratch or from a Hugging Face "
                "directory (init=hf:DIR); to continue a maskscale run use its run_dir "
                "(resume) or task=sft"
            )
        if not self.model:
            raise ConfigError("model: required; a preset name such as 170M or tiny-1M")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: {self.zero_stage} is not one of 0, 1, 2, 3")
        if self.engine not in ("deepspeed", "plain"):
            raise ConfigError(f"engine: deepspeed or plain, got {self.engine!r}")
        if self.engine == "plain" and self.zero_stage != 0:
            raise ConfigError(
                f"engine=plain has no ZeRO partitioning but zero_stage={self.zero_stage}; set "
                "zero_stage=0 or engine=deepspeed"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend: one of {list(ATTENTION_BACKENDS)}, got "
                f"{self.attention_backend!r}"
            )
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and (not isinstance(ac, int) or ac < 1):
            raise ConfigError(
                f"activation_checkpointing: false, true or a block interval K >= 1, got {ac!r}"
            )
        if self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk: >= 0 tokens (0 = plain), got {self.loss_chunk}")
        if not self.run_dir:
            raise ConfigError("run_dir: required")
        budget = [] if self.task == "sft" and self.sft.epochs is not None else [self.budget]
        for section in (
            *budget,
            self.optim,
            self.batch,
            self.checkpoint,
            self.eval,
            self.log,
            self.mdm,
            self.data,
            self.tracking,
            self.comm,
        ):
            section.validate()

    def validate_sft(self) -> None:
        if not self.init:
            raise ConfigError("init: required with task=sft; pass init=RUN_DIR (or an export)")
        self.sft.validate()
        given = [k for k in BUDGET_KEYS if getattr(self.budget, k) is not None]
        if self.sft.epochs is not None and given:
            raise ConfigError(
                f"sft.epochs={self.sft.epochs} and budget.{given[0]} both set the length of "
                "the run; keep one"
            )
        if self.mdm.t_sampling != "iid":
            raise ConfigError("mdm.t_sampling: only iid is implemented for task=sft; drop it")
        if self.mdm.loss_weighting == "row_mean":
            raise ConfigError(
                "mdm.loss_weighting: task=sft implements elbo and masked_mean; drop row_mean"
            )
        if self.corpus:
            raise ConfigError(
                "corpus: not used with task=sft (validation holds out part of sft.data or "
                "reads sft.validation=FILE); drop corpus="
            )


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
