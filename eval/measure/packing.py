"""Pack scoring rows of many requests into few forward passes (for ``likelihood``).

Every likelihood estimator reduces to the same work: run the model on some rows (token ids,
some of them the mask id) and read the log-probability of a target token at chosen positions.
Doing that one request at a time wastes most of a forward pass on small batches, so this module
takes the rows of *many* requests (``RowBlock``: rows of one request, all of one length), sorts
them longest first and cuts them into batches of at most ``token_budget`` tokens
(``rows x padded length``). Rows shorter than their batch are right-padded and the model gets
per-row ``lengths``: attention never looks at a padded key, and a row's outputs at positions
before its length do not depend on what else shares its batch (up to float rounding of
different batch shapes).

Only the scored positions go through the output head, in chunks, so neither the head's FLOPs
nor a ``[B, T, vocab]`` logits tensor is paid for positions nobody reads (with a 32k vocabulary
the head is the largest matmul of small models).

Classifier-free guidance: with ``cfg_scale = w != 0`` each batch also carries the unconditional
twin of every row (its context tokens replaced by the mask id) in the *same* forward pass, and
the scored logits are ``uncond + (w + 1) (cond - uncond)`` before the log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

HEAD_FLOATS = 1 << 25
"""Largest logits chunk (positions x vocab floats, 128 MiB in fp32) taken through the head."""


@dataclass
class RowBlock:
    """The rows of one request (all of one length) and the positions to score in them.

    Scored entries are sorted by row; entry s reads the output at ``pos[s]`` of row ``row[s]``
    and scores token ``target[s]``.
    """

    ids: torch.Tensor
    """int64[k, L] on CPU: conditional input rows."""
    n_context: int
    """Leading context tokens of every row (what CFG's unconditional twin replaces by masks)."""
    row: torch.Tensor
    """int64[S]: row of each scored entry (non-decreasing)."""
    pos: torch.Tensor
    """int64[S]: position whose output scores the entry."""
    target: torch.Tensor
    """int64[S]: token whose log-probability is read."""

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


@dataclass
class BlockScores:
    """Per scored entry of a block: log p(target), and the argmax and its log-probability."""

    logp: torch.Tensor
    """float32[S]: log-probability of the target."""
    argmax: torch.Tensor
    """int64[S]: most probable token (first one on ties)."""
    max_logp: torch.Tensor
    """float32[S]: its log-probability (the confidence greedy unmasking ranks by)."""


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of block ``block`` placed in a batch."""

    block: int
    start: int
    stop: int


def plan_batches(blocks: list[RowBlock], token_budget: int, twins: int) -> list[list[Segment]]:
    """Cut the rows of ``blocks`` into batches of at most ``token_budget`` tokens.

    Blocks are taken longest first (ties by index, so the plan is deterministic); a batch's
    padded length is that of its first row and it holds ``token_budget // (length * twins)``
    rows (at least one), where ``twins`` is 2 when every row also has a CFG twin.
    """
    order = sorted(range(len(blocks)), key=lambda b: (-blocks[b].length, b))
    batches: list[list[Segment]] = []
    current: list[Segment] = []
    room = 0
    for b in order:
        start, k = 0, int(blocks[b].ids.shape[0])
        while start < k:
            if room == 0:
                if current:
                    batches.append(current)
                current = []
                room = max(1, token_budget // (blocks[b].length * twins))
            stop = min(k, start + room)
            current.append(Segment(b, start, stop))
            room -= stop - start
            start = stop
    if current:
        batches.append(current)
    return batches


def _batch_inputs(
    blocks: list[RowBlock], batch: list[Segment], mask_id: int, cfg: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [R or 2R, T] and lengths (CPU); CFG twins follow the R rows."""
    rows = sum(s.stop - s.start for s in batch)
    width = max(blocks[s.block].length for s in batch)
    ids = torch.full((rows, width), mask_id, dtype=torch.long)
    lengths = torch.empty(rows, dtype=torch.long)
    offset = 0
    for s in batch:
        block, n = blocks[s.block], s.stop - s.start
        ids[offset : offset + n, : block.length] = block.ids[s.start : s.stop]
        lengths[offset : offset + n] = block.length
        offset += n
    if not cfg:
        return ids, lengths
    uncond = ids.clone()
    offset = 0
    for s in batch:
        n = s.stop - s.start
        uncond[offset : offset + n, : blocks[s.block].n_context] = mask_id
        offset += n
    return torch.cat([ids, uncond]), torch.cat([lengths, lengths])


def _batch_entries(
    blocks: list[RowBlock], batch: list[Segment]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Batch rows, positions and targets of the entries scored in ``batch``, and for each
    segment the (block, first entry, end entry) range they came from."""
    rows, pos, target, spans = [], [], [], []
    offset = 0
    for s in batch:
        block = blocks[s.block]
        lo, hi = torch.searchsorted(block.row, torch.tensor([s.start, s.stop])).tolist()
        rows.append(block.row[lo:hi] - s.start + offset)
        pos.append(block.pos[lo:hi])
        target.append(block.target[lo:hi])
        spans.append((s.block, lo, hi))
        offset += s.stop - s.start
    return torch.cat(rows), torch.cat(pos), torch.cat(target), spans


def _score_hidden(
    head: torch.nn.Module,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    target: torch.Tensor,
    cfg_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head + (CFG) + log-softmax over hidden states [S, d], chunked; returns CPU tensors."""
    chunk = max(1, HEAD_FLOATS // head.out_features)
    logp_out, arg_out, max_out = [], [], []
    for lo in range(0, cond.shape[0], chunk):
        logits = head(cond[lo : lo + chunk]).float()
        if uncond is not None:
            base = head(uncond[lo : lo + chunk]).float()
            logits = torch.lerp(base, logits, cfg_scale + 1.0)  # base + (w+1)(logits - base)
        logp = F.log_softmax(logits, dim=-1)
        tgt = target[lo : lo + chunk].to(logp.device)
        logp_out.append(logp.gather(1, tgt[:, None])[:, 0])
        best = logp.argmax(dim=-1)
        arg_out.append(best)
        max_out.append(logp.gather(1, best[:, None])[:, 0])
    return tuple(torch.cat(x).cpu() for x in (logp_out, arg_out, max_out))


@torch.inference_mode()
def run_blocks(
    model: torch.nn.Module,
    blocks: list[RowBlock],
    *,
    token_budget: int,
    mask_id: int,
    device: torch.device,
    cfg_scale: float = 0.0,
    progress: bool = False,
) -> list[BlockScores]:
    """Score every entry of every block; one ``BlockScores`` per block, in block order.

    ``model`` must offer ``features(ids, lengths)`` (final hidden states) and ``head`` (the
    output projection), as ``trainer.model.Transformer`` does.
    """
    cfg = cfg_scale != 0.0
    sizes = [int(b.row.numel()) for b in blocks]
    logp = [torch.empty(n) for n in sizes]
    argmax = [torch.empty(n, dtype=torch.long) for n in sizes]
    max_logp = [torch.empty(n) for n in sizes]
    batches = plan_batches(blocks, token_budget, 2 if cfg else 1)
    for batch in tqdm(batches, desc="likelihood", unit="batch", disable=not progress):
        rows, pos, target, spans = _batch_entries(blocks, batch)
        if rows.numel() == 0:
            continue
        ids, lengths = _batch_inputs(blocks, batch, mask_id, cfg)
        hidden = model.features(ids.to(device, non_blocking=True), lengths)
        rows_d, pos_d = rows.to(device), pos.to(device)
        cond = hidden[rows_d, pos_d]
        uncond = hidden[rows_d + ids.shape[0] // 2, pos_d] if cfg else None
        out = _score_hidden(model.head, cond, uncond, target, cfg_scale)
        at = 0
        for b, lo, hi in spans:
            n = hi - lo
            logp[b][lo:hi], argmax[b][lo:hi], max_logp[b][lo:hi] = (x[at : at + n] for x in out)
            at += n
    return [BlockScores(*x) for x in zip(logp, argmax, max_logp, strict=True)]
