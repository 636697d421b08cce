"""``maskscale demo``: the whole flow on the embedded default corpus, small enough for a CPU.

1. write the State of the Union addresses as a raw SlimPajama-style dump,
2. build the packed corpus (dedup, temporal split at 1990, BPE, packing),
3. train a tiny ARM and a tiny MDM at the same FLOP budget on DeepSpeed,
4. print where their MLflow runs, checkpoints and loss curves are.

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
    d.add_argument("--flops", type=float, default=5e12, help="training FLOP budget per model")
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


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = build_default_corpus(work)
    if args.skip_train:
        return 0
    results = train_pair(work, corpus, args.flops)
    print("\n[demo] done.")
    for objective, summary in results.items():
        loss = summary.get("final_val_loss", summary.get("final_loss"))
        print(f"  {objective.upper()}: {summary.get('steps')} steps, loss {loss}, "
              f"run dir {work / 'runs' / objective}")  # fmt: skip
    print(f"  MLflow: mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}")
    return 0
