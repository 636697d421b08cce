"""How many validation rows does a comparison need? Per-row loss spread of two models, measured.

Why: ``eval.max_rows`` trades evaluation cost against the noise of the validation loss. The
noise of one model's mean over n rows is sigma_row / sqrt(n); the noise of the *difference*
of two models scored on the same rows (and, for MDMs, the same masks: keys are per row) is
sigma_diff / sqrt(n), usually far smaller because per-row losses of two models are strongly
correlated. This script scores two models (runs, or checkpoints of one run) row by row and
prints both spreads, the Monte Carlo part of the MDM estimate (two independent key sets),
and the rows needed for a 95% half-width of ``--target`` nats.

    python benchmarks/val_rows_variance.py RUN_A[:STEP] RUN_B[:STEP] [--split validation]
        [--rows 0] [--mc-samples 16] [--target 0.01]

Evaluation writes an export of a checkpoint into the run directory (eval.measure.loading); point
copies of runs you do not want touched.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from tqdm import tqdm

from eval.measure.loading import load_model, open_corpus
from trainer.data import EVAL_KEY_SEED, EVAL_SAMPLE_SEED, EvalSample, mix_keys

Z95 = 1.959964


def row_losses(spec: str, split: str, rows: int | None, mc: int, key_seed: int) -> np.ndarray:
    path, _, step = spec.partition(":")
    loaded = load_model(path, checkpoint=int(step) if step else None, device="cpu", dtype="fp32")
    corpus_dir, _ = open_corpus(loaded)
    sample = EvalSample(corpus_dir, split, rows, EVAL_SAMPLE_SEED)
    objective = loaded.objective()
    out = []
    with torch.no_grad():
        for b in tqdm(range(sample.n_batches(8)), desc=f"{spec} keys={key_seed}", leave=False):
            index = sample.batch_rows(b, 8)
            tokens = sample.batch(b, 8)[0]
            keys = torch.from_numpy(mix_keys(index, key_seed))
            out.append(objective.eval_row_losses(loaded.model, tokens, keys, mc).numpy())
    return np.concatenate(out), loaded.family


def needed(sigma: float, target: float) -> int:
    return math.ceil((Z95 * sigma / target) ** 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--split", default="validation")
    p.add_argument("--rows", type=int, default=0, help="rows sampled (0 = the whole split)")
    p.add_argument("--mc-samples", type=int, default=16)
    p.add_argument("--target", type=float, default=0.01)
    args = p.parse_args()
    rows = args.rows or None
    a, family = row_losses(args.a, args.split, rows, args.mc_samples, EVAL_KEY_SEED)
    b, _ = row_losses(args.b, args.split, rows, args.mc_samples, EVAL_KEY_SEED)
    diff = a - b
    print(f"{family} {args.split}: {len(a)} rows, mc_samples={args.mc_samples}")
    for name, x in (("A", a), ("B", b)):
        print(f"  {name}: mean {x.mean():.4f}  sigma_row {x.std(ddof=1):.4f}")
    rho = np.corrcoef(a, b)[0, 1]
    s_row, s_diff = a.std(ddof=1), diff.std(ddof=1)
    print(f"  A-B: mean {diff.mean():+.4f}  sigma_diff {s_diff:.4f}  corr {rho:.4f}")
    if family == "mdm":  # a second, independent key set: the Monte Carlo part of sigma_row
        a2, _ = row_losses(args.a, args.split, rows, args.mc_samples, EVAL_KEY_SEED + 1)
        s_mc = (a - a2).std(ddof=1) / math.sqrt(2)
        print(f"  A Monte Carlo sigma per row at {args.mc_samples} samples: {s_mc:.4f}")
    print(
        f"  rows for +-{args.target} (95%): one model {needed(s_row, args.target)}, "
        f"paired difference {needed(s_diff, args.target)}"
    )


if __name__ == "__main__":
    main()
