"""Does the MDM leave the unigram plateau? A small, reproducible grid on a built corpus.

Why: at the demo's budget the tiny MDM's validation ELBO sat at the loss of a unigram model of
the training split (issue 10): it had learned token frequencies and nothing else. This script
trains tiny ARMs and MDMs with the real trainer (``python -m pipeline.cli train``, tracking off)
over a grid of learning rate, batch, MDM t sampling and seed, and compares each to that unigram
baseline on the same validation rows. Results are appended to ``OUT/results.jsonl`` (a finished
run is not trained again) and printed as a markdown table (benchmarks/mdm_plateau.md).

Columns: ``val`` is the trainer's validation loss over all validation rows (MDM: the Monte Carlo
ELBO, an upper bound on the NLL; ARM: exact next-token loss); ``unigram`` is the baseline scored
the same way (ARM: its exact cross-entropy; MDM: the same ELBO estimator on the same draws, see
:func:`unigram_elbo`); ``ctx gain`` is, for an MDM, the unigram's cross-entropy minus the
model's on the same masked tokens at a 15% mask rate (> 0 means the model uses context; 0 means
it predicts token frequencies). On a shared machine set OMP_NUM_THREADS=1: two intra-op threads
competing with other processes made a step several times slower here.

    python benchmarks/mdm_plateau.py --corpus demo/corpus --out /tmp/plateau \\
        --run mdm:lr=3e-3:batch=16:steps=400:t=stratified:seed=0 --run arm:lr=3e-3:steps=400
    python benchmarks/mdm_plateau.py --corpus demo/corpus --out /tmp/plateau --table
    python benchmarks/mdm_plateau.py --corpus demo/corpus --out /tmp/plateau --variance RUN
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data import iter_eval_batches  # noqa: E402
from trainer.objectives import MDMObjective, row_generator  # noqa: E402

EVAL_SAMPLES = 4
"""Monte Carlo times per validation row of the MDM ELBO (the unigram ELBO uses the same draws)."""
PROBE_MASK = 0.15
"""Mask rate of the context probe: low enough that most of a token's context is visible."""
PROBE_DRAWS = 2
"""Masks per validation row in the context probe."""


@dataclass
class Spec:
    """One training run of the grid."""

    objective: str = "mdm"
    model: str = "tiny-1M"
    lr: float = 1e-3
    batch: int = 16
    steps: int = 300
    t: str = "iid"
    seed: int = 0
    warmup: int = 10
    cut: float = 0.01
    """MDM: mdm.random_length_prob, the share of rows cut to a random length (paper: 0.01)."""
    every: int = 0
    """Also evaluate every this many steps (0 = only at the end): the val curve of the run."""
    weighting: str = "elbo"
    """MDM: mdm.loss_weighting, elbo (the paper's 1/p-weighted loss) or masked_mean."""

    @property
    def name(self) -> str:
        t = f"-{self.t}" if self.objective == "mdm" else ""
        t += f"-cut{self.cut:g}" if self.cut != 0.01 else ""
        t += f"-every{self.every}" if self.every else ""
        t += f"-{self.weighting}" if self.weighting != "elbo" else ""
        return (
            f"{self.objective}-{self.model}-lr{self.lr:g}-b{self.batch}-s{self.steps}"
            f"-w{self.warmup}{t}-seed{self.seed}"
        )

    @classmethod
    def parse(cls, text: str) -> Spec:
        """``objective[:key=value...]``, keys: model lr batch steps t seed warmup cut
        every weighting."""
        head, *items = text.split(":")
        spec = cls(objective=head)
        for item in items:
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or key == "objective" or not value:
                raise SystemExit(f"--run {text!r}: bad item {item!r} (keys: {list(asdict(spec))})")
            kind = type(getattr(spec, key))
            setattr(spec, key, kind(float(value)) if kind is int else kind(value))
        if spec.objective not in ("arm", "mdm") or spec.t not in ("iid", "stratified"):
            raise SystemExit(f"--run {text!r}: objective arm|mdm, t iid|stratified")
        return spec


# ----------------------------------------------------------------------------- unigram


