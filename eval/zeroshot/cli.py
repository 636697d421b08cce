"""``maskscale eval harness | mc | cloze``: zero-shot tasks on a trained run.

- ``harness RUN --tasks a,b`` runs lm-evaluation-harness tasks (its own, or local YAMLs under
  ``--include-path``) on the run through ``harness.MaskscaleLM``; ``--paper-tasks`` runs the
  reference's eight tasks, each with its own estimator and CFG scale
  (``configs/eval/paper-tasks.yaml``).
- ``mc RUN FILE.jsonl`` scores a local multiple-choice file (``{context, choices, label}`` per
  line) directly, without writing a task YAML.
- ``cloze RUN`` builds the temporal cloze task from the run's corpus (``cloze``) and
  reports last-word accuracy per period (letter-only target words; number targets apart,
  scored with ``--numbers``), with seeded bootstrap intervals over documents per period and for
  each period's difference from validation, the counts behind each figure, and a plot.

Every command prints a table, writes JSON under ``RUN_DIR/eval/`` (``EXPORT_DIR/eval/`` for an
export folder) and logs its metrics to the run's MLflow run. User errors (unknown task, bad
line, missing export) exit with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from eval.measure.defaults import BOOTSTRAP

# ----------------------------------------------------------------------------- shared options


def _model_options(p: argparse.ArgumentParser, estimator: str = "mc") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", type=int, metavar="STEP", help="export this step first")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, ...")
    g.add_argument(
        "--estimator",
        choices=("mc", "chain_rule"),
        default=estimator,
        help=f"MDM likelihood estimator (default {estimator}; ARMs are exact)",
    )
    g.add_argument("--cfg", type=float, default=0.0, help="unsupervised CFG scale w (MDM)")
    g.add_argument("--mc-samples", type=int, default=128, help="MC samples per continuation")
    g.add_argument(
        "--mc-weighting",
        choices=("fixed_count", "inverse_t"),
        default="fixed_count",
        help="MDM Monte Carlo estimator with --estimator mc: fixed_count (default, lower "
        "variance) or inverse_t (the 1/t form of the training loss)",
    )
    g.add_argument("--token-budget", type=int, help="tokens per forward batch")
    g.add_argument("--seed", type=int, default=0, help="seed of the MC draws")


def _model_args(args: argparse.Namespace, greedy: bool) -> dict:
    """ModelArgs fields from the options; ``greedy``: whether the metric needs is_greedy."""
    out = {"estimator": args.estimator, "cfg": args.cfg, "mc_samples": args.mc_samples}
    out["mc_weighting"] = args.mc_weighting
    out["greedy"] = greedy
    out["seed"] = args.seed
    if args.token_budget is not None:
        out["token_budget"] = args.token_budget
    return out


def _load(args: argparse.Namespace):
    """The run's model, after joining torchrun's process group if launched by it (a
    --checkpoint export is then made once, by rank 0)."""
    from eval.measure.loading import load_model, resolve_device
    from eval.measure.ppl import init_distributed

    init_distributed(resolve_device(args.device))
    return load_model(args.run, args.checkpoint, args.device, args.dtype)


def _to_mlflow(loaded, metrics: dict[str, float], files: list[Path]) -> str:
    from eval.measure.outputs import log_to_mlflow

    run_id = log_to_mlflow(loaded.run_dir, metrics, loaded.step or 0, files)
    if run_id is None:
        return "not logged to MLflow (no MLflow run recorded in the run dir, or MLflow failed)"
    return f"logged {len(metrics)} metrics to MLflow run {run_id}"


def _fails(command: str, error: Exception) -> int:
    print(f"maskscale eval {command}: {error}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- harness


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--limit must be > 0 (a count, or a fraction < 1)")
    return int(value) if value >= 1 and value.is_integer() else value


def cmd_harness(args: argparse.Namespace) -> int:
    from eval.measure.loading import EvalError
    from eval.measure.outputs import write_json_atomic
    from eval.zeroshot.harness import (
        flat_metrics,
        group_tasks,
        load_paper_tasks,
        results_name,
        run_groups,
        task_manager,
    )
    from eval.zeroshot.text import ModelArgs, parse_model_args

    try:
        base = parse_model_args(args.model_args)
        if "path" in base:
            raise EvalError("give the run as RUN, not as model arg path=")
        ModelArgs(**base).validate()
        paper = load_paper_tasks(args.paper_tasks) if args.paper_tasks else None
        tasks = [c.task for c in paper.tasks] if paper else _task_list(args.tasks)
        manager = task_manager(args.include_path, tasks)
        loaded = _load(args)
        if paper:
            groups = group_tasks(paper.tasks, loaded.family, base, paper.mc_samples)
            shots = paper.num_fewshot if args.num_fewshot is None else args.num_fewshot
        else:
            groups, shots = [(tasks, base)], args.num_fewshot
        kw = {"limit": args.limit, "num_fewshot": shots, "bootstrap_iters": args.bootstrap_iters}
        results = run_groups(loaded, groups, manager, **kw)
    except (EvalError, NotImplementedError) as e:
        return _fails("harness", e)
    if not results:
        return 0  # a data-parallel rank other than 0: rank 0 reports for every rank
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    name = "harness-paper-tasks.json" if paper else results_name(tasks)
    out = write_json_atomic(Path(args.out) if args.out else loaded.out_dir / name, results)
    print(f"results: {out}")
    if not args.no_mlflow:
        print(_to_mlflow(loaded, flat_metrics(results), [out]))
    return 0


def _task_list(text: str | None) -> list[str]:
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not tasks:
        from eval.measure.loading import EvalError

        raise EvalError("no tasks: pass --tasks NAME[,NAME...] or --paper-tasks")
    return tasks


# ----------------------------------------------------------------------------- mc


def cmd_mc(args: argparse.Namespace) -> int:
    from eval.measure.loading import EvalError
    from eval.measure.outputs import write_json_atomic
    from eval.zeroshot.tasks import TaskError, read_mc_jsonl, score_mc
    from eval.zeroshot.text import ModelArgs, TextScorer

    try:
        docs = read_mc_jsonl(args.file)
        if args.limit:
            docs = docs[: args.limit]
        margs = ModelArgs(**_model_args(args, greedy=False))  # acc never reads is_greedy
        margs.validate()
        loaded = _load(args)
        scorer = TextScorer(loaded, margs)
        result = score_mc(docs, scorer.score, args.delimiter, args.norm)
    except (EvalError, TaskError) as e:
        return _fails("mc", e)
    stem = Path(args.file).stem
    result = {"task": stem, "file": str(Path(args.file).resolve()), **result}
    result["model_args"] = dataclasses.asdict(margs)
    print(f"{'task':<24}{'n':>6}{'acc':>10}{'± se':>8}{'acc_norm':>10}{'± se':>8}")
    print(
        f"{stem:<24}{result['n']:>6}{result['acc']:>10.4f}{result['acc_stderr']:>8.4f}"
        f"{result['acc_norm']:>10.4f}{result['acc_norm_stderr']:>8.4f}"
    )
    out = write_json_atomic(
        Path(args.out) if args.out else loaded.out_dir / f"mc-{stem}.json", result
    )
    print(f"results: {out}")
    if not args.no_mlflow:
        keys = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
        metrics = {f"eval/mc/{stem}/{k}": float(result[k]) for k in keys}
        print(_to_mlflow(loaded, metrics, [out]))
    return 0


# ----------------------------------------------------------------------------- cloze


def _run_corpus(loaded, given: str | None) -> Path:
    """--corpus, else the corpus the run was trained on. Passages are text, re-encoded with the
    run's tokenizer, so any corpus will do (its tokenizer only decodes)."""
    from eval.measure.loading import EvalError

    corpus = Path(given) if given else loaded.corpus
    if corpus is None:
        raise EvalError(f"run {loaded.name} records no corpus; pass --corpus DIR")
    return corpus


