"""Log-likelihood of a continuation given a context: exact for ARMs, estimated for MDMs.

Everything in ``eval/`` that scores text (perplexity, zero-shot tasks, the harness models) goes
through ``Scorer``, on token ids (tokenising is the caller's job). A request is a pair
(context x, continuation y = y_0 .. y_{l-1}); the result is ``LLResult(logprob, is_greedy,
stderr, n_tokens)``.

ARM (causal model), exact: ``log p(y | x) = sum_j log p(y_j | x, y_<j)`` from one forward of
``x + y`` (the output at position m + j - 1 predicts y_j, m = len(x)). ``is_greedy``: every y_j
is the argmax of its prediction, i.e. greedy decoding reproduces y.

MDM (bidirectional model), two estimators (paper-notes.md, "Evaluation protocol"); their rows
and weights live in ``plans``, whose docstring derives what each Monte Carlo form is unbiased for.

* Monte Carlo ELBO (``estimator="mc"``), n = ``mc_samples`` samples per request, only
  *continuation* tokens masked (the context never is), in one of two forms
  (``mc_weighting``):

  - ``fixed_count`` (default; LLaDA's): sample i masks exactly k_i continuation tokens, a
    uniformly random set, with k_i uniform on {1, .., l} and stratified over the n samples,
    and scores ``(l / k_i) sum over masked j of log p_theta(y_j | x, noisy y)``. No sample
    masks nothing, so none scores 0; at l = 1 it is exact. Unbiased for the ELBO with eps = 0.
  - ``inverse_t`` (the training objective's draws): a stratified time t_i = (u + i/n) mod 1,
    each continuation token masked independently with p_i = (1 - eps) t_i + eps (eps: the
    run's ``mdm.eps``, see ``LikelihoodConfig.eps``), score ``sum over masked j / p_i``. A
    sample that masks nothing scores 0 (no row is run for it): at l = 1 and n = 1 half of all
    requests get 0.0, which wins any multiple-choice comparison. Unbiased for the run's
    eps-ELBO (what validation reports), within O(eps) of the other form's target.

  ``mean_i s_i`` estimates the absorbing diffusion ELBO, a lower bound on ``log p(y | x)``.
  ``stderr = std(s) / sqrt(n)``: it treats the strata as independent draws, so it is
  conservative (stratification only lowers the true error); NaN for n = 1.
* Chain rule (``estimator="chain_rule"``): l rows; row i shows x and y_<i, masks y_i .. y_{l-1}
  and scores ``log p_theta(y_i | x, y_<i, l - i masks)``; the sum is a left-to-right
  factorisation of the model's conditional: deterministic (stderr 0), costs l rows.

``is_greedy`` for an MDM, ``greedy=True`` (default): greedy unmasking, LAMBADA style. Start
with all of y masked; repeatedly reveal the single most confident masked position (highest
max-probability; leftmost on ties) as its argmax; greedy iff the result equals y. Revealed
tokens are never re-masked, so the first wrong reveal decides False and the request stops:
at most l (usually far fewer) one-row forwards, batched across requests. ``greedy=False``
reads it off the estimator's own rows at no extra cost: chain rule - every y_i is the argmax of
its row, which is exactly left-to-right greedy decoding reproducing y; MC - every y_j was masked
in some sample and was the argmax wherever it was masked (a heuristic proxy).

Unsupervised classifier-free guidance (MDM only, ``cfg_scale = w``): the unconditional row is
the same row with every context token replaced by the mask id; both rows run in the same
forward and the scored logits are ``uncond + (w + 1) (cond - uncond)``, combined on the raw
logits before the log-softmax (as the reference does); it applies to both estimators and to
greedy unmasking. w = 0 is no guidance (no extra rows). A causal model rejects w != 0.

Lengths: a request needs ``len(y) <= seq_len``; the context is cut from the left so that the
row fits (m + l <= seq_len for an MDM, <= seq_len + 1 for an ARM whose last token is never an
input). An ARM needs at least one context token: an empty context becomes ``[prefix_id]`` (the
EOS id when built ``from_loaded``), as lm-evaluation-harness does.

Reproducibility: a request's noise comes from a generator seeded with a hash of (seed, its
tokens after the cut), never from its place in the call; rows are packed by ``packing``
with per-row lengths, so the same request scores the same whatever shares its batches (up to
float rounding of different batch shapes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from eval.measure.packing import BlockScores, RowBlock, run_blocks
from eval.measure.plans import Plan, chain_plan, exact_plan, fixed_count_plan, inverse_t_plan
from pipeline.configlib import ConfigError
from trainer.config import MDMConfig

ESTIMATORS = ("mc", "chain_rule")
MC_WEIGHTINGS = ("fixed_count", "inverse_t")
CHUNK_BATCHES = 64
"""Requests are processed in chunks of about this many full batches of rows, so memory stays
bounded on calls with many thousands of requests."""


class LikelihoodError(ValueError):
    """A request cannot be scored; the message names the request and what to do."""


@dataclass
class LikelihoodConfig:
    """How likelihoods are computed. An ARM is always exact (estimator settings unused)."""

    estimator: str = "mc"
    """MDM estimator: ``mc`` (Monte Carlo ELBO) or ``chain_rule`` (l rows per l tokens)."""
    mc_weighting: str = "fixed_count"
    """Form of ``mc``: ``fixed_count`` (exactly k ~ U{1..l} continuation tokens masked, weight
    l/k; never an empty mask) or ``inverse_t`` (each masked with p = (1 - eps) t + eps, weight
    1/p; the training objective's draws). ``loglikelihood_rolling`` always uses inverse_t."""
    mc_samples: int = 128
    """Monte Carlo samples per request (stratified times); also used by MDM rolling windows."""
    cfg_scale: float = 0.0
    """Unsupervised classifier-free guidance scale w (MDM only); 0 = no guidance."""
    greedy: bool = True
    """MDM ``is_greedy`` by greedy unmasking (up to l extra forwards per request). False: read
    it off the estimator's rows (see the module docstring)."""
    token_budget: int = 16384
    """Tokens per forward pass: rows x padded length (CFG twins count)."""
    seed: int = 0
    """Seed of the Monte Carlo draws (hashed with each request's tokens)."""
    eps: float | None = None
    """Smallest mask probability of ``inverse_t``: p = (1 - eps) t + eps. None: the run's
    ``mdm.eps`` (``Scorer.from_loaded``), or the trainer's default for a bare model."""

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(
                f"likelihood.estimator: {self.estimator!r} is not one of {list(ESTIMATORS)}"
            )
        if self.mc_weighting not in MC_WEIGHTINGS:
            raise ConfigError(
                f"likelihood.mc_weighting: {self.mc_weighting!r} is not one of "
                f"{list(MC_WEIGHTINGS)}"
            )
        for key in ("mc_samples", "token_budget"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"likelihood.{key}: must be a positive integer, got {value!r}")
        if not math.isfinite(self.cfg_scale):
            raise ConfigError(f"likelihood.cfg_scale: must be finite, got {self.cfg_scale!r}")
        eps = self.eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float)):
            raise ConfigError(f"likelihood.eps: expected a number or None, got {eps!r}")
        if eps is not None and not 0 < eps <= 1:
            raise ConfigError(f"likelihood.eps: must be in (0, 1], got {eps!r}")
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"likelihood.greedy: expected true/false, got {self.greedy!r}")


