"""``maskscale demo``: the whole flow on the embedded default corpus, small enough for a CPU.

1. write the State of the Union addresses as a raw SlimPajama-style dump,
2. build the packed corpus (dedup, temporal split at 1990, BPE, packing),
3. train a tiny ARM and a tiny MDM at the same FLOP budget on DeepSpeed,
4. evaluate both on every later decade (``maskscale eval temporal``: degradation of the loss
   on each holdout decade against validation, with bootstrap intervals, plot and report),
5. print where their MLflow runs, checkpoints, loss curves and the temporal report are.

Every step resumes: rerunning the demo after an interruption picks up where it stopped.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="run the whole flow on the embedded default corpus (CPU)")
    d.add_argument("--dir", default="demo", help="working directory (default: ./demo)")
    d.add_argument("--flops", type=float, default=3e12, help="training FLOP budget per model")
    d.add_argument("--skip-train", action="store_true", help="only build the corpus")
    d.set_defaults(func=cmd_demo)


def build_default_corpus(work: Path, quiet: bool = False) -> Path:
    from pipeline.build import build_corpus
    from pipeline.config import CorpusConfig
    from pipeline.configlib import load_config
    from pipeline.default_dump import write_default_dump
    from pipeline.manifest import summary_table

    raw, corpus = work / "raw", work / "corpus"
    if not any(raw.glob("chunk1/*.jsonl.zst")):
        paths = write_default_dump(str(raw))
        print(f"[demo] wrote the default dump: {len(paths)} files in {raw}")
    overrides = [f"input=[{raw}]", f"output={corpus}"]
    cfg = load_config(CorpusConfig, ROOT / "configs/corpus/sotu.yaml", overrides)
    print("[demo] building the corpus (datatrove stages; resumes if interrupted)")
    manifest = build_corpus(cfg, progress=not quiet)
    print(summary_table(manifest))
    return corpus


def train_pair(work: Path, corpus: Path, flops: float) -> dict[str, dict]:
    from trainer.cli import load_train_config
    from trainer.loop import train

    results = {}
    tracking = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    for objective in ("arm", "mdm"):
        overrides = [
            f"corpus={corpus}", f"objective={objective}", f"flops={flops}",
            f"run_dir={work / 'runs' / objective}", f"tracking.uri={tracking}",
            "tracking.experiment=maskscale-demo", "checkpoint.resume=auto",
        ]  # fmt: skip
        cfg = load_train_config(str(ROOT / "configs/train/tiny-cpu.yaml"), overrides)
        print(f"[demo] training a tiny {objective.upper()} at C = {flops:.2g} FLOPs")
        results[objective] = train(cfg)
    return results


def comparison_table(results: dict[str, dict]) -> str:
    """Validation loss per split, ARM vs MDM (MDM: an upper bound, the ELBO)."""
    splits = sorted({k.split("/")[1] for r in results.values() for k in r.get("val", {})})
    lines = [f"{'split':<16}" + "".join(f"{o.upper():>10}" for o in results)]
    for split in splits:
        cells = "".join(f"{r['val'].get(f'val/{split}/loss', float('nan')):>10.3f}"
                        for r in results.values())  # fmt: skip
        lines.append(f"{split:<16}{cells}")
    return "\n".join(lines)


def plot_comparison(results: dict[str, dict], out: Path) -> Path:
    """Training loss of both runs on one figure, read from their metrics.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for objective, summary in results.items():
        rows = [json.loads(x) for x in open(Path(summary["run_dir"]) / "metrics.jsonl")]
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        ax.plot(*zip(*pts), label=f"{objective.upper()} train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token; MDM: ELBO bound)")
    ax.set_title("Same network, same FLOPs: ARM vs MDM")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def temporal_report(
    work: Path, results: dict[str, dict], rows: int = 64, mc_samples: int = 8
) -> Path | None:
    """``maskscale eval temporal`` on the demo's runs (through the CLI, so pipeline/ does not
    import eval/); returns the report folder, or None when the corpus cannot support one."""
    from pipeline.cli import main as maskscale

    out = work / "temporal"
    runs = [summary["run_dir"] for summary in results.values()]
    print("\n[demo] temporal degradation: each later decade against validation")
    argv = ["eval", "temporal", *runs, "--rows", str(rows), "--mc-samples", str(mc_samples)]
    argv += ["--out", str(out)]
    return out if maskscale(argv) == 0 else None


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = build_default_corpus(work)
    if args.skip_train:
        return 0
    results = train_pair(work, corpus, args.flops)
    print("\n[demo] done. Validation loss after training (holdouts are later decades):")
    print(comparison_table(results))
    try:
        print(f"  loss curves: {plot_comparison(results, work / 'arm_vs_mdm.png')}")
    except (OSError, KeyError, ValueError) as e:
        print(f"  (no comparison plot: {e})")
    report = temporal_report(work, results)
    print("\n[demo] where things are:")
    for objective in results:
        print(f"  {objective.upper()} run: {work / 'runs' / objective} (loss_curve.png, export/)")
    if report is not None:
        print(f"  temporal report: {report / 'temporal.md'}  plot: {report / 'temporal.png'}")
    print(f"  MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}")
    return 0