def _cloze_tasks(args, loaded):
    """The built task folder: reused if it was built from the same corpus and settings."""
    import json

    from eval.zeroshot.cloze import FORMAT, INFO, ClozeConfig, build_cloze

    cfg = ClozeConfig(n=args.n, words=args.words, seed=args.draw_seed, splits=args.splits)
    cfg.min_target_chars = args.min_target_chars
    corpus = _run_corpus(loaded, args.corpus)
    task_dir = Path(args.task_dir) if args.task_dir else loaded.out_dir / "cloze"
    info_file = task_dir / INFO
    if info_file.is_file() and not args.rebuild:
        info = json.loads(info_file.read_text())
        same = info.get("config") == vars(cfg) and info.get("corpus") == str(corpus.resolve())
        if same and info.get("format") == FORMAT:
            return task_dir, info
    info = build_cloze(corpus, task_dir, cfg)
    for split, entry in info["splits"].items():
        if entry["passages"] < cfg.n:
            print(f"note: {split} gave {entry['passages']} passages (< --n {cfg.n}): "
                  f"{entry['rows']} rows, skipped {entry['skipped'] or 'none'}")  # fmt: skip
    print(
        f"built the temporal cloze task in {task_dir} (harness: --include-path {task_dir} "
        f"--tasks temporal_cloze)"
    )
    return task_dir, info


def _temporal_ppl(eval_dir: Path) -> dict[str, float] | None:
    """{split: perplexity} from `maskscale eval ppl` results in the same folder, if any."""
    import json

    from eval.measure.ppl import RESULT_JSON

    path = eval_dir / RESULT_JSON
    if not path.is_file():
        return None
    try:
        splits = json.loads(path.read_text())["splits"]
        return {s: float(v["ppl"]) for s, v in splits.items()}
    except (KeyError, TypeError, ValueError):
        return None


