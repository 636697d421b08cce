"""Fine-tuning losses: the ARM and MDM objectives restricted to answer tokens.

A batch is ``int64[B, 2, T+1]`` (``trainer/sft_data.py``): channel 0 the tokens, channel 1 the
answer mask (1 on answer tokens, their EOS and the EOS padding); with it come the rows' text
lengths (ids before the padding). Both losses are means of
per-row losses (a row's loss does not depend on the rows beside it, as in pretraining), and
every random draw comes from the row's key (``trainer.objectives.row_generator``).

* ARM: next-token cross-entropy at the positions whose *next* token is an answer token or the
  EOS that ends it, averaged over those positions per row; never the EOS padding after it (EOS
  after EOS teaches nothing, and a short answer padded to a long row would put most of the loss
  there), as in SMDM's ARM fine-tuning. The prompt's logits get no gradient.
* MDM (paper-notes.md, SFT): the prompt is never masked. Per row draw t ~ U[0,1) and mask each
  answer token among the first T with probability p = (1 - eps) t + eps; the row loss is the sum
  over masked answer tokens of CE / p, divided by the row's number of answer tokens. The EOS
  padding counts as answer: masked and predicted like the answer's own EOS, as in SMDM's and
  LLaDA's SFT (it is how the model learns to end an answer with a run of EOS that sampling
  then cuts), so the text lengths are not used. With
  probability ``cfg_prompt_drop`` every prompt token is replaced by the mask token as well (no
  loss on it): standard classifier-free-guidance training. Validation uses the same loss with
  stratified times (no prompt drop), from the draws of :meth:`MDMObjective.eval_draws`.
  ``loss_weighting="masked_mean"`` (``mdm.loss_weighting``) replaces the 1/p weights by the plain
  mean CE over the micro-batch's masked answer tokens, as in pretraining (benchmarks/
  mdm_plateau.md: the 1/p-weighted loss learns far more slowly at tiny sizes); validation is
  the 1/p-weighted loss either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives import (
    MDMObjective,
    Objective,
    _check_batch,
    row_generator,
    text_positions,
)


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64[B, T+1], answer mask bool[B, T+1]) of an SFT batch."""
    if batch.dim() != 3 or batch.shape[1] != 2:
        raise ValueError(
            f"an SFT batch is [B, 2, T+1] (tokens, answer mask), got {tuple(batch.shape)}; "
            "build it with trainer.sft_data.SFTLoader"
        )
    return batch[:, 0], batch[:, 1].bool()


class SFTARMObjective(Objective):
    """Next-token loss on answer tokens only (mean per row, then over rows)."""

    name = "arm"
    causal = True

    def _row_losses(self, model: nn.Module, batch: torch.Tensor, keys: torch.Tensor, lengths):
        tokens, answer = split_batch(batch)
        _check_batch(model, tokens, keys, self.causal, lengths)
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
        width = tokens.shape[1] - 1
        text = text_positions(None if lengths is None else lengths - 1, len(tokens), width)
        weight = (answer[:, 1:] & text.to(answer.device)).float()
        return (ce * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)

    def train_loss(self, model: nn.Module, batch: torch.Tensor, keys: torch.Tensor, lengths=None):
        return self._row_losses(model, batch, keys, lengths).mean()

    @torch.no_grad()
    def eval_loss(self, model, batch, keys, n_samples: int = 1, lengths=None) -> torch.Tensor:
        """Exact: the training loss (``n_samples`` is not needed)."""
        return self._row_losses(model, batch, keys, lengths).mean()

    @torch.no_grad()
    def eval_row_losses(self, model, batch, keys, n_samples: int = 1, lengths=None):
        return self._row_losses(model, batch, keys, lengths).double().cpu()


