"""``maskscale eval ...``: measure trained runs (perplexity per split, temporal degradation).

    maskscale eval ppl RUN... [--corpus DIR] [--splits ...] [--rows N] [--mc-samples n]
    maskscale eval temporal RUN... [--match] [--max-degradation NATS]
    maskscale eval gen RUN --prompts FILE.jsonl --steps 16,32,64 [--judge ARM_RUN]
    torchrun --nproc_per_node 8 -m pipeline.cli eval ppl RUN ...   # data-parallel

The parsers import nothing heavy, so ``maskscale --help`` stays fast; each command's code is
imported when it runs. User errors exit with 2.
"""

from __future__ import annotations

import argparse
import importlib

from eval.measure.defaults import BATCH_SIZE, BOOTSTRAP, MC_SAMPLES, MIN_DOCS, ROWS, SEED


def _lazy(module: str, func: str):
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return run


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``eval ppl`` and ``eval temporal``."""
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories or export folders")
    p.add_argument("--corpus", help="corpus directory (default: the one each run trained on)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="export checkpoint STEP first")
    p.add_argument("--rows", type=int, default=ROWS, help=f"rows per split, 0 = all ({ROWS})")
    p.add_argument(
        "--mc-samples", type=int, default=MC_SAMPLES, help=f"MDM ELBO draws per row ({MC_SAMPLES})"
    )
    p.add_argument("--seed", type=int, default=SEED, help="seed of the row sample and bootstrap")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="rows per forward pass")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP,
                   help="bootstrap resamples (over documents)")  # fmt: skip
    p.add_argument("--min-docs", type=int, default=MIN_DOCS,
                   help=f"no interval for a split with fewer documents ({MIN_DOCS})")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")


def _add_ppl(sub) -> None:
    p = sub.add_parser(
        "ppl",
        help="per-token loss and perplexity on every split, with bootstrap intervals",
        description="Per split (validation + every holdout_* by default): per-token loss "
        "and perplexity (ARM exact, MDM ELBO bound; EOS padding never scored) on a seeded random "
        "sample of rows drawn across all shards, with a bootstrap 95%% interval over documents "
        "(none below --min-docs documents); rows, documents and tokens per split. Writes "
        "RUN_DIR/eval/ppl.json and ppl.csv and logs eval/<split>/... to the run's MLflow run.",
    )
    add_common_args(p)
    p.add_argument("--splits", nargs="+", help="splits (default: validation + holdout_*)")
    p.set_defaults(func=_lazy("eval.measure.ppl", "cmd_ppl"))


def _add_temporal(sub) -> None:
    p = sub.add_parser(
        "temporal",
        help="temporal degradation report: holdout - validation loss per period, with a gate",
        description="For each holdout period in date order: loss, degradation = holdout loss "
        "- validation loss (nats) and perplexity ratio, with intervals from a bootstrap over "
        "documents; for ARM/MDM pairs scored on the same rows, a paired interval for the "
        "difference of their degradations; a PNG plot, a markdown report and JSON; logged to "
        "each run's MLflow run. Runs on different corpora or tokenizers are refused. Reuses "
        "RUN_DIR/eval/ppl.json when its settings match.",
    )
    add_common_args(p)
    p.add_argument("--out", help="report folder (default: RUN_DIR/eval/temporal for one run, "
                   "else eval-temporal/ next to the runs)")  # fmt: skip
    p.add_argument(
        "--match",
        action="store_true",
        help="report only the ARM/MDM pair with the closest validation loss (and say which)",
    )
    p.add_argument(
        "--max-degradation",
        type=float,
        metavar="NATS",
        help="gate: exit 0 if every period's whole interval is <= NATS, 1 if one's whole "
        "interval is above it, else 3 (inconclusive: straddles, non-finite, too few documents)",
    )
    p.add_argument("--inconclusive", choices=("pass", "fail"),
                   help="gate: count an inconclusive outcome as pass (exit 0) or fail (exit 1)")  # fmt: skip
    p.add_argument("--allow-mixed", action="store_true",
                   help="compare runs evaluated on different corpus manifests or tokenizers")  # fmt: skip
    p.set_defaults(func=_lazy("eval.measure.temporal", "cmd_temporal"))


def _add_gen(sub) -> None:
    p = sub.add_parser(
        "gen",
        help="conditional generation: time per answer vs judge perplexity and distinct-n",
        description="For each MDM step count (an ARM run: one KV-cache pass), sample an answer "
        "to every prompt, time it (median over batches after a warm-up batch) and score it: "
        "perplexity under the --judge ARM run given the prompt, distinct-1/2. Writes gen.md, "
        "gen.json, gen.png and MT-Bench answer files (model_answer/<model_id>.jsonl) to --out "
        "(default RUN_DIR/eval/gen) and logs them to the run's MLflow run.",
    )
    p.add_argument("run", metavar="RUN", help="run directory or export folder")
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='JSONL: {"prompt": ...} or MT-Bench questions (question_id, turns)',
    )
    p.add_argument("--steps", metavar="N,N,...", help="MDM step counts (default L,L/2,L/4,L/8)")
    p.add_argument("--length", type=int, default=64, help="new tokens L per answer (64)")
    p.add_argument("--strategy", default="low-confidence", choices=("low-confidence", "random"))
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per timed batch (8)")
    p.add_argument("--seed", type=int, default=SEED, help="sampling seed (hashed per prompt)")
    p.add_argument("--judge", metavar="ARM_RUN", help="ARM run whose perplexity rates answers")
    p.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR/eval/gen)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="export checkpoint STEP first")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    p.set_defaults(func=_lazy("eval.generation.gen", "cmd_gen"))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate runs: perplexity per split, temporal degradation, zero-shot tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    _add_ppl(sub)
    _add_temporal(sub)
    _add_gen(sub)
    try:
        harness = importlib.import_module("eval.zeroshot.cli")
    except ModuleNotFoundError as e:
        if e.name != "eval.zeroshot.cli":
            raise
    else:
        harness.register(sub)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)