def cmd_cloze(args: argparse.Namespace) -> int:
    from eval.measure.loading import EvalError
    from eval.measure.outputs import write_json_atomic
    from eval.zeroshot.cloze import evaluate_cloze, plot_cloze, read_cloze
    from eval.zeroshot.tasks import TaskError
    from eval.zeroshot.text import ModelArgs, TextScorer

    try:
        margs = ModelArgs(**_model_args(args, greedy=True))  # accuracy = greedy unmasking
        margs.validate()
        if args.bootstrap < 1:
            raise EvalError(f"--bootstrap {args.bootstrap}: must be >= 1 (resamples per interval)")
        loaded = _load(args)
        task_dir, info = _cloze_tasks(args, loaded)
        text = TextScorer(loaded, margs)
        kw = {"n_boot": args.bootstrap, "seed": args.seed, "guided": text.guided}
        results = evaluate_cloze(read_cloze(task_dir)[1], text.score, **kw)
        numbers = None
        if args.numbers:
            numbers = evaluate_cloze(read_cloze(task_dir, numbers=True)[1], text.score, **kw)
    except (EvalError, TaskError) as e:
        return _fails("cloze", e)
    _print_cloze("target words (letters only)", results)
    if numbers is not None:
        _print_cloze("number targets (facts, not language)", numbers)
    else:
        counts = ", ".join(f"{s} {e['number_passages']}" for s, e in info["splits"].items())
        print(f"number targets left out ({counts}); --numbers scores them apart")
    eval_dir = loaded.out_dir
    ppl = _temporal_ppl(eval_dir)
    report = {
        "ppl": ppl,
        "tasks": str(task_dir),
        "build": info,
        "model_args": dataclasses.asdict(margs),
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "guided": text.guided,
        "splits": results,
        "numbers": numbers,
    }
    out = write_json_atomic(eval_dir / "cloze-results.json", report)
    title = f"temporal cloze: {loaded.name} ({loaded.family.upper()}, step {loaded.step})"
    png = plot_cloze(results, eval_dir / "cloze.png", title, ppl)
    print(f"results: {out}\nplot: {png}")
    if not args.no_mlflow:
        metrics = _cloze_metrics("eval/cloze", results)
        metrics.update(_cloze_metrics("eval/cloze_numbers", numbers or {}))
        print(_to_mlflow(loaded, metrics, [out, png]))
    return 0


def _print_cloze(title: str, results: dict) -> None:
    """One row per period: passages, the documents they come from (and complete documents
    among the passages), accuracy and its 95% interval over documents, the difference from the
    reference period with its interval, target perplexity; then why any interval is missing."""
    guided = any("cfg_perplexity" in r for r in results.values())
    ppl = "cfg ppl" if guided else "target ppl"
    ref = next((r["reference"] for r in results.values()), None)
    print(f"{title}: n passages (one per row) from docs documents ('whole' = passages that are "
          f"complete documents), accuracy, Δ = accuracy - {ref}'s; 95% intervals from bootstrap "
          "resamples over documents")  # fmt: skip
    print(f"{'period':<18}{'n':>5}{'docs':>6}{'whole':>6}{'acc':>8}{'95% CI':>17}"
          f"{'Δ':>10}{'95% CI':>19}{ppl:>12}")  # fmt: skip
    notes = []
    for split, r in results.items():
        ci = "[{:.3f}, {:.3f}]".format(*r["acc_ci"]) if not r.get("acc_ci_reason") else "-"
        delta, dci = "(ref)", ""
        if r["acc_delta"] is not None:
            delta = f"{r['acc_delta']:+.3f}"
            dci = (
                "-"
                if r.get("acc_delta_ci_reason")
                else "[{:+.3f}, {:+.3f}]".format(*r["acc_delta_ci"])
            )
        notes += [f"{split}: no interval: {r[k]}" for k in ("acc_ci_reason",) if r.get(k)]
        value = r.get("cfg_perplexity", r.get("perplexity"))
        docs = r.get("documents", "?")
        print(f"{split:<18}{r['n']:>5}{docs:>6}{r['whole_documents']:>6}{r['acc']:>8.3f}{ci:>17}"
              f"{delta:>10}{dci:>19}{value:>12.2f}")  # fmt: skip
    for note in notes:
        print("  " + note)


