"""``maskscale demo``: the whole system on the embedded default corpus, small enough for a CPU.

1. write the State of the Union addresses as a raw dump and build the packed corpus (dedup,
   temporal split at 1990 with a holdout per later decade, BPE, packing);
2. train a tiny ARM and a tiny MDM at the same FLOP budget (DeepSpeed, tracked in MLflow);
3. perplexity on validation and every holdout (``maskscale eval ppl``), and the unigram
   baseline of the training split on the same rows;
4. the temporal degradation report (``maskscale eval temporal``);
5. the temporal cloze task (``maskscale eval cloze``);
6. a few sampled texts from each model (when this install has the sampler);

then ONE summary table (unigram / ARM / MDM loss per split, cloze accuracy) and how to open the
results in MLflow. Everything is logged to the runs' MLflow runs as well as written to disk.

The demo is the top of the house: it drives the pipeline, the trainer and the evaluation, so it
lives in ``eval/`` (imports point eval -> trainer -> pipeline). Its settings (budget, recipe,
evaluation sizes) are in ``configs/demo.yaml``; ``--quick`` runs its short variant. Every stage
resumes or reuses what exists: rerunning after an interruption picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

STAGES = 6


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="the whole flow on the embedded default corpus (CPU): corpus, ARM + MDM, evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--dir", default="demo", help="working directory (default: ./demo)")
    d.add_argument("--config", help="demo settings YAML (default: configs/demo.yaml)")
    d.add_argument("--quick", action="store_true", help="short variant (the config's quick:)")
    d.add_argument("--flops", type=float, help="training FLOP budget per model (train.flops)")
    d.add_argument("--skip-train", action="store_true", help="only build the corpus")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.rows=0")
    d.set_defaults(func=cmd_demo)


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


@contextmanager
def stage(index: int, title: str):
    say(f"({index}/{STAGES}) {title}")
    start = time.perf_counter()
    yield
    say(f"({index}/{STAGES}) done in {time.perf_counter() - start:.1f} s")


def recipe_path(name: str) -> Path:
    """A recipe named in the demo config: absolute, or relative to the config folder."""
    from pipeline.configdir import config_path

    return Path(name) if Path(name).is_absolute() else config_path(name)


# ----------------------------------------------------------------------------- corpus, training


def build_default_corpus(work: Path, cfg, quiet: bool = False) -> Path:
    from pipeline.build import build_corpus
    from pipeline.config import CorpusConfig
    from pipeline.configlib import load_config
    from pipeline.default_dump import write_default_dump
    from pipeline.manifest import summary_table

    raw, corpus = work / "raw", work / "corpus"
    if not any(raw.glob("chunk1/*.jsonl.zst")):
        paths = write_default_dump(str(raw))
        say(f"wrote the default dump: {len(paths)} files in {raw}")
    overrides = [f"input=[{raw}]", f"output={corpus}", *cfg.corpus_overrides()]
    recipe = recipe_path(cfg.corpus)
    corpus_cfg = load_config(CorpusConfig, recipe, overrides)
    say(f"building the corpus from {recipe} (datatrove stages; resumes if interrupted)")
    manifest = build_corpus(corpus_cfg, progress=not quiet)
    print(summary_table(manifest))
    return corpus


def train_pair(work: Path, corpus: Path, cfg) -> dict[str, dict]:
    """Train (or resume, or find finished) the ARM and the MDM; {family: summary}. Side by side
    in two processes when ``train.parallel`` allows (eval/demo/train.py), else in turn here."""
    from eval.demo.train import cpu_cores, train_side_by_side

    tracking = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    recipe = recipe_path(cfg.train.recipe)
    jobs = {}
    for family in ("arm", "mdm"):
        overrides = [
            f"corpus={corpus}", f"objective={family}", f"flops={cfg.train.flops}",
            f"run_dir={work / 'runs' / family}", f"tracking.uri={tracking}",
            f"tracking.experiment={cfg.experiment}", "checkpoint.resume=auto",
            *cfg.train.overrides(family),
        ]  # fmt: skip
        jobs[family] = (recipe, overrides, work / "runs" / family)
    cores = cpu_cores()
    parallel = cores >= 2 if cfg.train.parallel is None else cfg.train.parallel
    if parallel:  # create the MLflow store once: two runs migrating a new sqlite db race
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking).search_experiments()
        say(f"training a tiny ARM and a tiny MDM side by side at C = {cfg.train.flops:.2g} "
            f"FLOPs each ({max(1, cores // 2)} thread(s) each; logs: runs/*/train.log)")  # fmt: skip
        return train_side_by_side(jobs, cores)
    from trainer.cli import load_train_config
    from trainer.loop import train

    results = {}
    for family, (recipe, overrides, _) in jobs.items():
        say(f"training a tiny {family.upper()} at C = {cfg.train.flops:.2g} FLOPs")
        results[family] = train(load_train_config(str(recipe), overrides))
    return results


def plot_comparison(results: dict[str, dict], out: Path) -> Path:
    """Training loss of both runs on one figure, read from their metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family, summary in results.items():
        rows = [json.loads(x) for x in open(Path(summary["run_dir"]) / "metrics.jsonl")]
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ax.plot(*zip(*pts), label=f"{family.upper()} train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token; MDM: ELBO bound)")
    ax.set_title("Same network, same FLOPs: ARM vs MDM")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- evaluation


