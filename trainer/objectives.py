"""Training and validation losses: autoregressive (ARM) and masked diffusion (MDM).

The two objectives train the same Transformer (``trainer/model.py``); an objective says whether
the model must be causal and turns a batch of packed rows ``tokens[B, T+1]`` into a scalar loss.
Both use the first T positions of a row, so a step costs the same Transformer FLOPs under either
objective (with a chunked loss the MDM runs the output head only at its masked positions).

Reproducibility: every random draw of the MDM loss comes from the row's ``key`` (one int64 per
row, unique per step and global row, supplied by the data loader) through a CPU
``torch.Generator`` seeded with it. A row therefore gets the same mask whichever rank or
micro-batch it lands in, and after a resume, so 1-process and N-process runs compute the same
loss. The loss of a batch is the mean of the losses its rows would have alone.

MDM loss (paper-notes.md, RADD-style absorbing diffusion): per row draw t ~ U[0,1), mask each
token with probability p = (1 - eps) t + eps (replace it by ``mask_id``), and score
``sum over masked tokens of CE / p``, divided by the row length; the batch loss is the mean over
rows, i.e. ``sum / (B * T)`` when no row is shortened.

Low-discrepancy t (``t_sampling="stratified"``, off by default; the paper draws t iid): as in
MDLM, the B rows of a micro-batch share one offset u and row i gets t = (u + r_i / B) mod 1,
where r_i is the rank of its key among the micro-batch's keys. Every interval [j/B, (j+1)/B)
then holds exactly one t, so a step no longer sees, by chance, only lightly or only heavily
masked rows; each t is still uniform on [0, 1) (u is), so the loss stays an unbiased estimate of
the same ELBO. u comes from a hash of the sorted keys: it is the same on every rank, after a
resume and for any order of the rows. The strata span a micro-batch, not the global batch (the
objective sees one micro-batch); the loader cuts a step into the same micro-batches for any world
size when ``batch.micro_batch`` is fixed, so 1- and N-process runs agree exactly then, while
``micro_batch: null`` (global_batch / world) regroups rows, and so their t, with the world size.

Stochastic sequence length: the paper cuts a whole micro-batch to a random length in [1, T] with
probability 1%. A per-micro-batch decision would depend on which rows share a micro-batch and so
on the world size; here each row is shortened independently with that probability (decision and
length drawn from its key). Each row still sees the same length distribution as in the paper.
The cut happens inside the micro-batch's single forward pass: the model gets the row lengths and
masks attention to keys beyond each row's cut (``Transformer.forward(ids, lengths)``), so a cut
row's first l logits equal those of the row run alone at length l, positions >= l get zero loss
weight, and every rank runs exactly one forward per micro-batch whatever its rows drew (ZeRO-3
gathers weights collectively in each forward). Micro-batches without a cut attend unmasked.

Warm-up (:func:`forced_cut`): with ``torch.compile`` the first micro-batch holding a cut row
compiles the blocks' second graph (the cut path breaks the graph at ``cut_attention``), seconds
at 1B. At 1% of rows that lands at a random step, inside a benchmark's timed steps or a run's
first log window. ``forced_cut`` cuts one row of the next micro-batch so a warm-up step pays
for it; it reads no extra data and takes no extra step, and the other rows draw as always.

Padding (``lengths``): a split's partial rows end in EOS padding (``pipeline/shards.py``), which
is not text. Every loss takes the rows' *lengths* (ids that are text, of the T+1; None = all)
and leaves padding out of numerator and denominator: the ARM scores target j only when token
j+1 is text, a row's MDM loss divides by its text positions and never masks or attends to a
pad (a padded row is handled exactly like a row cut to that length). Full rows -- all but one
row per (split, source) -- draw and score exactly as before.

Cost: with ``loss_chunk`` > 0 (what training uses, ``TrainConfig.loss_chunk``) the objective
hands the model a ``HeadLoss`` (``trainer/losses.py``): the output head and cross-entropy run in
chunks of tokens, never holding all logits, and the MDM sends only the hidden states of masked
positions through the head (half the head's work on average; the backward pass scatters into a
[B, T, d] gradient, not a [B, T, V] one). With ``loss_chunk=0`` (the plain reference path) the
model returns all logits and the loss is a dense cross-entropy over all B x T positions times a
per-position weight (``mask / (p * length)``, zero elsewhere). Both give the same loss and
gradients up to float rounding (tests/trainer/test_objectives.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.configlib import ConfigError
from trainer.losses import HeadLoss


def row_generator(key: int) -> torch.Generator:
    """The CPU generator all of a row's random draws come from."""
    return torch.Generator(device="cpu").manual_seed(int(key))