def _cloze_metrics(prefix: str, results: dict) -> dict[str, float]:
    """MLflow metrics of one cloze table: acc with its bounds and stderr, the difference from
    the reference with its bounds, the mean target log-likelihood (cfg_ under guidance), n."""
    out = {}
    for split, r in results.items():
        values = {"acc": r["acc"], "acc_stderr": r["acc_stderr"], "n": r["n"]}
        values["documents"] = r.get("documents", float("nan"))
        values["acc_lo"], values["acc_hi"] = r["acc_ci"]
        if r["acc_delta"] is not None:
            values["acc_delta"] = r["acc_delta"]
            values["acc_delta_lo"], values["acc_delta_hi"] = r["acc_delta_ci"]
        for key in ("mean_logprob", "cfg_mean_logprob"):
            if key in r:
                values[key] = r[key]
        kept = {k: float(v) for k, v in values.items() if math.isfinite(v)}  # empty: NaN
        out.update({f"{prefix}/{split}/{k}": v for k, v in kept.items()})
    return out


# ----------------------------------------------------------------------------- register


def register(eval_subparsers) -> None:
    """Add ``harness``, ``mc`` and ``cloze`` to ``maskscale eval``."""
    h = eval_subparsers.add_parser(
        "harness",
        help="run lm-evaluation-harness tasks on a run",
        description="Run lm-evaluation-harness tasks on a run (see eval/zeroshot/harness.py).",
    )
    h.add_argument("run", help="run directory (uses RUN/export/) or export directory")
    what = h.add_mutually_exclusive_group()
    what.add_argument("--tasks", help="comma-separated task, group or tag names")
    what.add_argument(
        "--paper-tasks",
        nargs="?",
        const="configs/eval/paper-tasks.yaml",  # found in the config folder when installed
        metavar="FILE",
        help="the reference's 8 tasks with per-task estimator/CFG "
        "(default file: configs/eval/paper-tasks.yaml)",
    )
    h.add_argument("--include-path", help="directory of extra task YAMLs (local tasks)")
    h.add_argument("--limit", type=_limit, help="examples per task (or a fraction < 1)")
    h.add_argument("--model-args", default="", help="k=v,... e.g. estimator=chain_rule,cfg=1.1")
    h.add_argument("--num-fewshot", type=int, help="shots (default: the task's, usually 0)")
    h.add_argument("--bootstrap-iters", type=int, default=1000, help="for bootstrapped stderrs")
    h.add_argument("--checkpoint", type=int, metavar="STEP", help="export this step first")
    h.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    h.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    h.add_argument("--out", help="results JSON (default RUN_DIR/eval/harness-<tasks>.json)")
    h.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow run")
    h.set_defaults(func=cmd_harness)

    m = eval_subparsers.add_parser(
        "mc",
        help="score a local multiple-choice JSONL file",
        description="Score a JSONL file of {context, choices, label} lines: acc and acc_norm.",
    )
    m.add_argument("run", help="run directory or export directory")
    m.add_argument("file", help="JSONL file, one {context, choices, label} object per line")
    m.add_argument("--delimiter", default=" ", help="text between context and choice (' ')")
    m.add_argument("--norm", choices=("chars", "bytes"), default="chars", help="acc_norm length")
    m.add_argument("--limit", type=int, help="first N questions only")
    m.add_argument("--out", help="results JSON (default RUN_DIR/eval/mc-<file stem>.json)")
    m.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow run")
    _model_options(m)
    m.set_defaults(func=cmd_mc)

    _register_cloze(eval_subparsers)


def _register_cloze(eval_subparsers) -> None:
    c = eval_subparsers.add_parser(
        "cloze",
        help="temporal cloze task: last-word accuracy per period",
        description="Build (once) and score the temporal cloze task (see eval/zeroshot/cloze.py): "
        "accuracy on letter-only target words per period, 95% bootstrap intervals over "
        "documents per period and for the difference from validation (seeded by --seed).",
    )
    c.add_argument("run", help="run directory or export directory")
    c.add_argument("--corpus", help="corpus to draw passages from (default: the run's)")
    c.add_argument("--n", type=int, default=200, help="passages per split (200)")
    c.add_argument("--words", type=int, default=40, help="words per passage incl. target (40)")
    c.add_argument("--min-target-chars", type=int, default=4, help="shortest target word (4)")
    c.add_argument("--draw-seed", type=int, default=0, help="seed of the passage draw (0)")
    c.add_argument("--splits", nargs="+", help="splits (default validation + every holdout)")
    c.add_argument("--task-dir", help="where the task files go (default RUN_DIR/eval/cloze)")
    c.add_argument("--rebuild", action="store_true", help="redraw the passages")
    c.add_argument(
        "--numbers",
        action="store_true",
        help="also score the number-target passages (years, amounts), reported apart",
    )
    c.add_argument(
        "--bootstrap", type=int, default=BOOTSTRAP, help=f"resamples per interval ({BOOTSTRAP})"
    )
    c.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow run")
    _model_options(c, estimator="chain_rule")
    c.set_defaults(func=cmd_cloze)