class SFTMDMObjective(Objective):
    """Masked diffusion loss over answer tokens with a clean prompt (module docstring)."""

    name = "mdm"
    causal = False

    def __init__(
        self,
        mask_id: int,
        eps: float = 1e-3,
        cfg_prompt_drop: float = 0.0,
        loss_weighting: str = "elbo",
    ) -> None:
        if not 0 <= cfg_prompt_drop <= 1:
            raise ValueError(f"cfg_prompt_drop must be in [0, 1], got {cfg_prompt_drop}")
        if loss_weighting not in ("elbo", "masked_mean"):
            raise ValueError(f"SFT loss_weighting: elbo or masked_mean, got {loss_weighting!r}")
        self.base = MDMObjective(mask_id, eps=eps, random_length_prob=0.0)
        self.mask_id, self.eps, self.cfg_prompt_drop = int(mask_id), eps, cfg_prompt_drop
        self.loss_weighting = loss_weighting

    def train_draws(
        self, keys: torch.Tensor, answer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss weight float32[B, T], masked input bool[B, T]) on CPU for answer mask
        ``answer`` bool[B, T]: weight 1/(p * n_answer) on masked answer tokens, 0 elsewhere;
        the input is masked there and, for prompt-dropped rows, on every prompt token."""
        batch, seq_len = answer.shape
        weight = torch.zeros(batch, seq_len, dtype=torch.float32)
        masked = torch.zeros(batch, seq_len, dtype=torch.bool)
        for row, key in enumerate(keys.tolist()):
            g = row_generator(key)
            t, drop_u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            uniforms = torch.rand(seq_len, generator=g)
            p = (1 - self.eps) * t + self.eps
            hit = answer[row] & (uniforms < p)
            weight[row] = hit.float() / (p * max(int(answer[row].sum()), 1))
            masked[row] = hit | (~answer[row] if drop_u < self.cfg_prompt_drop else False)
        if self.loss_weighting == "masked_mean":  # train_loss averages rows: B / masked tokens
            hits = weight > 0
            weight = hits.float() * (batch / max(int(hits.sum()), 1))
        return weight, masked

    def _loss_sum(self, model, x, weight, masked) -> torch.Tensor:
        """float[B]: each row's ``sum(CE * weight)``; the model sees ``x`` masked at ``masked``."""
        logits = model(torch.where(masked, self.mask_id, x))
        ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
        return (ce * weight).sum(dim=1)

    def train_loss(self, model: nn.Module, batch: torch.Tensor, keys: torch.Tensor, lengths=None):
        tokens, answer = split_batch(batch)
        _check_batch(model, tokens, keys, self.causal)
        x = tokens[:, :-1]
        weight, masked = self.train_draws(keys, answer[:, :-1].cpu())
        weight = weight.to(x.device, non_blocking=True)
        masked = masked.to(x.device, non_blocking=True)
        return self._loss_sum(model, x, weight, masked).mean()

    @torch.no_grad()
    def eval_row_losses(self, model, batch, keys, n_samples: int = 128, lengths=None):
        """float64[B] (CPU): per row, the answer-token loss averaged over ``n_samples``
        stratified times (the same draws as pretraining validation for the same keys)."""
        tokens, answer = split_batch(batch)
        _check_batch(model, tokens, keys, self.causal)
        x, answer = tokens[:, :-1], answer[:, :-1]
        times, masks = self.base.eval_draws(keys, n_samples, x.shape[1])
        p = (1 - self.eps) * times + self.eps  # float64[B, n]
        answer_cpu = answer.cpu()
        hits = masks & answer_cpu[:, None, :]
        n_answer = answer_cpu.sum(dim=1).clamp(min=1).double()
        weights = (hits / (p[:, :, None] * n_answer[:, None, None])).float()
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(n_samples):
            w = weights[:, i].to(x.device)
            total += self._loss_sum(model, x, w, w > 0).double()
        return (total / n_samples).cpu()

    @torch.no_grad()
    def eval_loss(self, model, batch, keys, n_samples: int = 128, lengths=None) -> torch.Tensor:
        return self.eval_row_losses(model, batch, keys, n_samples).mean().float()


def build_sft_objective(
    name: str,
    mask_id: int,
    eps: float = 1e-3,
    cfg_prompt_drop: float = 0.0,
    loss_weighting: str = "elbo",
) -> Objective:
    """The SFT objective for ``objective=arm|mdm``."""
    if name == "arm":
        return SFTARMObjective()
    if name == "mdm":
        return SFTMDMObjective(mask_id, eps, cfg_prompt_drop, loss_weighting)
    raise ValueError(f"objective: unknown {name!r}; choose arm or mdm")