def _eval_argv(command: str, runs: list[str], ev) -> list[str]:
    argv = ["eval", command, *runs, "--rows", str(ev.rows), "--mc-samples", str(ev.mc_samples)]
    return argv + ["--batch-size", str(ev.batch_size), "--bootstrap", str(ev.bootstrap)]


def perplexity(runs: dict[str, str], ev) -> dict[str, dict]:
    """``maskscale eval ppl`` on both runs (saved results with equal settings are reused)."""
    from eval.measure.ppl import format_table, run_ppl
    from pipeline.cli import build_parser

    argv = _eval_argv("ppl", list(runs.values()), ev)
    say("$ maskscale " + " ".join(argv))
    results, _ = run_ppl(build_parser().parse_args(argv), reuse=True)
    print(format_table(results))
    return dict(zip(runs, results))


def unigram(corpus: Path, ppl: dict[str, dict]) -> dict[str, float]:
    """The training split's unigram loss on the rows the runs were scored on."""
    import numpy as np

    from eval.measure.unigram import unigram_baseline

    splits = next(iter(ppl.values()))["splits"]
    rows = {s: np.asarray(r["row_index"], dtype=np.int64) for s, r in splits.items()}
    return unigram_baseline(corpus, ordered_splits(corpus, list(splits)), rows)


def ordered_splits(corpus: Path, splits: list[str]) -> list[str]:
    """validation first, then the holdouts in date order (as the temporal report lists them)."""
    from eval.measure.temporal import order_periods
    from pipeline.shards import read_manifest

    config = read_manifest(corpus).get("config") or {}
    ranges = (config.get("split") or {}).get("holdout_ranges") or {}
    later = order_periods([s for s in splits if s != "validation"], dict(ranges))
    return [s for s in splits if s == "validation"] + [p["split"] for p in later]


def temporal(work: Path, runs: dict[str, str], ev) -> Path | None:
    """``maskscale eval temporal`` (reuses the ppl results); the report folder, or None."""
    from pipeline.cli import main as maskscale

    out = work / "temporal"
    argv = _eval_argv("temporal", list(runs.values()), ev) + ["--out", str(out)]
    say("$ maskscale " + " ".join(argv))
    return out if maskscale(argv) == 0 else None


def cloze(runs: dict[str, str], ev) -> dict[str, dict]:
    """``maskscale eval cloze`` on each run; {family: {split: result}} of those that ran."""
    from pipeline.cli import main as maskscale

    out = {}
    for family, run in runs.items():
        argv = ["eval", "cloze", run, "--n", str(ev.cloze_passages)]
        argv += ["--words", str(ev.cloze_words), "--mc-samples", str(ev.mc_samples)]
        say("$ maskscale " + " ".join(argv))
        result = Path(run) / "eval" / "cloze-results.json"
        if maskscale(argv) == 0 and result.is_file():
            out[family] = json.loads(result.read_text())["splits"]
    return out