@dataclass(frozen=True)
class LLResult:
    """Score of one request."""

    logprob: float
    """log p(continuation | context) in nats: exact (ARM, chain rule) or an ELBO estimate (MC)."""
    is_greedy: bool
    """Whether greedy decoding reproduces the continuation (see the module docstring)."""
    stderr: float
    """Standard error of ``logprob`` (0 when exact or deterministic, NaN for one MC sample)."""
    n_tokens: int
    """Tokens scored (the continuation's length)."""


@dataclass(frozen=True)
class _Request:
    """A validated request after the context cut, with the key of its noise draws."""

    context: list[int]
    continuation: list[int]
    key: int


def request_key(seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    """63-bit seed of a request's noise: a hash of the seed and its tokens (not its index)."""
    h = hashlib.blake2b(digest_size=8)
    for part in (np.array([seed, len(context)]), np.asarray(context), np.asarray(continuation)):
        h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


class Scorer:
    """Scores requests with one model; see the module docstring for the estimators.

    ``model``: a ``trainer.model.Transformer`` (eval mode, on its device and dtype).
    ``prefix_id``: context used when an ARM request has none (and before ARM rolling text).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        causal: bool,
        mask_id: int,
        seq_len: int,
        cfg: LikelihoodConfig | None = None,
        device: torch.device | str | None = None,
        prefix_id: int | None = None,
    ) -> None:
        cfg = cfg if cfg is not None else LikelihoodConfig()
        if cfg.eps is None:  # a copy: the caller's config is left as it was
            cfg = dataclasses.replace(cfg, eps=MDMConfig.eps)
        self.cfg = cfg
        self.cfg.validate()
        self.model, self.causal, self.mask_id = model, bool(causal), int(mask_id)
        self.vocab_size = int(model.head.out_features)
        if getattr(model, "causal", self.causal) != self.causal:
            raise ConfigError(f"Scorer(causal={causal}) does not match the model's attention")
        model_len = getattr(getattr(model, "cfg", None), "seq_len", seq_len)
        if not 1 <= seq_len <= model_len:
            raise ConfigError(f"seq_len={seq_len} must lie in [1, model seq_len={model_len}]")
        self.seq_len = int(seq_len)
        if self.causal and self.cfg.cfg_scale != 0:
            raise ConfigError(
                f"cfg_scale={self.cfg.cfg_scale}: classifier-free guidance is defined for masked "
                "diffusion models only; use cfg_scale=0 with an autoregressive (causal) model"
            )
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.prefix_id = prefix_id

    @classmethod
    def from_loaded(cls, loaded, cfg: LikelihoodConfig | None = None) -> Scorer:
        """Scorer for an ``eval.measure.loading.LoadedModel`` (duck-typed: model, causal, mask_id,
        seq_len, device, eos_id, mdm_eps). An unset ``cfg.eps`` becomes the run's ``mdm_eps``."""
        cfg = cfg if cfg is not None else LikelihoodConfig()
        run_eps = getattr(loaded, "mdm_eps", None)
        if cfg.eps is None and run_eps is not None:
            cfg = dataclasses.replace(cfg, eps=float(run_eps))
        return cls(
            loaded.model,
            causal=loaded.causal,
            mask_id=loaded.mask_id,
            seq_len=loaded.seq_len,
            cfg=cfg,
            device=loaded.device,
            prefix_id=getattr(loaded, "eos_id", None),
        )

    # ------------------------------------------------------------------ public API

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False
    ) -> list[LLResult]:
        """Score (context ids, continuation ids) pairs, in order."""
        estimator = {"mc": self.cfg.mc_weighting, "chain_rule": "chain_rule"}[self.cfg.estimator]
        estimator = "exact" if self.causal else estimator
        return self._score(requests, estimator, self.cfg.cfg_scale, self.cfg.greedy, progress)

    def loglikelihood_rolling(self, tokens: Sequence[int], progress: bool = False) -> LLResult:
        """Log-likelihood of a whole token sequence, any length, scored in windows.

        ARM (exact, lm-evaluation-harness's scheme): every token is predicted exactly once.
        The first window predicts tokens[:seq_len] after ``[prefix_id]`` (without a prefix id
        the first token is only context and is not scored); each later window predicts the
        next seq_len tokens (fewer at the end), preceded by as many earlier tokens as fit in
        one seq_len-token input (one for full windows, more for the last, shorter one).
        MDM: MC ELBO in the ``inverse_t`` form whatever ``mc_weighting`` says (``mc_samples``,
        ``eps``, ``seed``; no CFG, no greedy unmasking) over disjoint windows of seq_len tokens,
        each scored alone (empty context), as the validation ELBO does; standard errors add in
        quadrature.
        """
        toks = _as_ids(tokens, "rolling tokens", self.vocab_size)
        if not toks:
            raise LikelihoodError("loglikelihood_rolling: empty token sequence; nothing to score")
        if self.causal:
            requests = _arm_windows(toks, self.seq_len, self.prefix_id)
            results = self._score(requests, "exact", 0.0, False, progress)
        else:
            n = self.seq_len
            requests = [([], toks[i : i + n]) for i in range(0, len(toks), n)]
            results = self._score(requests, "inverse_t", 0.0, False, progress)
        return LLResult(
            logprob=math.fsum(r.logprob for r in results),
            is_greedy=all(r.is_greedy for r in results),
            stderr=math.sqrt(math.fsum(r.stderr**2 for r in results)),
            n_tokens=sum(r.n_tokens for r in results),
        )

    # ------------------------------------------------------------------ internals

    def _score(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        estimator: str,
        cfg_scale: float,
        greedy: bool,
        progress: bool,
    ) -> list[LLResult]:
        """Score with ``estimator`` ("exact", "chain_rule" or an MC form of ``MC_WEIGHTINGS``);
        rows of many requests share forward passes. "chain_rule" also runs on a causal model
        (then it reads each token's prediction at the position before it, like "exact")."""
        if estimator in MC_WEIGHTINGS and self.causal:
            raise ConfigError("the Monte Carlo estimator needs a masked diffusion model")
        prepared = [self._prepare(i, req) for i, req in enumerate(requests)]
        rows = {
            "exact": lambda r: 1,
            "chain_rule": lambda r: len(r.continuation),
            "fixed_count": lambda r: self.cfg.mc_samples,
            "inverse_t": lambda r: self.cfg.mc_samples,
        }[estimator]
        order = sorted(
            range(len(prepared)),
            key=lambda i: (-len(prepared[i].context) - len(prepared[i].continuation), i),
        )
        results: list[LLResult | None] = [None] * len(prepared)
        bar = tqdm(total=len(prepared), desc="loglikelihood", unit="req", disable=not progress)
        budget = CHUNK_BATCHES * self.cfg.token_budget
        start = 0
        while start < len(order):
            stop, used = start, 0
            while stop < len(order) and (stop == start or used < budget):
                r = prepared[order[stop]]
                used += rows(r) * (len(r.context) + len(r.continuation))
                stop += 1
            chunk = [prepared[i] for i in order[start:stop]]
            scored = self._score_chunk(chunk, estimator, cfg_scale, greedy)
            for i, res in zip(order[start:stop], scored, strict=True):
                results[i] = res
            bar.update(stop - start)
            start = stop
        bar.close()
        return results  # type: ignore[return-value]

    def _score_chunk(
        self, chunk: list[_Request], estimator: str, cfg_scale: float, greedy: bool
    ) -> list[LLResult]:
        plans = [self._plan(estimator, r) for r in chunk]
        scores = self._run([p.block for p in plans], cfg_scale)
        unmasked = None
        if greedy and not self.causal:
            unmasked = self._greedy_unmask(chunk, cfg_scale)
        out = []
        for i, (plan, sc) in enumerate(zip(plans, scores, strict=True)):
            n_tokens = len(chunk[i].continuation)
            is_greedy = unmasked[i] if unmasked is not None else _argmax_greedy(plan, sc, n_tokens)
            mean, std = plan.aggregate(sc.logp)
            stderr = std / math.sqrt(plan.n_samples) if estimator in MC_WEIGHTINGS else 0.0
            out.append(LLResult(mean, bool(is_greedy), stderr, n_tokens))
        return out

    def _run(self, blocks: list[RowBlock], cfg_scale: float) -> list[BlockScores]:
        return run_blocks(
            self.model,
            blocks,
            token_budget=self.cfg.token_budget,
            mask_id=self.mask_id,
            device=self.device,
            cfg_scale=cfg_scale,
        )

    def _prepare(self, index: int, request: tuple[Sequence[int], Sequence[int]]) -> _Request:
        """Validate request ``index``, cut its context from the left, derive its noise key."""
        try:
            context, continuation = request
        except (TypeError, ValueError):
            raise LikelihoodError(
                f"request {index}: expected a (context ids, continuation ids) pair"
            ) from None
        ctx = _as_ids(context, f"request {index}: context", self.vocab_size)
        cont = _as_ids(continuation, f"request {index}: continuation", self.vocab_size)
        if not cont:
            raise LikelihoodError(f"request {index}: empty continuation; nothing to score")
        if len(cont) > self.seq_len:
            raise LikelihoodError(
                f"request {index}: continuation of {len(cont)} tokens exceeds seq_len="
                f"{self.seq_len}; shorten it or score it with loglikelihood_rolling"
            )
        if self.causal and not ctx:
            if self.prefix_id is None:
                raise LikelihoodError(
                    f"request {index}: an autoregressive model needs at least one context token; "
                    "prepend the EOS id (or build the Scorer with prefix_id)"
                )
            ctx = [int(self.prefix_id)]
        keep = self.seq_len + int(self.causal) - len(cont)
        ctx = ctx[len(ctx) - keep :] if len(ctx) > keep else ctx
        return _Request(ctx, cont, request_key(self.cfg.seed, ctx, cont))

    def _plan(self, estimator: str, req: _Request) -> Plan:
        """The rows and weights of ``estimator`` for one request (``plans``)."""
        ctx, cont, n = req.context, req.continuation, self.cfg.mc_samples
        if estimator == "exact":
            return exact_plan(ctx, cont)
        if estimator == "chain_rule":
            return chain_plan(ctx, cont, self.mask_id, self.causal)
        if estimator == "fixed_count":
            return fixed_count_plan(ctx, cont, req.key, n, self.mask_id)
        return inverse_t_plan(ctx, cont, req.key, n, self.cfg.eps, self.mask_id)

    def _greedy_unmask(self, chunk: list[_Request], cfg_scale: float) -> list[bool]:
        """Greedy unmasking of every request's continuation; all requests step together."""
        current = [torch.tensor(r.context + [self.mask_id] * len(r.continuation)) for r in chunk]
        hidden = [list(range(len(r.continuation))) for r in chunk]  # still-masked offsets
        result: list[bool | None] = [None] * len(chunk)
        active = list(range(len(chunk)))
        while active:
            blocks = []
            for i in active:
                m, offs = len(chunk[i].context), torch.tensor(hidden[i])
                target = torch.tensor(chunk[i].continuation)[offs]
                rows = torch.zeros(len(offs), dtype=torch.long)
                blocks.append(RowBlock(current[i][None].clone(), m, rows, m + offs, target))
            still = []
            for i, block, sc in zip(active, blocks, self._run(blocks, cfg_scale), strict=True):
                best = int(sc.max_logp.argmax())  # most confident masked position
                if int(sc.argmax[best]) != int(block.target[best]):
                    result[i] = False
                    continue
                current[i][int(block.pos[best])] = int(block.target[best])
                del hidden[i][best]
                if hidden[i]:
                    still.append(i)
                else:
                    result[i] = True
            active = still
        return result  # type: ignore[return-value]


