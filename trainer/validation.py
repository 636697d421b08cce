"""Validation during training: the same fixed rows for every run, streamed, sharded over ranks.

Why it looks like this: a scaling study reads differences of a few hundredths of a nat between
runs, so every run on a corpus must be scored on the *same* rows, and those rows must represent
the whole split rather than its first shard. Each split's rows are therefore a seeded uniform
sample over all its shards (:class:`trainer.data.EvalSample`: a function of the corpus,
``eval.max_rows`` and a fixed seed only, not of the world size, batch size or training seed),
and the sample is written to ``run_dir/eval_rows.json`` (also an MLflow artifact, with a digest
of each split's rows as params) so two runs can be checked to have used the same rows.

Batches are read when they are evaluated (nothing is materialised up front) and dealt to ranks
round-robin, so each rank reads only its own rows. Every rank runs the same number of forward
passes -- a rank without a batch in the last round repeats one with weight 0 -- because ZeRO-3
gathers weights collectively inside every forward. A split's loss is its summed loss over the
scored tokens divided by their number, reduced over ranks: EOS padding (a split's partial rows,
``pipeline/shards.py``) is in neither, so ``val/<split>/loss`` is per token of text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.data import EVAL_SAMPLE_SEED, EvalSample
from trainer.engine import all_reduce_sum

EVAL_ROWS = "eval_rows.json"
"""File in run_dir recording which rows each split was validated on."""
FORMAT = "maskscale-eval-rows/1"


@contextmanager
def evaluating(engine) -> Iterator[None]:
    """Eval mode and no autograd for a validation pass; the previous mode comes back after."""
    was_training = engine.module.training
    engine.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train(was_training)


def loss_metrics(name: str, loss: float) -> dict[str, float]:
    """{"val/<name>/loss": loss (nats), "val/<name>/ppl": exp(loss)}."""
    return {f"val/{name}/loss": loss, f"val/{name}/ppl": math.exp(min(loss, 700.0))}


class Evaluator:
    """Validation loss per split: each rank scores its batches, (loss sum, rows) are reduced."""

    def __init__(
        self,
        corpus_dir,
        splits: list[str],
        batch_size: int,
        max_rows: int | None,
        n_samples: int,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int = EVAL_SAMPLE_SEED,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.splits, self.n_samples, self.device = splits, n_samples, device
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.samples = {s: EvalSample(corpus_dir, s, max_rows, seed) for s in splits}

    def rounds(self, split: str) -> int:
        """Forward passes every rank runs for ``split`` (the same on all ranks)."""
        return math.ceil(self.samples[split].n_batches(self.batch_size) / self.world)

    def split_sums(self, model, objective, split: str) -> tuple[float, int]:
        """(summed loss, scored tokens) over this rank's batches of ``split``, not reduced:
        their ratio is the per-token loss, padding left out of both."""
        sample, size = self.samples[split], self.batch_size
        mine = iter(sample.rank_batches(size, self.rank, self.world))
        loss_sum, tokens_scored, filler = 0.0, 0, None
        for _ in range(self.rounds(split)):
            index = next(mine, None)
            if index is None:  # no batch left for this rank: repeat one, weight 0
                batch = filler if filler is not None else sample.batch(0, size)
            else:
                batch = filler = sample.batch(index, size)
            tokens, keys, lengths = batch
            sums, counts = objective.eval_row_sums(
                model, tokens.to(self.device), keys, self.n_samples, lengths
            )
            if index is not None:
                loss_sum += float(sums.sum())
                tokens_scored += int(counts.sum())
        return loss_sum, tokens_scored

    def run(self, engine, objective) -> dict[str, float]:
        """{"val/<split>/loss": mean per-token loss (nats), "val/<split>/ppl": exp(loss)}."""
        out: dict[str, float] = {}
        with evaluating(engine):
            for split in self.splits:
                total, count = all_reduce_sum(
                    list(self.split_sums(engine, objective, split)), self.device
                )
                out.update(loss_metrics(split, total / max(count, 1)))
        return out

    def params(self) -> dict[str, dict]:
        """{split: sizes, seed and rows digest}: compact enough for MLflow params."""
        return {s: sample.describe() for s, sample in self.samples.items()}

    def record(self) -> dict:
        """Which rows each split is validated on (row indices omitted when it is every row)."""
        splits = {}
        for s, sample in self.samples.items():
            entry = sample.describe()
            if len(sample.rows) < sample.split_rows:
                entry["row_index"] = sample.rows.tolist()
            splits[s] = entry
        return {"format": FORMAT, "splits": splits}

    def write_record(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / EVAL_ROWS
        path.write_text(json.dumps(self.record()) + "\n")
        return path