def unigram_log_probs(corpus: Path, vocab: int) -> torch.Tensor:
    """log q(token) from the training split's counts (add-one smoothed, over the scored
    positions ``tokens[:, :-1]`` of every row)."""
    counts = torch.ones(vocab, dtype=torch.float64)
    for tokens, _, _ in iter_eval_batches(corpus, "train", batch_size=1024):
        counts += torch.bincount(tokens[:, :-1].reshape(-1), minlength=vocab)[:vocab].double()
    return (counts / counts.sum()).log()


def unigram_loss(corpus: Path, log_q: torch.Tensor) -> float:
    """Cross-entropy of the unigram on every scored token of the validation split (nats)."""
    total, count = 0.0, 0
    for tokens, _, _ in iter_eval_batches(corpus, "validation", batch_size=256):
        x = tokens[:, :-1]
        total -= float(log_q[x].sum())
        count += x.numel()
    return total / count


def unigram_elbo(corpus: Path, log_q: torch.Tensor, n_samples: int) -> float:
    """The validation ELBO estimate the trainer computes, for the unigram "model": the same
    rows, keys, times and masks (``MDMObjective.eval_draws``), each masked token scored by the
    unigram. Its expectation is :func:`unigram_loss`; with the same draws it carries the same
    Monte Carlo noise as the MDMs' ``val``, so the two compare draw for draw."""
    objective, totals, rows = MDMObjective(mask_id=len(log_q)), 0.0, 0
    for tokens, keys, _ in iter_eval_batches(corpus, "validation", batch_size=64):
        x = tokens[:, :-1]
        times, masks = objective.eval_draws(keys, n_samples, x.shape[1])
        p = (1 - objective.eps) * times + objective.eps  # [B, n]
        nll = -log_q[x][:, None, :] * masks  # [B, n, T]
        totals += float((nll.sum(-1) / (p * x.shape[1])).mean(1).sum())
        rows += x.shape[0]
    return totals / rows


# ----------------------------------------------------------------------------- runs