def sample_texts(runs: dict[str, str], ev) -> dict[str, list[dict]] | None:
    """A few samples from each run (written to RUN/eval/samples.md and logged to MLflow);
    None when this install has no sampler."""
    try:
        from eval.generation.sampling import Sampler, SamplingConfig
    except ModuleNotFoundError as e:
        if e.name != "eval.generation.sampling":
            raise
        say("sampling not available (this install has no eval.generation.sampling): no samples")
        return None
    from eval.measure.loading import load_model
    from eval.measure.outputs import log_to_mlflow, write_text_atomic

    prompts, out = ev.prompts[: ev.samples], {}
    scfg = dict(length=ev.sample_length, steps=ev.sample_steps, temperature=ev.temperature)
    for family, run in runs.items():
        loaded = load_model(run)
        sampler = Sampler.from_loaded(loaded, SamplingConfig(**scfg, seed=0))
        ids = [loaded.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        samples = sampler.generate(ids, progress=True)
        out[family] = [
            {"prompt": p, "text": loaded.tokenizer.decode(s.tokens)}
            for p, s in zip(prompts, samples)
        ]
        lines = [f"# {family.upper()} samples ({sampler.cfg})\n"]
        lines += [f"- **{x['prompt']}**{x['text']}" for x in out[family]]
        path = write_text_atomic(loaded.out_dir / "samples.md", "\n".join(lines) + "\n")
        log_to_mlflow(loaded.run_dir, {}, loaded.step or 0, [path])
        for x in out[family]:
            print(f"  {family.upper()} | {x['prompt']} >>> {x['text']!r}")
    return out


# ----------------------------------------------------------------------------- summary


def write_summary(work: Path, runs: dict[str, str], rows: list[dict], table: str) -> list[Path]:
    """summary.json / summary.md in the demo folder, logged to both MLflow runs with the
    unigram baseline as ``eval/<split>/unigram_loss``."""
    from eval.measure.outputs import log_to_mlflow, write_json_atomic, write_text_atomic

    paths = [
        write_json_atomic(work / "summary.json", {"runs": runs, "splits": rows}),
        write_text_atomic(work / "summary.md", f"# maskscale demo\n\n```\n{table}\n```\n"),
    ]
    metrics = {f"eval/{r['split']}/unigram_loss": r["unigram"] for r in rows}
    for run in runs.values():
        step = json.loads((Path(run) / "summary.json").read_text()).get("steps", 0)
        log_to_mlflow(Path(run), metrics, step, paths)
    return paths


def evaluate(work: Path, corpus: Path, runs: dict[str, str], cfg) -> int:
    """Stages 3-6 and the summary; the exit code."""
    from eval.demo.summary import format_summary, summary_rows, where_things_are
    from eval.measure.loading import EvalError

    ev = cfg.eval
    try:
        with stage(3, "perplexity per split, and the unigram baseline on the same rows"):
            ppl = perplexity(runs, ev)
            base = unigram(corpus, ppl)
    except EvalError as e:
        say(f"evaluation failed: {e}")
        return 2
    with stage(4, "temporal degradation: each later decade against validation"):
        report = temporal(work, runs, ev)
    with stage(5, "temporal cloze: last-word accuracy per period"):
        accuracy = cloze(runs, ev) if ev.cloze_passages else {}
    with stage(6, "samples from each model"):
        if ev.samples:
            sample_texts(runs, ev)
    rows = summary_rows(ppl, base, accuracy)
    table = format_summary(rows)
    write_summary(work, runs, rows, table)
    print(f"\n[demo] summary (C = {cfg.train.flops:.2g} FLOPs per model)\n{table}\n")
    print("\n".join(where_things_are(work, runs, report, cfg.experiment)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eval.demo.config import DEFAULT, load_demo_config
    from eval.demo.train import TrainingFailed
    from pipeline.configdir import config_path

    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    overrides = list(args.overrides or [])
    if args.flops is not None:
        overrides.append(f"train.flops={args.flops}")
    cfg = load_demo_config(args.config or str(config_path(DEFAULT)), args.quick, overrides)
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with stage(1, "the embedded corpus, temporally split"):
        corpus = build_default_corpus(work, cfg)
    if args.skip_train:
        return 0
    with stage(2, "a tiny ARM and a tiny MDM at the same FLOP budget"):
        try:
            results = train_pair(work, corpus, cfg)
        except TrainingFailed as e:
            say(str(e))
            return 1
        runs = {family: summary["run_dir"] for family, summary in results.items()}
        try:
            say(f"loss curves: {plot_comparison(results, work / 'arm_vs_mdm.png')}")
        except (OSError, KeyError, ValueError) as e:
            say(f"no comparison plot: {e}")
    code = evaluate(work, corpus, runs, cfg)
    say(f"finished in {(time.perf_counter() - start) / 60:.1f} min")
    return code
