"""``maskscale eval ppl``: per-token loss and perplexity of runs on every split, with intervals.

For each split (``validation`` and every ``holdout_*`` by default) a seeded random sample of
rows drawn across all shards (``rows``) is scored with the run's own objective
(``trainer.objectives``): ARM exact next-token cross-entropy; MDM the Monte Carlo ELBO bound
with stratified t, using the same per-row keys, draws and loss as training-time validation, so
the two agree on the same rows. Padding is never scored. Every scored position's loss is
credited to its document (``documents``); the split's loss is summed loss / scored tokens,
perplexity its exp, and a seeded bootstrap over *documents* (``resample``) gives the 95%
intervals -- none for a split with fewer than ``--min-docs`` documents. Every result states
its rows, documents and scored tokens.

Under ``torchrun`` the sample's batches are dealt to ranks (batch ``b`` -> rank ``b % world``),
per-row and per-document sums are gathered on rank 0 and put back in order: every row is scored
in the same batch as in one process, so the result is identical. Rank 0 prints the table, writes
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

from eval.measure.defaults import BATCH_SIZE, BOOTSTRAP, MC_SAMPLES, MIN_DOCS, ROWS, SEED
from eval.measure.documents import DocumentIndex
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
from eval.measure.resample import describe, interval, ratio_samples, why_no_interval
from eval.measure.rows import (
    SplitLayout,
    batches_for_rank,
    iter_row_batches,
    sample_rows,
    split_seed,
)
from pipeline.shards import MANIFEST

FORMAT = "maskscale-eval-ppl/2"
"""2: losses without padding, per-document sums, intervals over documents."""
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
    """Bootstrap resamples (over documents) for the 95% intervals."""
    min_docs: int = MIN_DOCS
    """A split with fewer documents gets its loss but no interval."""

    def validate(self) -> None:
        if self.rows is not None and self.rows < 1:
            raise EvalError(f"--rows must be >= 1, got {self.rows}")
        for name in ("mc_samples", "batch_size", "bootstrap", "min_docs"):
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


def _gather(parts: dict[str, np.ndarray], world: int) -> dict[str, np.ndarray]:
    """Concatenate every rank's arrays (same keys) on all ranks."""
    if world == 1:
        return parts
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, parts)
    return {k: np.concatenate([g[k] for g in gathered]) for k in parts}


# ----------------------------------------------------------------------------- scoring


@dataclass
class SplitScores:
    """What a split's sample scored to: sums per row and per document (padding left out)."""

    rows: np.ndarray
    """int64: the sampled rows, sorted."""
    row_sum: np.ndarray
    """float64 per row: summed loss over its scored positions."""
    row_tokens: np.ndarray
    """int64 per row: its scored positions."""
    doc_id: np.ndarray
    """int64: the documents touched by the sample, sorted (ids of ``documents.py``)."""
    doc_sum: np.ndarray
    doc_tokens: np.ndarray

    @property
    def loss(self) -> float:
        return float(self.row_sum.sum() / max(int(self.row_tokens.sum()), 1))


def _reduce(
    keys: tuple[np.ndarray, ...], values: np.ndarray, counts: np.ndarray, group: int | None = None
):
    """Sum ``values`` and ``counts`` over equal tuples of the first ``group`` keys (default all),
    in a fixed order (sorted by every key, ties in input order), so the float sums do not
    depend on how rows were dealt to processes. Returns (first key of each group per key
    array, sums, counts)."""
    order = np.lexsort(keys[::-1])
    sorted_keys = [k[order] for k in keys]
    change = np.zeros(len(order), bool)
    for k in sorted_keys[:group]:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change | (np.arange(len(order)) == 0))
    if len(order) == 0:
        return [k[:0] for k in keys], values[:0], counts[:0]
    return ([k[starts] for k in sorted_keys], np.add.reduceat(values[order], starts),
            np.add.reduceat(counts[order], starts))  # fmt: skip