def _as_ids(tokens: Sequence[int], what: str, vocab_size: int) -> list[int]:
    """A list of python ints in [0, vocab_size), or a LikelihoodError naming ``what``."""
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError):
        raise LikelihoodError(f"{what}: expected a list of token ids") from None
    if arr.size == 0:
        return []
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise LikelihoodError(f"{what}: expected a flat list of integer token ids")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise LikelihoodError(
            f"{what}: token id {low if low < 0 else high} outside [0, {vocab_size}); "
            "was the text encoded with this model's tokenizer?"
        )
    return arr.astype(np.int64).tolist()


def _arm_windows(
    tokens: list[int], seq_len: int, prefix_id: int | None
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows predicting every token once (see loglikelihood_rolling)."""
    if prefix_id is None:
        if len(tokens) < 2:
            raise LikelihoodError(
                "loglikelihood_rolling: one token and no prefix id leaves nothing to score; "
                "build the Scorer with prefix_id (e.g. the EOS id)"
            )
        windows, pos = [(tokens[:1], tokens[1 : seq_len + 1])], min(len(tokens), seq_len + 1)
    else:
        windows, pos = [([prefix_id], tokens[:seq_len])], min(len(tokens), seq_len)
    while pos < len(tokens):
        end = min(pos + seq_len, len(tokens))
        windows.append((tokens[max(0, end - seq_len - 1) : pos], tokens[pos:end]))
        pos = end
    return windows


def _argmax_greedy(plan: Plan, scores: BlockScores, n_tokens: int) -> bool:
    """is_greedy from the estimator's rows: every continuation token is scored at least once
    and is the argmax wherever it is scored."""
    block = plan.block
    if not bool((scores.argmax == block.target).all()):
        return False
    return torch.unique(block.pos).numel() == n_tokens  # one position per continuation token