def train(spec: Spec, corpus: Path, out: Path) -> float:
    """Train ``spec`` with the real trainer into ``out/name``; returns the wall time (s)."""
    run_dir = out / spec.name
    overrides = [
        f"corpus={corpus}", f"objective={spec.objective}", f"model={spec.model}",
        f"steps={spec.steps}", f"optim.lr={spec.lr}", f"optim.lr_min={spec.lr / 10}",
        f"optim.warmup_min={spec.warmup}", f"batch.global_batch={spec.batch}",
        f"batch.micro_batch={spec.batch}", f"mdm.t_sampling={spec.t}",
        f"mdm.random_length_prob={spec.cut}", f"mdm.loss_weighting={spec.weighting}",
        f"seed={spec.seed}", f"run_dir={run_dir}", "tracking.enabled=false",
        f"eval.every={spec.every}", "eval.max_rows=null", f"eval.n_samples={EVAL_SAMPLES}", "eval.splits=[validation]",
        "checkpoint.every=0", "checkpoint.keep=1", "log.every=10",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline.cli", "train"]
    cmd += ["--config", str(ROOT / "configs/train/tiny-cpu.yaml"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{spec.name}: training failed (rc {proc.returncode}), see {log.name}")
    return time.perf_counter() - start


@torch.no_grad()
def context_gain(run_dir: Path, corpus: Path, log_q: torch.Tensor) -> float:
    """Unigram CE minus model CE on the same masked validation tokens at ``PROBE_MASK``."""
    from eval.measure.loading import load_model

    loaded = load_model(run_dir, device="cpu", dtype="fp32")
    model_ce, uni_ce, count = 0.0, 0.0, 0
    for tokens, keys, _ in iter_eval_batches(corpus, "validation", batch_size=32):
        x = tokens[:, :-1]
        for draw in range(PROBE_DRAWS):
            g = row_generator(int(keys[0]) + draw)
            mask = torch.rand(x.shape, generator=g) < PROBE_MASK
            logits = loaded.model(torch.where(mask, loaded.mask_id, x)).float()
            ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
            model_ce += float(ce[mask].sum())
            uni_ce -= float(log_q[x[mask]].sum())
            count += int(mask.sum())
    return (uni_ce - model_ce) / count


def measure(
    spec: Spec, corpus: Path, out: Path, log_q: torch.Tensor, unigram: dict[str, float]
) -> dict:
    """Train (unless done) and measure one run; ``unigram``: the baseline per objective (ARM:
    exact cross-entropy, MDM: the ELBO estimate on the same draws as the MDM's)."""
    run_dir = out / spec.name
    summary_path = run_dir / "summary.json"
    wall = None if summary_path.is_file() else train(spec, corpus, out)
    summary = json.loads(summary_path.read_text())
    val = summary["val"]["val/validation/loss"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["val/validation/loss"] for r in records if "val/validation/loss" in r}
    gain = context_gain(run_dir, corpus, log_q) if spec.objective == "mdm" else math.nan
    return {
        **asdict(spec),
        "name": spec.name,
        "tokens": summary["tokens"],
        "val": val,
        "unigram": unigram[spec.objective],
        "below_unigram": unigram[spec.objective] - val,
        "ctx_gain": gain,
        "val_curve": curve,
        "train_wall_s": summary["wall_s"],
        "wall_s": wall if wall is not None else summary["wall_s"],
    }


# ----------------------------------------------------------------------------- variance


@torch.no_grad()
def loss_spread(run_dir: Path, corpus: Path, batch: int, draws: int) -> dict[str, float]:
    """Std of the MDM training loss of one fixed micro-batch of ``batch`` training rows over
    ``draws`` key sets, iid vs stratified t (a trained model from ``run_dir``)."""
    from eval.measure.loading import load_model

    loaded = load_model(run_dir, device="cpu", dtype="fp32")
    tokens = next(iter_eval_batches(corpus, "train", batch_size=batch))[0]
    out = {}
    for t_sampling in ("iid", "stratified"):
        objective = MDMObjective(loaded.mask_id, t_sampling=t_sampling, loss_chunk=0)
        losses = [
            float(objective.train_loss(loaded.model, tokens, torch.arange(batch) + d * batch))
            for d in range(draws)
        ]
        out[f"{t_sampling}_mean"] = float(np.mean(losses))
        out[f"{t_sampling}_std"] = float(np.std(losses, ddof=1))
    return out


# ----------------------------------------------------------------------------- table


def table(rows: list[dict]) -> str:
    head = (
        "| run | model | lr | warmup | batch | steps | tokens | t | cut | seed | val | unigram | "
        "unigram - val | ctx gain | wall s |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        t = r["t"] if r["objective"] == "mdm" else "-"
        cut = f"{r.get('cut', 0.01):g}" if r["objective"] == "mdm" else "-"
        gain = "-" if math.isnan(r["ctx_gain"]) else f"{r['ctx_gain']:+.3f}"
        lines.append(
            f"| {r['objective']} | {r['model']} | {r['lr']:g} | {r['warmup']} | {r['batch']} | "
            f"{r['steps']} | "
            f"{r['tokens'] / 1e6:.2f}M | {t} | {cut} | {r['seed']} | {r['val']:.3f} | "
            f"{r['unigram']:.3f} | {r['below_unigram']:+.3f} | {gain} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a built corpus (e.g. demo/corpus)")
    ap.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    ap.add_argument("--run", action="append", default=[], help="a run spec (see module doc)")
    ap.add_argument("--table", action="store_true", help="print the table of results.jsonl")
    ap.add_argument("--variance", metavar="RUN", help="loss spread iid vs stratified of a run")
    ap.add_argument("--draws", type=int, default=32, help="--variance: key sets per mode")
    ap.add_argument("--batches", default="16", help="--variance: micro-batch sizes, e.g. 16,64")
    args = ap.parse_args(argv)
    corpus, out = Path(args.corpus).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.variance:
        for batch in map(int, args.batches.split(",")):
            spread = loss_spread(out / args.variance, corpus, batch, args.draws)
            print(json.dumps({"run": args.variance, "batch": batch, **spread}))
        return 0
    if args.run:
        vocab = json.loads((corpus / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        log_q = unigram_log_probs(corpus, vocab)
        unigram = {"arm": unigram_loss(corpus, log_q)}
        unigram["mdm"] = unigram_elbo(corpus, log_q, EVAL_SAMPLES)
        print(f"unigram on validation: {unigram['arm']:.4f} nats, as an ELBO on the MDM's "
              f"draws: {unigram['mdm']:.4f}", flush=True)  # fmt: skip
        for text in args.run:
            row = measure(Spec.parse(text), corpus, out, log_q, unigram)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    if args.table or not args.run:
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