def score_rows(
    loaded: LoadedModel,
    layout: SplitLayout,
    rows: np.ndarray,
    cfg: PplConfig,
    documents: DocumentIndex,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> SplitScores:
    """Score the sampled ``rows``: per-position losses, summed per row and per document."""
    from tqdm import tqdm

    from trainer.data import EVAL_KEY_SEED, mix_keys

    objective = loaded.objective()
    n_samples = cfg.mc_samples if loaded.family == "mdm" else 1
    shift = 1 if loaded.family == "arm" else 0  # ARM position j scores token j+1
    total = batches_for_rank(len(rows), cfg.batch_size, rank, world)
    bar = tqdm(total=total, desc=f"{loaded.name} {layout.split}", unit="batch",
               disable=not progress or rank != 0, leave=False)  # fmt: skip
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("rows", "sum", "tokens", "seg_row",
                                                           "seg_doc", "seg_sum", "seg_tokens")}  # fmt: skip
    with torch.no_grad():
        batches = iter_row_batches(layout, rows, cfg.batch_size, loaded.tokenizer_sha256, rank, world)  # fmt: skip
        for chunk, tokens, lengths in batches:
            keys = torch.from_numpy(mix_keys(chunk, EVAL_KEY_SEED))
            x = torch.from_numpy(tokens).to(loaded.device)
            losses, scored = objective.eval_token_losses(
                loaded.model, x, keys, n_samples, torch.from_numpy(lengths)
            )
            losses, scored = losses.numpy(), scored.numpy()
            ids = documents.token_ids(chunk, tokens)[:, shift : shift + scored.shape[1]]
            if (ids[scored] < 0).any():
                raise RuntimeError(f"{layout.split}: a scored position lies in padding")
            counts = scored.sum(axis=1).astype(np.int64)
            parts["rows"].append(chunk)
            parts["sum"].append(losses.sum(axis=1))
            parts["tokens"].append(counts)
            (seg_row, seg_doc), seg_sum, seg_tokens = _reduce(
                (np.repeat(chunk, counts), ids[scored]),
                losses[scored],
                np.ones(counts.sum(), np.int64),
            )  # one (row, document) piece each, summed in position order
            for key, value in zip(("seg_row", "seg_doc", "seg_sum", "seg_tokens"),
                                  (seg_row, seg_doc, seg_sum, seg_tokens)):  # fmt: skip
                parts[key].append(value)
            bar.update()
    bar.close()
    ints = {"rows", "tokens", "seg_row", "seg_doc", "seg_tokens"}
    mine = {k: np.concatenate(v) if v else np.zeros(0, np.int64 if k in ints else np.float64)
            for k, v in parts.items()}  # fmt: skip
    got = _gather(mine, world)
    order = np.argsort(got["rows"], kind="stable")
    if not np.array_equal(got["rows"][order], rows):
        raise RuntimeError(f"gathered rows of {layout.split} do not match the sample")
    # a document's pieces, in (document, row) order whatever the process that scored them
    (doc_id, _), doc_sum, doc_tokens = _reduce(
        (got["seg_doc"], got["seg_row"]), got["seg_sum"], got["seg_tokens"], group=1
    )
    return SplitScores(rows, got["sum"][order], got["tokens"][order], doc_id, doc_sum, doc_tokens)


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def split_result(layout: SplitLayout, scores: SplitScores, cfg: PplConfig, seed) -> dict:
    """The JSON record of one split: loss, interval over documents (or why none), sizes."""
    loss, n_docs = scores.loss, len(scores.doc_id)
    tokens = int(scores.row_tokens.sum())
    reason = why_no_interval(n_docs, loss, cfg.min_docs)
    ci = None
    if reason is None:
        ci = interval(ratio_samples(scores.doc_sum, scores.doc_tokens, cfg.bootstrap, seed))
    return {
        "rows": len(scores.rows),
        "split_rows": layout.rows,
        "documents": n_docs,
        "tokens": tokens,
        "shards": int(len(np.unique(layout.shard_of(scores.rows)))),
        "loss": loss,
        "loss_ci": ci,
        "ppl": _exp(loss),
        "ppl_ci": None if ci is None else [_exp(ci[0]), _exp(ci[1])],
        "interval": describe(n_docs, tokens, len(scores.rows), cfg.bootstrap, reason),
        "no_interval": reason,
        "row_index": scores.rows.tolist(),
        "row_loss": (scores.row_sum / np.maximum(scores.row_tokens, 1)).tolist(),
        "row_loss_sum": scores.row_sum.tolist(),
        "row_tokens": scores.row_tokens.tolist(),
        "doc_id": scores.doc_id.tolist(),
        "doc_loss_sum": scores.doc_sum.tolist(),
        "doc_tokens": scores.doc_tokens.tolist(),
    }


# ----------------------------------------------------------------------------- runs


