"""``maskscale sweep ...``: plan, launch and fit an IsoFLOP scaling study.

    maskscale sweep plan --budgets 1e15,3e15,1e16 --sizes tiny-0.3M,tiny-1M,tiny-3M \\
        --families arm,mdm --corpus data/corpus --out sweeps/cpu \\
        [--config configs/train/tiny-cpu.yaml] [KEY=VALUE ...]
    maskscale sweep run sweeps/cpu --launcher local|slurm|ray [--parallel K] [--gpus-per-run G]
    maskscale sweep fit sweeps/cpu [--mlflow-experiment NAME] | --points FILE.csv

``plan`` writes sweeps/cpu/runs/<family>-<size>-C<budget>/config.yaml per point and
sweeps/cpu/sweep.json; ``run`` trains what is not finished (resuming interrupted runs);
``fit`` writes sweeps/cpu/fit/{report.md, fit.json, isoflop.png, scaling.png}. The parsers
import nothing heavy; each command's module loads when it runs.
"""

from __future__ import annotations

import argparse
import importlib


def _lazy(module: str, func: str):
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="an IsoFLOP grid of run configs (steps from C = 6 N D), printed and written",
        description="Resolve every (family, size, budget) point as the trainer will (N of "
        "the preset, steps = C / (6 N global_batch seq_len)), print steps, tokens, epochs of "
        "the corpus and an estimated time, and write runs/<name>/config.yaml + sweep.json. "
        "Points with less than one step are refused (listed), runs under 200 steps warned "
        "about. With --prior, each budget gets its own sizes around a prior optimum.",
    )
    p.add_argument("--budgets", required=True, help="FLOP budgets, e.g. 6e18,1e19,3e19")
    p.add_argument("--sizes", required=True,
                   help="model presets, e.g. 19M,34M,48M; `paper` = the paper's grid, "
                   "`tiny` = the tiny CPU presets; with --prior, the pool to pick from")  # fmt: skip
    p.add_argument("--families", default="arm,mdm", help="arm,mdm (default both)")
    p.add_argument("--corpus", help="corpus directory (default: the base config's)")
    p.add_argument("--out", default="sweeps/sweep", help="sweep folder (default sweeps/sweep)")
    p.add_argument("--config", help="base train YAML (default: the paper recipe)")
    p.add_argument("--name", help="sweep name, tagged on every run (default: folder name)")
    p.add_argument("--tokens-per-s", type=float, help="assumed tokens/s for time estimates")
    p.add_argument("--measured", nargs="+", metavar="RUN_DIR",
                   help="finished runs whose measured throughput sets the time estimates")  # fmt: skip
    p.add_argument("--prior", metavar="N@C|FIT.json",
                   help="space each budget's sizes (picked from --sizes) around a prior "
                   "optimum: an anchor N_opt@C, e.g. 2e8@6e18, scaled as C^--prior-exponent, or "
                   "each family's N_opt law of a previous fit.json")  # fmt: skip
    p.add_argument("--prior-exponent", type=float, default=0.5,
                   help="g of an anchor prior N_opt ~ C^g (default 0.5)")  # fmt: skip
    p.add_argument("--window", type=float, default=4.0,
                   help="with --prior: sizes within N_opt/W..N_opt*W (default 4)")  # fmt: skip
    p.add_argument("--per-budget", type=int, default=5,
                   help="with --prior: sizes per budget (default 5, at least 3)")  # fmt: skip
    p.add_argument("--replace", action="store_true",
                   help="the sweep becomes this plan alone (default: points of earlier plans "
                   "in the folder are kept, so plans per family or budget add up)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the base config for every run, e.g. optim.lr=1e-3")  # fmt: skip
    p.set_defaults(func=_lazy("eval.studies.scaling.plan", "cmd_plan"))


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="train the sweep's unfinished runs (local, Slurm job array or Ray)",
        description="Skips finished runs (summary.json), resumes interrupted ones from their "
        "checkpoints, starts the rest. Every config is validated before anything launches.",
    )
    p.add_argument("sweep", help="sweep folder (or its sweep.json)")
    p.add_argument("--launcher", choices=["local", "slurm", "ray"], default="local")
    p.add_argument("--only", help="comma-separated run names (default: all)")
    p.add_argument("--gpus-per-run", type=int, default=0,
                   help="GPUs per node per run (0: one process on the default device)")  # fmt: skip
    p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
    p.add_argument("--cpus-per-run", type=int,
                   help="CPU cores per run (default 1); local: OMP/MKL threads of each run "
                   "(default: 1 with --parallel > 1, else inherited)")  # fmt: skip
    p.add_argument("--parallel", type=int, default=1,
                   help="local: runs at once, in the planned order (default 1)")  # fmt: skip
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time", help="slurm time limit per run, e.g. 24:00:00")
    p.add_argument("--max-parallel", type=int, help="slurm: array tasks at once")
    p.add_argument("--ray-address", help="ray cluster address (default: start a local one)")
    p.set_defaults(func=_lazy("eval.studies.scaling.run", "cmd_run"))


def _add_fit(sub) -> None:
    p = sub.add_parser(
        "fit",
        help="IsoFLOP optima, power laws L_opt(C) and N_opt(C), the ARM/MDM compute gap",
        description="Fits the finished runs on their realised compute (6 N x tokens trained; "
        "missing and failed runs are listed, budgets with fewer than 3 points reported as not "
        "fittable, a budget whose optimum lies beyond its sizes as a bound) with bootstrap "
        "intervals, and writes report.md, fit.json, isoflop.png and scaling.png, logged to an "
        "MLflow run named sweep-fit. Every loss is shown next to the unigram baseline of the "
        "training split on the same validation rows (run_dir/eval_rows.json).",
    )
    p.add_argument("sweep", nargs="?", help="sweep folder (the planned grid)")
    p.add_argument("--points", metavar="FILE.csv",
                   help="fit this table instead of a sweep: columns family,N,C,loss (optional "
                   "name, C_real); no unigram baseline, no MLflow run")  # fmt: skip
    p.add_argument("--mlflow-experiment", help="read final losses from this MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow URI (default: the sweep's, else env/default)")
    p.add_argument("--sweep-tag", help="without a sweep folder: only runs tagged sweep=NAME")
    p.add_argument("--split", default="validation", help="loss of this split (validation)")
    p.add_argument("--out", help="report folder (default SWEEP/fit, or ./fit)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the fit to MLflow")
    p.add_argument("--no-unigram", action="store_true",
                   help="skip the unigram baseline of the runs' corpus on their validation rows")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                   help="resamples of the runs (within each budget) for the intervals of the "
                   "exponents and the gap (default 1000; 0 = none)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.set_defaults(func=_lazy("eval.studies.scaling.fit", "cmd_fit"))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="scaling-law sweeps: plan an IsoFLOP grid, run it, fit the laws",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND")
    _add_plan(sub)
    _add_run(sub)
    _add_fit(sub)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)
