"""``maskscale eval ppl``: per-token loss and perplexity of runs on every split, with intervals.

For each split (``validation`` and every ``holdout_*`` by default) a seeded random sample of
rows drawn across all shards (:mod:`eval.measure.rows`) is scored with the run's own objective
(``trainer.objectives``): ARM exact next-token cross-entropy; MDM the Monte Carlo ELBO bound
with stratified t, using the same per-row keys, draws and loss as training-time validation, so
the two agree on the same rows. Each row's mean per-token loss is kept; the split's loss is
their mean (rows have equal length, so this is the per-token mean), perplexity its exp, and a
seeded bootstrap over rows gives the 95% intervals.

Under ``torchrun`` the sample's batches are dealt to ranks (batch ``b`` -> rank ``b % world``),
per-row losses are gathered on rank 0 and put back in row order: every row is scored in the same
batch as in one process, so the result is identical. Rank 0 prints the table, writes
``RUN_DIR/eval/ppl.json`` (settings, results, per-row losses) and ``ppl.csv`` atomically, and
logs ``eval/<split>/{loss,ppl}`` and their interval bounds to the run's MLflow run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.measure.defaults import BATCH_SIZE, BOOTSTRAP, MC_SAMPLES, ROWS, SEED
from eval.measure.loading import (
    EvalError,
    LoadedModel,
    dtype_name,
    load_model,
    open_corpus,
    resolve_device,
    resolve_splits,
)
from eval.measure.outputs import log_to_mlflow, write_csv_atomic, write_json_atomic
from eval.measure.rows import (
    SplitLayout,
    batches_for_rank,
    iter_row_batches,
    sample_rows,
    split_seed,
)
from pipeline.shards import MANIFEST

FORMAT = "maskscale-eval-ppl/1"
RESULT_JSON, RESULT_CSV = "ppl.json", "ppl.csv"
ESTIMATOR = {"arm": "exact", "mdm": "elbo"}


@dataclass
class PplConfig:
    """Settings of a perplexity evaluation (recorded with its results)."""

    rows: int | None = ROWS
    """Rows sampled per split (None: every row of the split)."""
    mc_samples: int = MC_SAMPLES
    """MDM: Monte Carlo draws of t per row (stratified); ARM is exact."""
    seed: int = SEED
    """Seeds the row sample and the bootstrap (MDM masks come from each row's fixed key)."""
    batch_size: int = BATCH_SIZE
    """Rows per forward pass (per process)."""
    bootstrap: int = BOOTSTRAP
    """Bootstrap resamples for the 95% intervals."""

    def validate(self) -> None:
        if self.rows is not None and self.rows < 1:
            raise EvalError(f"--rows must be >= 1, got {self.rows}")
        for name in ("mc_samples", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')} must be >= 1")
        if self.seed < 0:
            raise EvalError(f"--seed must be >= 0, got {self.seed}")


# ----------------------------------------------------------------------------- processes


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(index: np.ndarray, losses: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray]:
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, (index, losses))
        index = np.concatenate([p[0] for p in parts])
        losses = np.concatenate([p[1] for p in parts])
    order = np.argsort(index, kind="stable")
    return index[order], losses[order]


# ----------------------------------------------------------------------------- scoring


def score_rows(
    loaded: LoadedModel,
    layout: SplitLayout,
    rows: np.ndarray,
    cfg: PplConfig,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """float64[len(rows)]: each sampled row's mean per-token loss (nats), in row order."""
    from tqdm import tqdm

    from trainer.data import EVAL_KEY_SEED, mix_keys

    objective = loaded.objective()
    n_samples = cfg.mc_samples if loaded.family == "mdm" else 1
    total = batches_for_rank(len(rows), cfg.batch_size, rank, world)
    bar = tqdm(
        total=total,
        desc=f"{loaded.name} {layout.split}",
        unit="batch",
        disable=not progress or rank != 0,
        leave=False,
    )
    index, losses = [], []
    with torch.no_grad():
        batches = iter_row_batches(
            layout, rows, cfg.batch_size, loaded.tokenizer_sha256, rank, world
        )
        for chunk, tokens in batches:
            keys = torch.from_numpy(mix_keys(chunk, EVAL_KEY_SEED))
            x = torch.from_numpy(tokens).to(loaded.device)
            losses.append(objective.eval_row_losses(loaded.model, x, keys, n_samples).numpy())
            index.append(chunk)
            bar.update()
    bar.close()
    empty = np.zeros(0)
    idx = np.concatenate(index) if index else empty.astype(np.int64)
    got_idx, got = _gather(idx, np.concatenate(losses) if losses else empty, world)
    if not np.array_equal(got_idx, rows):
        raise RuntimeError(f"gathered rows of {layout.split} do not match the sample")
    return got


def bootstrap_means(values: np.ndarray, n_boot: int, seed: list[int]) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values``."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    n, chunk = len(values), max(1, 2_000_000 // max(len(values), 1))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        out[start : start + k] = values[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


def interval(samples: np.ndarray) -> list[float]:
    """Central 95% interval of bootstrap samples."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def split_result(
    split: str, layout: SplitLayout, rows: np.ndarray, losses: np.ndarray, cfg: PplConfig, T: int
) -> dict:
    loss = float(losses.mean())
    ci = interval(bootstrap_means(losses, cfg.bootstrap, split_seed(cfg.seed, split, "boot")))
    return {
        "rows": len(rows),
        "split_rows": layout.rows,
        "tokens": len(rows) * T,
        "shards": int(len(np.unique(layout.shard_of(rows)))),
        "loss": loss,
        "loss_ci": ci,
        "ppl": _exp(loss),
        "ppl_ci": [_exp(ci[0]), _exp(ci[1])],
        "row_index": rows.tolist(),
        "row_loss": losses.tolist(),
    }


# ----------------------------------------------------------------------------- runs


def settings_for(loaded: LoadedModel, corpus_dir: Path, cfg: PplConfig) -> dict:
    """Everything the numbers depend on; equal settings -> a saved result can be reused."""
    manifest_sha = hashlib.sha256((corpus_dir / MANIFEST).read_bytes()).hexdigest()
    return {
        "corpus": str(corpus_dir.resolve()),
        "corpus_manifest_sha256": manifest_sha,
        "rows": cfg.rows,
        "mc_samples": cfg.mc_samples if loaded.family == "mdm" else None,
        "seed": cfg.seed,
        "bootstrap": cfg.bootstrap,
        "dtype": dtype_name(loaded.dtype),
        "model": loaded.fingerprint(),
    }


def saved_results(loaded: LoadedModel, settings: dict) -> dict:
    """{split: result} of RUN_DIR/eval/ppl.json when it was made with exactly ``settings``."""
    path = loaded.out_dir / RESULT_JSON
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return {}
    return saved.get("splits", {}) if saved.get("settings") == settings else {}


def evaluate_run(
    loaded: LoadedModel,
    corpus_dir: Path,
    manifest: dict,
    splits: list[str],
    cfg: PplConfig,
    reuse: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict:
    """The ppl result of one run on ``splits`` (saved splits reused when ``reuse``)."""
    settings = settings_for(loaded, corpus_dir, cfg)
    cached = saved_results(loaded, settings) if reuse else {}
    result = {
        "format": FORMAT,
        "run": loaded.name,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "export_dir": str(loaded.export_dir),
        "out_dir": str(loaded.out_dir),
        "family": loaded.family,
        "step": loaded.step,
        "tokens_trained": loaded.info.get("tokens"),
        "estimator": ESTIMATOR[loaded.family],
        "settings": settings,
        "splits": {},
        "reused": [],
    }
    for split in splits:
        if split in cached:
            result["splits"][split] = cached[split]
            result["reused"].append(split)
            continue
        layout = SplitLayout.from_manifest(corpus_dir, manifest, split)
        rows = sample_rows(layout.rows, cfg.rows, cfg.seed, split)
        losses = score_rows(loaded, layout, rows, cfg, rank, world, progress)
        result["splits"][split] = split_result(split, layout, rows, losses, cfg, loaded.seq_len)
    return result


def csv_rows(result: dict) -> list[dict]:
    out = []
    for split, r in result["splits"].items():
        out.append({
            "run": result["run"], "family": result["family"], "step": result["step"],
            "split": split, "estimator": result["estimator"], "rows": r["rows"],
            "tokens": r["tokens"], "loss": r["loss"], "loss_lo": r["loss_ci"][0],
            "loss_hi": r["loss_ci"][1], "ppl": r["ppl"], "ppl_lo": r["ppl_ci"][0],
            "ppl_hi": r["ppl_ci"][1], "mc_samples": result["settings"]["mc_samples"],
            "seed": result["settings"]["seed"],
        })  # fmt: skip
    return out


def metrics_of(result: dict) -> dict[str, float]:
    """MLflow metrics: eval/<split>/{loss,ppl} and their interval bounds."""
    out = {}
    for split, r in result["splits"].items():
        for key in ("loss", "ppl"):
            out[f"eval/{split}/{key}"] = r[key]
            out[f"eval/{split}/{key}_lo"], out[f"eval/{split}/{key}_hi"] = r[f"{key}_ci"]
    return out


def save_results(loaded: LoadedModel, result: dict) -> list[Path]:
    """Write ppl.json/ppl.csv (atomic; splits of an equal-settings file are kept) and log
    them to MLflow. Returns the files written."""
    merged = dict(result)
    merged["splits"] = {**saved_results(loaded, result["settings"]), **result["splits"]}
    merged.pop("reused", None)
    out = loaded.out_dir
    paths = [
        write_json_atomic(out / RESULT_JSON, merged),
        write_csv_atomic(out / RESULT_CSV, csv_rows(merged)),
    ]
    log_to_mlflow(loaded.run_dir, metrics_of(result), loaded.step or 0, paths)
    return paths


def format_table(results: list[dict]) -> str:
    head = f"{'run':<18}{'step':>7}  {'split':<16}{'rows':>6}  {'loss':>7} {'95% CI':<17}"
    head += f"{'ppl':>9} 95% CI"
    lines = [head, "-" * len(head)]
    for res in results:
        for split, r in res["splits"].items():
            lo, hi = r["loss_ci"]
            plo, phi = r["ppl_ci"]
            lines.append(
                f"{res['run'][:17]:<18}{res['step'] or 0:>7}  {split:<16}{r['rows']:>6}  "
                f"{r['loss']:>7.4f} [{lo:.4f}, {hi:.4f}]{r['ppl']:>9.2f} [{plo:.2f}, {phi:.2f}]"
            )
    families = {res["family"] for res in results}
    if "mdm" in families:
        lines.append("MDM: ELBO bound (Monte Carlo, stratified t); ARM: exact.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def prepare_runs(args: argparse.Namespace) -> list[tuple[str, Path, dict, list[str]]]:
    """Check every run, corpus and split before anything is computed or written:
    [(run path, corpus dir, manifest, splits)]."""
    plans = []
    for path in args.runs:
        info = load_model(path, args.checkpoint, args.device, args.dtype, weights=False)
        corpus_dir, manifest = open_corpus(info, args.corpus)
        splits = resolve_splits(manifest, getattr(args, "splits", None), corpus_dir)
        plans.append((path, corpus_dir, manifest, splits))
    return plans


def config_from_args(args: argparse.Namespace) -> PplConfig:
    cfg = PplConfig(
        rows=None if args.rows == 0 else args.rows,
        mc_samples=args.mc_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
    )
    cfg.validate()
    return cfg


def run_ppl(args: argparse.Namespace, reuse: bool = False) -> tuple[list[dict], int]:
    """Evaluate every run of ``args``; returns (results, rank). Rank 0 saves them."""
    cfg = config_from_args(args)
    rank, world = init_distributed(resolve_device(args.device))
    plans = prepare_runs(args)
    results = []
    for path, corpus_dir, manifest, splits in plans:
        loaded = load_model(path, args.checkpoint, args.device, args.dtype)
        result = evaluate_run(loaded, corpus_dir, manifest, splits, cfg, reuse, rank, world)
        if rank == 0 and len(result["reused"]) < len(result["splits"]):
            save_results(loaded, result)  # something new: write and log it
        results.append(result)
        del loaded
    return results, rank


def cmd_ppl(args: argparse.Namespace) -> int:
    try:
        results, rank = run_ppl(args)
    except EvalError as e:
        print(f"maskscale eval ppl: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_table(results))
        for res in results:
            print(f"results: {Path(res['out_dir']) / RESULT_JSON} (+ .csv)")
    return 0