def settings_for(loaded: LoadedModel, corpus_dir: Path, cfg: PplConfig) -> dict:
    """Everything the numbers depend on; equal settings -> a saved result can be reused."""
    manifest_sha = hashlib.sha256((corpus_dir / MANIFEST).read_bytes()).hexdigest()
    return {
        "corpus": str(corpus_dir.resolve()),
        "corpus_manifest_sha256": manifest_sha,
        "tokenizer_sha256": loaded.tokenizer_sha256,
        "rows": cfg.rows,
        "mc_samples": cfg.mc_samples if loaded.family == "mdm" else None,
        "seed": cfg.seed,
        "bootstrap": cfg.bootstrap,
        "min_docs": cfg.min_docs,
        "format": FORMAT,
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
    documents: dict[tuple[str, str], DocumentIndex] | None = None,
) -> dict:
    """The ppl result of one run on ``splits`` (saved splits reused when ``reuse``);
    ``documents`` caches each (corpus, split)'s document index across runs."""
    documents = {} if documents is None else documents
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
        key = (str(corpus_dir.resolve()), split)
        if key not in documents:  # one pass over the split, shared by every run on it
            documents[key] = DocumentIndex(layout, manifest, manifest["tokenizer"]["eos_id"])
        scores = score_rows(loaded, layout, rows, cfg, documents[key], rank, world, progress)
        seed = split_seed(cfg.seed, split, "boot")
        result["splits"][split] = split_result(layout, scores, cfg, seed)
    return result


def csv_rows(result: dict) -> list[dict]:
    out = []
    for split, r in result["splits"].items():
        loss_ci, ppl_ci = r["loss_ci"] or [None, None], r["ppl_ci"] or [None, None]
        out.append({
            "run": result["run"], "family": result["family"], "step": result["step"],
            "split": split, "estimator": result["estimator"], "rows": r["rows"],
            "documents": r["documents"], "tokens": r["tokens"], "loss": r["loss"],
            "loss_lo": loss_ci[0], "loss_hi": loss_ci[1], "ppl": r["ppl"], "ppl_lo": ppl_ci[0],
            "ppl_hi": ppl_ci[1], "no_interval": r["no_interval"] or "",
            "mc_samples": result["settings"]["mc_samples"], "seed": result["settings"]["seed"],
        })  # fmt: skip
    return out


def metrics_of(result: dict) -> dict[str, float]:
    """MLflow metrics: eval/<split>/{loss,ppl} and their interval bounds."""
    out = {}
    for split, r in result["splits"].items():
        out[f"eval/{split}/documents"] = r["documents"]
        out[f"eval/{split}/tokens"] = r["tokens"]
        for key in ("loss", "ppl"):
            out[f"eval/{split}/{key}"] = r[key]
            if r[f"{key}_ci"] is not None:
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
    head = f"{'run':<18}{'step':>7}  {'split':<16}{'rows':>6}{'docs':>6}{'tokens':>9}  "
    head += f"{'loss':>7} {'95% CI':<17}{'ppl':>9} 95% CI"
    lines = [head, "-" * len(head)]
    notes = []
    for res in results:
        for split, r in res["splits"].items():
            if r["loss_ci"] is None:
                ci, pci = f"{'(none*)':<17}", "(none*)"
                notes.append(f"* {res['run']} {split}: {r['no_interval']}")
            else:
                ci = "[{:.4f}, {:.4f}]".format(*r["loss_ci"])
                pci = "[{:.2f}, {:.2f}]".format(*r["ppl_ci"])
            lines.append(
                f"{res['run'][:17]:<18}{res['step'] or 0:>7}  {split:<16}{r['rows']:>6}"
                f"{r['documents']:>6}{r['tokens']:>9}  {r['loss']:>7.4f} {ci}{r['ppl']:>9.2f} {pci}"
            )
    boot = results[0]["settings"]["bootstrap"] if results else 0
    lines.append(f"loss = summed loss / scored tokens (padding never scored); 95% intervals from "
                 f"{boot} bootstrap resamples over documents.")  # fmt: skip
    if "mdm" in {res["family"] for res in results}:
        lines.append("MDM: ELBO bound (Monte Carlo, stratified t); ARM: exact.")
    return "\n".join(lines + notes)


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
        min_docs=args.min_docs,
    )
    cfg.validate()
    return cfg


def run_ppl(args: argparse.Namespace, reuse: bool = False) -> tuple[list[dict], int]:
    """Evaluate every run of ``args``; returns (results, rank). Rank 0 saves them."""
    cfg = config_from_args(args)
    rank, world = init_distributed(resolve_device(args.device))
    plans = prepare_runs(args)
    results, documents = [], {}
    for path, corpus_dir, manifest, splits in plans:
        loaded = load_model(path, args.checkpoint, args.device, args.dtype)
        result = evaluate_run(
            loaded, corpus_dir, manifest, splits, cfg, reuse, rank, world, documents=documents
        )
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
