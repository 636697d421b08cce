"""TEMPORARY stand-in for eval/likelihood.py (owned by the eval-core engineer).

TEMPORARY: delete this file once the ``eval-core`` branch (likelihood.py) is merged;
``eval/harness.py`` imports the real module first and falls back to this one only while it does
not exist. It implements the agreed interfaces (notes/eval-interfaces.md) in
the plainest way - one request at a time, no packing, no token budget - so the harness, mc and
cloze commands can be built and tested meanwhile. Nothing here is meant to be kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LikelihoodConfig:
    """TEMPORARY (eval.likelihood.LikelihoodConfig)."""

    estimator: str = "mc"
    mc_samples: int = 128
    cfg_scale: float = 0.0
    token_budget: int = 8192
    seed: int = 0
    eps: float = 1e-3


@dataclass
class LLResult:
    """TEMPORARY (eval.likelihood.LLResult)."""

    logprob: float
    is_greedy: bool
    stderr: float
    n_tokens: int


class Scorer:
    """TEMPORARY (eval.likelihood.Scorer): one request at a time."""

    def __init__(self, model, *, causal, mask_id, seq_len, cfg=None, device=None):
        self.model, self.causal, self.mask_id, self.seq_len = model, causal, mask_id, seq_len
        self.cfg = cfg or LikelihoodConfig()
        self.device = device or next(model.parameters()).device

    @classmethod
    def from_loaded(cls, loaded, cfg=None) -> Scorer:
        return cls(loaded.model, causal=loaded.causal, mask_id=loaded.mask_id,
                   seq_len=loaded.seq_len, cfg=cfg, device=loaded.device)  # fmt: skip

    @torch.no_grad()
    def _logp(self, rows: torch.Tensor, n_ctx: int) -> torch.Tensor:
        """log-softmax of (CFG-combined) logits for [B, L] rows."""
        rows = rows.to(self.device)
        w = self.cfg.cfg_scale
        if self.causal or w == 0:
            return F.log_softmax(self.model(rows).float(), -1)
        uncond = rows.clone()
        uncond[:, :n_ctx] = self.mask_id
        logits = self.model(torch.cat([rows, uncond])).float()
        cond, unc = logits.chunk(2)
        return F.log_softmax(unc + (w + 1) * (cond - unc), -1)

    def _one(self, ctx: list[int], cont: list[int], index: int) -> LLResult:
        keep = self.seq_len - len(cont) + (1 if self.causal else 0)
        ctx = ctx[-keep:] if keep > 0 else []
        seq = torch.tensor(ctx + cont)
        n, m = len(ctx), len(cont)
        target = seq[n:]
        if self.causal:
            lp = self._logp(seq[None, :-1], n)[0, n - 1 :]
            logprob = lp.gather(-1, target[:, None].to(lp.device)).sum().item()
            greedy = bool((lp.argmax(-1).cpu() == target).all())
            return LLResult(logprob, greedy, 0.0, m)
        greedy = self._greedy(seq, n)
        if self.cfg.estimator == "chain_rule":
            rows = seq.repeat(m, 1)
            for i in range(m):
                rows[i, n + i :] = self.mask_id
            lp = self._logp(rows, n)
            idx = torch.arange(m)
            logprob = lp[idx, n + idx].gather(-1, target[:, None].to(lp.device)).sum().item()
            return LLResult(logprob, greedy, 0.0, m)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        k = self.cfg.mc_samples
        t = (torch.rand(1, generator=g) + torch.arange(k) / k) % 1
        p = (1 - self.cfg.eps) * t + self.cfg.eps
        masked = torch.rand(k, m, generator=g) < p[:, None]
        rows = seq.repeat(k, 1)
        rows[:, n:][masked] = self.mask_id
        lp = self._logp(rows, n)[:, n:].gather(-1, target.repeat(k, 1)[..., None].to(self.device))
        per = (lp[..., 0].cpu() * masked).sum(-1) / p
        return LLResult(per.mean().item(), greedy, (per.std() / math.sqrt(k)).item(), m)

    def _greedy(self, seq: torch.Tensor, n: int) -> bool:
        row = seq.clone()
        row[n:] = self.mask_id
        for _ in range(len(seq) - n):
            lp = self._logp(row[None], n)[0].cpu()
            open_ = (row == self.mask_id).nonzero()[:, 0]
            conf, tok = lp[open_].max(-1)
            j = int(conf.argmax())
            row[open_[j]] = tok[j]
        return bool((row[n:] == seq[n:]).all())

    def loglikelihood(self, requests, progress=False) -> list[LLResult]:
        return [self._one(list(c), list(x), i) for i, (c, x) in enumerate(requests)]

    def loglikelihood_rolling(self, tokens: list[int]) -> LLResult:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(tokens, 0, self.seq_len, context_len=1)
        ]
        eos = [0]
        results = self.loglikelihood([(c if c else eos, x) for c, x in windows])
        return LLResult(sum(r.logprob for r in results), False, 0.0, len(tokens))
