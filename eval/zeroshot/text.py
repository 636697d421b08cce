"""Text in, scores out: the zero-shot model args and the scorer that takes text.

Why a module of its own: the lm-evaluation-harness model (``harness``), the local
multiple-choice runner and the temporal cloze task (``maskscale eval mc | cloze``) must turn the
same text into the same tokens and score them with the same settings, and the two direct runners
should not need the harness to do it. ``ModelArgs`` is what ``--model-args`` (or ``lm_eval
--model_args`` and ``--batch_size``) may set; ``TextScorer`` tokenises with the run's own
tokenizer (``tasks.encode_pair``: the harness's split after the EOS that starts every training
document; a continuation that tokenises to nothing scores the context's last token) and hands
the ids to ``eval.measure.likelihood.Scorer``.

Whole texts (``loglikelihood_rolling``) are scored after that EOS too: an ARM through the
Scorer's rolling windows (its first window predicts after the EOS), an MDM over disjoint
windows whose first has the EOS as context (``mdm_windows``), Monte Carlo ELBO without
guidance. With classifier-free guidance on (an MDM with cfg != 0) whole-text scores are
refused: a text without a prompt has nothing to guide, and its perplexity would pass for the
model's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from eval.measure.likelihood import MC_WEIGHTINGS, LikelihoodConfig, LikelihoodError, Scorer
from eval.measure.loading import EvalError
from eval.zeroshot.tasks import TaskError, document_ids, encode_pair

ESTIMATORS = ("mc", "chain_rule")


# ----------------------------------------------------------------------------- model args


@dataclass
class ModelArgs:
    """What ``--model-args`` (or ``lm_eval --model_args``) may set on a maskscale model."""

    path: str | None = None
    """Run directory (uses RUN/export/) or export directory."""
    checkpoint: int | None = None
    """Export this checkpoint step first (run directories only)."""
    estimator: str = "mc"
    """MDM likelihood estimator: ``mc`` (Monte Carlo ELBO) or ``chain_rule``. ARMs are exact."""
    mc_weighting: str = "fixed_count"
    """Form of ``mc``: ``fixed_count`` (LLaDA's, never an empty mask) or ``inverse_t`` (the
    1/t form of training); ``eval.measure.likelihood.LikelihoodConfig.mc_weighting``."""
    mc_samples: int = 128
    """Monte Carlo samples per continuation (the reference used 1024)."""
    cfg: float = 0.0
    """Unsupervised classifier-free guidance scale w (MDM only; 0 = off)."""
    greedy: bool = True
    """MDM ``is_greedy`` by greedy unmasking (LAMBADA-style accuracy; up to l extra forwards
    per request). False reads it off the estimator's rows for free: enough for
    multiple-choice tasks, whose metrics never use it."""
    token_budget: int | None = None
    """Tokens per forward batch; None = the Scorer's default (or batch_size * seq_len)."""
    batch_size: int | None = None
    """Rows per forward batch (the harness's --batch_size, ``auto`` = None), turned into a token
    budget of batch_size x seq_len; also the prompts per ``generate_until`` batch."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    seed: int = 0
    """Seed of the MC draws and of sampling (the same seed and requests give the same numbers)."""
    steps: int | None = None
    """MDM reverse-process steps for ``generate_until``; None = the answer length."""
    strategy: str = "low-confidence"
    """MDM unmasking for ``generate_until``: ``low-confidence`` or ``random``."""
    block_length: int | None = None
    """MDM ``generate_until`` in semi-autoregressive blocks of this many slots
    (``SamplingConfig.block_length``); None = one block. Without ``steps``, the answer length
    rounded up to a multiple of the block count."""
    max_gen_toks: int = 256
    """Answer length when a task does not set ``max_gen_toks`` (capped at half of seq_len)."""

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise EvalError(f"model arg estimator={self.estimator!r}: use one of {ESTIMATORS}")
        if self.mc_weighting not in MC_WEIGHTINGS:
            raise EvalError(
                f"model arg mc_weighting={self.mc_weighting!r}: use one of {MC_WEIGHTINGS}"
            )
        if not isinstance(self.greedy, bool):
            raise EvalError(f"model arg greedy={self.greedy!r}: must be true or false")
        if not (isinstance(self.mc_samples, int) and self.mc_samples >= 1):
            raise EvalError(f"model arg mc_samples={self.mc_samples!r}: must be an integer >= 1")
        if not (isinstance(self.cfg, int | float) and math.isfinite(self.cfg) and self.cfg >= 0):
            raise EvalError(f"model arg cfg={self.cfg!r}: must be a number >= 0")
        if self.strategy not in ("low-confidence", "random"):
            raise EvalError(f"model arg strategy={self.strategy!r}: low-confidence or random")
        for key in ("token_budget", "batch_size", "checkpoint", "steps", "max_gen_toks",
                    "block_length"):  # fmt: skip
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise EvalError(f"model arg {key}={value!r}: must be a positive integer")


def parse_model_args(text: str | dict | None) -> dict:
    """``k=v,k=v`` (or a dict) -> typed keyword args, refusing keys ModelArgs does not have."""
    from lm_eval.utils import simple_parse_args_string

    args = dict(text) if isinstance(text, dict) else simple_parse_args_string(text or "")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise EvalError(f"unknown model arg(s) {unknown}; known: {sorted(known)}")
    if "batch_size" in args:
        args["batch_size"] = batch_size_arg(args["batch_size"])
        if args["batch_size"] is None:
            args.pop("batch_size")
    if isinstance(args.get("cfg"), int):
        args["cfg"] = float(args["cfg"])
    return args


def batch_size_arg(value):
    """The harness's batch size: an int, or the lm_eval command line's string ("8", "auto",
    "auto:N"). ``auto`` -> None (the token budget rules); another string is refused, a
    non-string is left to ``ModelArgs.validate``."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text.isdigit():
        return int(text)
    if re.fullmatch(r"auto(:\d+(\.\d*)?)?", text):
        return None
    raise EvalError(
        f"batch_size={value!r}: give a positive integer (rows per forward), 'auto' or 'auto:N'"
    )