T_SAMPLING = ("iid", "stratified")
LOSS_WEIGHTING = ("elbo", "masked_mean", "row_mean")
"""How the MDM's training times t are drawn across the rows of a micro-batch."""


def micro_batch_offset(keys: torch.Tensor) -> float:
    """The shared offset u in [0, 1) of a stratified micro-batch: a pure function of the set of
    its row keys (a hash of the sorted keys seeds the draw), whatever their order."""
    sorted_keys = np.sort(keys.cpu().numpy().astype(np.int64))
    digest = hashlib.blake2b(sorted_keys.astype("<i8").tobytes(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") & ((1 << 63) - 1)
    return float(torch.rand(1, generator=row_generator(seed), dtype=torch.float64))


def stratified_times(keys: torch.Tensor) -> list[float]:
    """t per row, in row order: (u + r / B) mod 1 with r the rank of the row's key among the
    micro-batch's keys (ties, which distinct loader keys never have, keep row order)."""
    batch = keys.shape[0]
    u = micro_batch_offset(keys)
    ranks = torch.empty(batch, dtype=torch.long)
    ranks[torch.argsort(keys.cpu(), stable=True)] = torch.arange(batch)
    return [(u + r / batch) % 1.0 for r in ranks.tolist()]


def text_positions(lengths: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
    """bool[B, width] (CPU): position j < the row's length. ``lengths=None``: all True."""
    if lengths is None:
        return torch.ones(batch, width, dtype=torch.bool)
    return torch.arange(width)[None, :] < lengths.cpu()[:, None]


def _check_loss_chunk(loss_chunk: int) -> int:
    if not isinstance(loss_chunk, int) or isinstance(loss_chunk, bool) or loss_chunk < 0:
        raise ConfigError(f"loss_chunk: tokens per chunk, >= 0 (0 = plain), got {loss_chunk!r}")
    return loss_chunk


def _check_batch(
    model: nn.Module,
    tokens: torch.Tensor,
    keys: torch.Tensor,
    causal: bool,
    lengths: torch.Tensor | None = None,
) -> None:
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T+1] with T >= 1, got shape {tuple(tokens.shape)}")
    if keys.shape != tokens.shape[:1]:
        raise ValueError(f"keys must be [B]={tokens.shape[0]} (one per row), got {keys.shape}")
    if lengths is not None and (
        lengths.shape != tokens.shape[:1]
        or bool((lengths < 2).any())
        or bool((lengths > tokens.shape[1]).any())
    ):
        raise ValueError(
            f"lengths must be [B]={tokens.shape[0]} text ids per row in [2, {tokens.shape[1]}], "
            f"got {lengths.tolist()}"
        )
    inner = getattr(model, "module", model)  # DeepSpeed engines wrap the model
    model_causal = getattr(inner, "causal", None)
    if model_causal is not None and model_causal != causal:
        raise ValueError(
            f"objective needs causal={causal} attention but the model has causal={model_causal}; "
            "build Transformer(cfg, causal=objective.causal)"
        )


class Objective(ABC):
    """A loss over packed rows ``tokens[B, T+1]`` with one random ``key`` per row."""

    name: str
    """Registry name ("arm" or "mdm")."""
    causal: bool
    """Whether the model must use causal attention."""

    @abstractmethod
    def train_loss(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar training loss (differentiable); ``lengths``: text ids per row (padding out)."""

    def eval_token_losses(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        n_samples: int,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64[B, T] loss of each scored position, bool[B, T] which positions are scored),
        on CPU, without gradients. A row's per-token loss is the sum of its losses over its
        scored positions (padding is never scored); sums over any set of positions (a
        document's, a split's) divided by their counts are per-token losses too."""
        raise NotImplementedError(f"{type(self).__name__} has no per-position losses")

    def eval_row_sums(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        n_samples: int,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64[B] summed loss, int64[B] scored positions) per row (CPU)."""
        losses, scored = self.eval_token_losses(model, tokens, keys, n_samples, lengths)
        return losses.sum(dim=1), scored.sum(dim=1)

    def eval_row_losses(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        n_samples: int,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float64[B] (CPU): each row's mean per-token validation loss."""
        sums, counts = self.eval_row_sums(model, tokens, keys, n_samples, lengths)
        return sums / counts

    @torch.no_grad()
    def eval_loss(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        n_samples: int,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar per-token validation loss (nats) of the batch: summed loss over its scored
        positions / their number (without padding every row counts equally, as before)."""
        sums, counts = self.eval_row_sums(model, tokens, keys, n_samples, lengths)
        return (sums.sum() / counts.sum()).float()


class ARMObjective(Objective):
    """Next-token cross-entropy on ``tokens[:, :-1] -> tokens[:, 1:]``, mean over tokens."""

    name = "arm"
    causal = True

    def __init__(self, loss_chunk: int = 0) -> None:
        """``loss_chunk``: tokens per chunk of the head's cross-entropy; 0 = plain (all
        logits at once)."""
        self.loss_chunk = _check_loss_chunk(loss_chunk)

    def train_loss(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean CE over the targets that are text (target j is token j+1)."""
        _check_batch(model, tokens, keys, self.causal, lengths)
        batch, width = tokens.shape
        padded = lengths is not None and bool((lengths < width).any())
        if self.loss_chunk:
            targets = tokens[:, 1:].reshape(-1)
            if not padded:
                total = model(tokens[:, :-1], loss=HeadLoss(targets, chunk=self.loss_chunk))
                return total / targets.numel()
            keep = text_positions(lengths - 1, batch, width - 1).flatten().nonzero().squeeze(1)
            scored = keep.to(tokens.device, non_blocking=True)
            loss = HeadLoss(
                targets.index_select(0, scored), positions=scored, chunk=self.loss_chunk
            )
            return model(tokens[:, :-1], loss=loss) / len(keep)
        logits = model(tokens[:, :-1])
        if not padded:
            return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
        keep = text_positions(lengths - 1, batch, width - 1).to(ce.device)
        return (ce * keep).sum() / keep.sum()

    @torch.no_grad()
    def eval_token_losses(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        n_samples: int = 1,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact next-token CE at each text target (``keys``, ``n_samples`` are not needed)."""
        _check_batch(model, tokens, keys, self.causal, lengths)
        batch, width = tokens.shape
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
        scored = text_positions(None if lengths is None else lengths - 1, batch, width - 1)
        return ce.double().cpu() * scored, scored


@dataclass(frozen=True)
class RowDraw:
    """The random choices for one MDM training row."""

    length: int
    """Positions the row keeps (T unless the row was shortened)."""
    t: float
    """Diffusion time in [0, 1)."""
    p: float
    """Mask probability (1 - eps) t + eps, in [eps, 1)."""
    mask: torch.Tensor
    """bool[length] on CPU: True where the token is replaced by the mask id."""


class MDMObjective(Objective):
    """Masked diffusion loss (see module docstring); the model must be bidirectional."""

    name = "mdm"
    causal = False

    def __init__(
        self,
        mask_id: int,
        eps: float = 1e-3,
        random_length_prob: float = 0.01,
        loss_chunk: int = 0,
        t_sampling: str = "iid",
        loss_weighting: str = "elbo",
    ) -> None:
        """``loss_chunk``: tokens per chunk of the head's cross-entropy, over masked positions
        only; 0 = plain (all logits, dense weighted cross-entropy). ``t_sampling``: "iid" (the
        paper: each row's own t) or "stratified" (one t per 1/B stratum of a micro-batch)."""
        self.loss_chunk = _check_loss_chunk(loss_chunk)
        if t_sampling not in T_SAMPLING:
            raise ConfigError(f"mdm.t_sampling: one of {list(T_SAMPLING)}, got {t_sampling!r}")
        self.t_sampling = t_sampling
        if loss_weighting not in LOSS_WEIGHTING:
            raise ConfigError(
                f"mdm.loss_weighting: one of {list(LOSS_WEIGHTING)}, got {loss_weighting!r}"
            )
        self.loss_weighting = loss_weighting
        if not 0 < eps <= 1:
            raise ConfigError(f"objective eps: must be in (0, 1], got {eps!r}")
        if not 0 <= random_length_prob <= 1:
            raise ConfigError(
                f"objective random_length_prob: must be in [0, 1], got {random_length_prob!r}"
            )
        self.mask_id, self.eps, self.random_length_prob = int(mask_id), eps, random_length_prob
        self.pending_cut: int | None = None
        """Set by :func:`forced_cut`: cut one full row of the next micro-batch to this length."""
        self.forced_cuts = 0
        """How many rows :func:`forced_cut` has cut so far."""

    def draw_row(self, key: int, seq_len: int, t: float | None = None) -> RowDraw:
        """Random choices of one training row; a pure function of ``key`` (draw order fixed).
        ``t`` given (stratified sampling) replaces the row's own draw of t; the draws after it
        (cut length, mask uniforms) stay the same."""
        g = row_generator(key)
        cut_u, own_t = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        t = own_t if t is None else t
        cut_len = int(torch.randint(1, seq_len + 1, (1,), generator=g))
        uniforms = torch.rand(seq_len, generator=g)
        length = cut_len if cut_u < self.random_length_prob else seq_len
        p = (1 - self.eps) * t + self.eps
        return RowDraw(length=length, t=t, p=p, mask=uniforms[:length] < p)

    def eval_draws(
        self, keys: torch.Tensor, n_samples: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation draws: stratified times float64[B, n] and masks bool[B, n, T] (CPU).

        Per row, u ~ U[0,1) comes first from the key's generator and t_i = (u + i/n) mod 1, so
        each row's n times hit every interval [j/n, (j+1)/n) exactly once; then n x T uniforms
        give sample i the mask ``uniform < p_i`` with p_i = (1 - eps) t_i + eps.
        """
        offsets = torch.arange(n_samples, dtype=torch.float64) / n_samples
        times, uniforms = [], []
        for k in keys.tolist():
            g = row_generator(k)
            times.append((torch.rand(1, generator=g, dtype=torch.float64) + offsets) % 1.0)
            uniforms.append(torch.rand(n_samples, seq_len, generator=g))
        times_t = torch.stack(times)
        p = (1 - self.eps) * times_t + self.eps
        return times_t, torch.stack(uniforms) < p[:, :, None]

    def _weighted_loss_sum(
        self,
        model: nn.Module,
        x: torch.Tensor,
        weight: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum(CE * weight)`` over all positions of ``x`` [B, T]; ``weight`` float32[B, T] (CPU)
        is ``1 / (p * length)`` where a token is masked and 0 elsewhere (so the input is masked
        exactly where the weight is positive). ``lengths`` (CPU int[B]) cuts rows in the model."""
        on_device = weight.to(x.device, non_blocking=True)
        noisy = torch.where(on_device > 0, self.mask_id, x)
        cut = {} if lengths is None else {"lengths": lengths}
        if self.loss_chunk:  # only masked positions go through the head, in chunks
            flat = weight.flatten()
            positions = flat.nonzero().squeeze(1)
            scored = positions.to(x.device, non_blocking=True)
            loss = HeadLoss(
                targets=x.reshape(-1).index_select(0, scored),
                weight=flat[positions].to(x.device, non_blocking=True),
                positions=scored,
                chunk=self.loss_chunk,
            )
            return model(noisy, loss=loss, **cut)
        logits = model(noisy, **cut)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), x.reshape(-1), reduction="none"
        )  # dense: every position, weight 0 where unmasked
        return (ce * on_device.flatten()).sum()

    def train_weights(
        self, keys: torch.Tensor, seq_len: int, text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-position loss weights float32[B, T] and row lengths (int64[B], or None when no
        row is cut), both on CPU: row b weighs ``1 / (p_b * l_b)`` at its masked positions
        ``< l_b`` and 0 elsewhere, so ``sum(CE * weight) / B`` is the mean of the row losses.
        ``text`` (int[B], text positions per row, None = all): a padded row is cut to its text
        (l_b = min(its drawn length, its text)), with the same draws as without padding."""
        times = stratified_times(keys) if self.t_sampling == "stratified" else None
        draws = [
            self.draw_row(k, seq_len, None if times is None else times[i])
            for i, k in enumerate(keys.tolist())
        ]
        if text is not None:
            draws = [
                d if d.length <= n else dataclasses.replace(d, length=n, mask=d.mask[:n])
                for d, n in zip(draws, text.tolist())
            ]
        if self.pending_cut is not None:
            draws = self._force_cut(draws, seq_len)
        weight = torch.zeros(len(draws), seq_len, dtype=torch.float32)
        for row, d in enumerate(draws):
            weight[row, : d.length] = d.mask.float() / (d.p * d.length)
        if self.loss_weighting == "masked_mean":  # train_loss divides by B: B / masked tokens
            masked = weight > 0
            weight = masked.float() * (len(draws) / max(int(masked.sum()), 1))
        elif self.loss_weighting == "row_mean":  # each row: the mean CE of its masked tokens
            masked = (weight > 0).float()
            weight = masked / masked.sum(dim=1, keepdim=True).clamp(min=1.0)
        lengths = [d.length for d in draws]
        if all(n == seq_len for n in lengths):
            return weight, None
        return weight, torch.tensor(lengths, dtype=torch.long)

    def _force_cut(self, draws: list[RowDraw], seq_len: int) -> list[RowDraw]:
        """Cut the first full-length row to ``pending_cut`` (0: seq_len // 2; clamped to
        [1, seq_len - 1]); nothing to do when every row is already cut or rows have one
        position."""
        length, self.pending_cut = self.pending_cut, None
        full = [i for i, d in enumerate(draws) if d.length == seq_len]
        if not full or seq_len < 2:
            return draws
        n = min(max(1, length or seq_len // 2), seq_len - 1)
        row = full[0]
        draws = list(draws)
        draws[row] = dataclasses.replace(draws[row], length=n, mask=draws[row].mask[:n])
        self.forced_cuts += 1
        return draws

    def train_loss(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_batch(model, tokens, keys, self.causal, lengths)
        x = tokens[:, :-1]
        text = None if lengths is None else lengths.cpu().clamp(max=x.shape[1])
        weight, cut = self.train_weights(keys, x.shape[1], text)
        return self._weighted_loss_sum(model, x, weight, cut) / x.shape[0]

    @torch.no_grad()
    def eval_token_losses(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        n_samples: int = 128,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Monte Carlo ELBO with ``n_samples`` stratified times per row (no length cuts).

        Sample i masks row b with p = (1 - eps) t[b, i] + eps and its own uniforms (drawn from
        the row's key after u), so the estimate is deterministic for fixed keys. Position j's
        loss is the mean over samples of ``[masked] CE / p``; a row's per-token ELBO is their
        sum over its text positions divided by their number. Padding is neither masked, nor
        scored, nor attended to.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        _check_batch(model, tokens, keys, self.causal, lengths)
        x = tokens[:, :-1]
        batch, seq_len = x.shape
        text = None if lengths is None else lengths.cpu().clamp(max=seq_len)
        scored = text_positions(text, batch, seq_len)
        cut = {} if text is None or bool((text == seq_len).all()) else {"lengths": text}
        times, masks = self.eval_draws(keys, n_samples, seq_len)
        p = (1 - self.eps) * times + self.eps  # float64[B, n]
        # [n, B, T]: sample i is weights[i]; 0 where unmasked or padding
        weights = ((masks & scored[:, None, :]) / p[:, :, None]).float().transpose(0, 1)
        totals = torch.zeros(batch, seq_len, dtype=torch.float64, device=x.device)
        for i in range(n_samples):
            weight = weights[i].contiguous().to(x.device, non_blocking=True)
            noisy = torch.where(weight > 0, self.mask_id, x)
            logits = model(noisy, **cut).float()
            ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
            totals += (ce * weight).double()
        return (totals / n_samples).cpu(), scored


@contextlib.contextmanager
def forced_cut(objective: Objective, length: int = 0) -> Iterator[bool]:
    """Warm-up aid (module docstring): inside the context, the next MDM training micro-batch
    cuts its first full-length row to ``length`` (0: half the row) so the cut-row path runs,
    and is compiled, before timing starts. Yields whether the objective has a cut path (False
    for the ARM: a causal model needs none, nothing changes). A cut not consumed by the end of
    the context is dropped; later micro-batches draw as always."""
    if not isinstance(objective, MDMObjective):
        yield False
        return
    objective.pending_cut = max(0, int(length))
    try:
        yield True
    finally:
        objective.pending_cut = None


OBJECTIVES: dict[str, type[Objective]] = {"arm": ARMObjective, "mdm": MDMObjective}


def build_objective(name: str, mask_id: int, loss_chunk: int = 0, **kw: float | str) -> Objective:
    """Objective ``name`` ("arm" or "mdm"); ``kw`` are MDM options (eps, random_length_prob,
    t_sampling, loss_weighting);
    ``loss_chunk`` (both): tokens per chunk of the head's cross-entropy, 0 = plain.

    ARM takes no other options: passing any raises ConfigError rather than silently ignoring it.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"objective: unknown {name!r}; choose one of {sorted(OBJECTIVES)}")
    if name == "arm":
        if kw:
            raise ConfigError(f"objective arm takes no options, got {sorted(kw)}")
        return ARMObjective(loss_chunk)
    allowed = {"eps", "random_length_prob", "t_sampling", "loss_weighting"}
    if set(kw) - allowed:
        raise ConfigError(
            f"objective mdm: unknown option(s) {sorted(set(kw) - allowed)}; valid: {sorted(allowed)}"
        )
    return MDMObjective(mask_id, **kw, loss_chunk=loss_chunk)
