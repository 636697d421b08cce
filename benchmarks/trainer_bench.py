"""Trainer benchmarks: MDM vs ARM step time, data loader headroom, DeepSpeed overhead.

Three questions, each answered with medians over repeated steps and printed as ratios:

1. Does the MDM objective cost more than the ARM one on the same model and batch?
   (goal: MDM/ARM step-time ratio <= 1.05; both use T positions per row, same FLOPs)
2. Can the memory-mapped loader feed the trainer? loader rows/s vs rows/s the trainer
   consumes (goal >= 20x, so data never stalls a step).
3. What does the DeepSpeed engine cost over a plain torch loop (same model, AdamW,
   accumulation and clipping)? (CPU only; on GPU DeepSpeed is the point.)

    python benchmarks/trainer_bench.py                  # CPU defaults (~1 min on 2 cores)
    python benchmarks/trainer_bench.py --tiny           # seconds: smoke run of every part
    python benchmarks/trainer_bench.py --device cuda --models 170M,1028M --seq-len 2048 \\
        --precision bf16 --zero-stage 2 --skip-plain    # GPU throughput + MFU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.configlib import from_dict  # noqa: E402
from pipeline.shards import MANIFEST, ShardMeta, ShardWriter  # noqa: E402
from trainer.budget import peak_flops  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.engine import build_engine, init_distributed, train_step  # noqa: E402
from trainer.model import Transformer, flops_per_token  # noqa: E402
from trainer.objectives import build_objective  # noqa: E402
from trainer.presets import load_preset  # noqa: E402


class SyntheticLoader:
    """Random rows with unique keys, pre-generated so data costs nothing in step timings."""

    def __init__(self, micro: int, seq_len: int, vocab: int, n: int = 8):
        g = torch.Generator().manual_seed(0)
        self.batches = [
            torch.randint(0, vocab, (micro, seq_len + 1), generator=g) for _ in range(n)
        ]
        self.micro, self.i, self.epoch = micro, 0, 0

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.batches[self.i % len(self.batches)]
        keys = torch.arange(self.i * self.micro, (self.i + 1) * self.micro)
        self.i += 1
        return tokens, keys


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args, name: str, causal: bool, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    model_cfg = load_preset(name, vocab_size=args.vocab, seq_len=args.seq_len)
    with torch.device(device):  # initialise in place (a 1B model on CPU takes a while)
        return Transformer(model_cfg, causal=causal)


def time_engine(args, name: str, objective_name: str, device: torch.device) -> list[float]:
    """Step times of the real DeepSpeed engine + train_step for one objective."""
    cfg = from_dict(
        TrainConfig,
        {
            "corpus": "synthetic",
            "objective": objective_name,
            "budget": {"steps": 10**6},
            "precision": args.precision,
            "zero_stage": args.zero_stage,
            "batch": {"global_batch": args.micro * args.accum, "micro_batch": args.micro},
        },
    )
    objective = build_objective(objective_name, mask_id=args.vocab)
    engine = build_engine(cfg, make_model(args, name, objective.causal, device), 10**6, 1)
    loader = SyntheticLoader(args.micro, args.seq_len, args.vocab)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(engine, loader, objective, args.accum, device, i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times[args.warmup :]


def time_plain(args, name: str, device: torch.device) -> list[float]:
    """The same ARM steps with a plain torch loop: AdamW, accumulation, clipping."""
    model = make_model(args, name, True, device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    objective = build_objective("arm", args.vocab)
    loader = SyntheticLoader(args.micro, args.seq_len, args.vocab)
    times = []
    for _ in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.accum):
            tokens, keys = loader.next_micro_batch()
            loss = objective.train_loss(model, tokens.to(device), keys) / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[args.warmup :]


def make_corpus(root: Path, rows: int, seq_len: int, vocab: int) -> Path:
    """A one-split corpus of random rows (only what CorpusLoader reads)."""
    meta = ShardMeta("bench", vocab, 0, vocab, seq_len, "train")
    rng = np.random.default_rng(0)
    shards, per_shard = [], 4096
    for i, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        with ShardWriter(root / "train" / f"00000_{i:05d}.arrow", meta) as w:
            for lo in range(0, n, 1024):
                w.write(rng.integers(0, vocab, (min(1024, n - lo), seq_len + 1)), "bench")
        shards.append({"path": f"train/00000_{i:05d}.arrow", "rows": n})
    manifest = {"seq_len": seq_len, "splits": {"train": {"rows": rows, "shards": shards}}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def loader_rows_per_s(args) -> float:
    from trainer.data import CorpusLoader

    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp), args.loader_rows, args.seq_len, args.vocab)
        loader = CorpusLoader(corpus, micro_batch=args.micro, global_batch=args.micro * args.accum)
        for _ in range(5):
            loader.next_micro_batch()
        n = max(20, args.loader_rows // args.micro // 2)
        t0 = time.perf_counter()
        for _ in range(n):
            loader.next_micro_batch()
        return n * args.micro / (time.perf_counter() - t0)


def report_model(args, name: str, device: torch.device) -> dict:
    rows_per_step = args.micro * args.accum
    tokens_per_step = rows_per_step * args.seq_len
    model_cfg = load_preset(name, vocab_size=args.vocab, seq_len=args.seq_len)
    fpt = flops_per_token(model_cfg)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out: dict = {"model": name, "micro": args.micro, "tokens_per_step": tokens_per_step}
    for objective in ("arm", "mdm"):
        med = statistics.median(time_engine(args, name, objective, device))
        tps = tokens_per_step / med
        out[objective] = {"step_s": med, "tokens_per_s": tps}
        if peak:
            out[objective]["mfu"] = fpt * tps / peak
        mfu = f" MFU {out[objective]['mfu']:.1%}" if peak else ""
        print(f"  {name} {objective}: {med * 1e3:8.1f} ms/step  {tps:12,.0f} tokens/s{mfu}")
    out["mdm_over_arm"] = out["mdm"]["step_s"] / out["arm"]["step_s"]
    print(f"  {name} MDM/ARM step-time ratio: {out['mdm_over_arm']:.3f}  (goal <= 1.05)")
    if not args.skip_plain:
        plain = statistics.median(time_plain(args, name, device))
        out["plain_torch_step_s"] = plain
        out["deepspeed_over_plain"] = out["arm"]["step_s"] / plain
        print(
            f"  {name} DeepSpeed/plain-torch step-time ratio: {out['deepspeed_over_plain']:.3f}"
            f"  ({out['arm']['step_s'] * 1e3:.1f} vs {plain * 1e3:.1f} ms)"
        )
    out["trainer_rows_per_s"] = rows_per_step / out["arm"]["step_s"]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--models",
        default="tiny-1M",
        help="comma-separated presets, each optionally NAME:MICRO to set its micro-batch",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--loader-rows", type=int, default=16384)
    p.add_argument("--skip-plain", action="store_true", help="no plain-torch comparison")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.seq_len, args.vocab, args.micro, args.accum = "tiny-0.3M", 32, 256, 4, 2
        args.warmup, args.steps, args.loader_rows = 2, 5, 2048
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    dist = init_distributed()
    device = torch.device(args.device) if args.device != "cuda" else dist.device
    print(
        f"device={device} precision={args.precision} zero={args.zero_stage} "
        f"seq_len={args.seq_len} micro={args.micro} accum={args.accum}"
    )
    results = {"args": vars(args), "models": []}
    for spec in args.models.split(","):
        name, _, micro = spec.partition(":")
        model_args = copy.copy(args)
        model_args.micro = int(micro) if micro else args.micro
        results["models"].append(report_model(model_args, name, device))
    loader = loader_rows_per_s(args)
    results["loader_rows_per_s"] = loader
    for m in results["models"]:
        ratio = loader / m["trainer_rows_per_s"]
        m["loader_over_trainer"] = ratio
        print(
            f"  loader {loader:,.0f} rows/s vs {m['model']} trainer "
            f"{m['trainer_rows_per_s']:,.1f} rows/s: {ratio:,.0f}x  (goal >= 20x)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