# ----------------------------------------------------------------------------- text scoring


class TextScorer:
    """A Scorer that takes text: the run's tokenizer and the harness's pair split in front."""

    def __init__(self, loaded, args: ModelArgs):
        self.loaded = loaded
        self.args = args
        self.scorer = Scorer.from_loaded(loaded, likelihood_config(loaded, args))
        self._rolling_scorer: Scorer | None = None

    @property
    def family(self) -> str:
        return self.loaded.family

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance shapes the scores (an MDM with cfg != 0)."""
        return self.family == "mdm" and self.args.cfg != 0

    def encode(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Token pairs, EOS first (``tasks.encode_pair``)."""
        tok, eos = self.loaded.tokenizer, self.loaded.eos_id
        try:
            return [encode_pair(tok, context, continuation, eos) for context, continuation in pairs]
        except TaskError as e:
            raise EvalError(str(e)) from None

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False) -> list:
        """One ``eval.measure.likelihood.LLResult`` per (context, continuation) text pair."""
        try:
            return self.scorer.loglikelihood(self.encode(pairs), progress=progress)
        except LikelihoodError as e:
            raise EvalError(str(e)) from None

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) per pair: the ``eval.zeroshot.tasks.ScoreFn`` shape."""
        return [(r.logprob, r.is_greedy) for r in self.loglikelihood(pairs, progress=True)]

    def loglikelihood_rolling(self, text: str) -> float:
        """Log-likelihood of a whole text after the EOS that precedes every document (the EOS is
        context, never scored; an empty text scores 0, as in the harness). Refused under CFG."""
        if self.guided:
            raise EvalError(
                f"loglikelihood_rolling with cfg={self.args.cfg:g}: a whole text has no prompt "
                "to guide, and its word/byte perplexity would not be the model's; run "
                "perplexity tasks with cfg=0"
            )
        ids = document_ids(self.loaded.tokenizer, text, self.loaded.eos_id)[1:]
        if not ids:
            return 0.0
        try:
            if self.family == "arm":  # the Scorer's first window predicts after its prefix EOS
                return self.scorer.loglikelihood_rolling(ids).logprob
            windows = mdm_windows(ids, self.loaded.eos_id, self.loaded.seq_len)
            return math.fsum(r.logprob for r in self._rolling().loglikelihood(windows))
        except LikelihoodError as e:
            raise EvalError(str(e)) from None

    def _rolling(self) -> Scorer:
        """The MDM's whole-text scorer: the 1/t Monte Carlo ELBO of training and ``eval ppl``
        (as ``Scorer.loglikelihood_rolling``), no guidance, no greedy unmasking."""
        if self._rolling_scorer is None:
            cfg = dataclasses.replace(self.scorer.cfg, estimator="mc", mc_weighting="inverse_t",
                                      cfg_scale=0.0, greedy=False)  # fmt: skip
            self._rolling_scorer = Scorer.from_loaded(self.loaded, cfg)
        return self._rolling_scorer


def mdm_windows(ids: list[int], eos_id: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint MDM windows scoring every token once: the first after the document's EOS
    (``[eos] + seq_len - 1`` tokens), the others alone (seq_len tokens, empty context), like
    the rows of the packed corpus a document runs across."""
    first = seq_len - 1
    rest = [([], ids[i : i + seq_len]) for i in range(first, len(ids), seq_len)]
    return [([eos_id], ids[:first]), *rest]


def likelihood_config(loaded, args: ModelArgs) -> LikelihoodConfig:
    """The Scorer settings of a set of model args (token budget from batch_size if not given)."""
    budget = args.token_budget
    if budget is None and args.batch_size is not None:
        budget = args.batch_size * loaded.seq_len
    kw = {
        "estimator": args.estimator,
        "mc_weighting": args.mc_weighting,
        "mc_samples": args.mc_samples,
        "cfg_scale": args.cfg if loaded.family == "mdm" else 0.0,
        "greedy": args.greedy,
        "seed": args.seed,
    }
    if budget is not None:
        kw["token_budget"] = budget
    return LikelihoodConfig(**kw)
