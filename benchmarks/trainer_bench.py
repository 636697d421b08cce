"""Trainer benchmarks: MDM vs ARM step time, data loader headroom, DeepSpeed overhead.

Three questions, each answered with medians over repeated steps and printed as ratios:

1. Does the MDM objective cost more than the ARM one on the same model and batch?
   (goal: MDM/ARM step-time ratio <= 1.05; both use T positions per row, same FLOPs)
2. Can the memory-mapped loader feed the trainer? loader rows/s vs rows/s the trainer
   consumes (goal >= 20x, so data never stalls a step).
3. What does the DeepSpeed engine cost over a plain torch loop (same model, AdamW,
   accumulation and clipping)? (CPU only; on GPU DeepSpeed is the point.)
4. ``--compile-compare``: compiled blocks vs eager, and ``--loss-compare``: chunked head loss
   (``--loss-chunk``) vs the plain all-logits loss; both as step-time ratios measured in the
   same run, with peak memory per variant (CUDA: max allocated; CPU: peak resident set).
5. ``--cut-compare``: forward + backward of a micro-batch with one length-cut row through the
   per-row fused attention vs the previous dense boolean mask.

    python benchmarks/trainer_bench.py                  # CPU defaults (~1 min on 2 cores)
    python benchmarks/trainer_bench.py --tiny           # seconds: smoke run of every part
    python benchmarks/trainer_bench.py --device cuda --models 170M,1028M --seq-len 2048 \\
        --precision bf16 --zero-stage 2 --skip-plain    # GPU throughput + MFU (gpu_check.sh)
    python benchmarks/trainer_bench.py --tiny --compile-compare --loss-compare --cut-compare
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
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
from trainer.compiling import compile_blocks, use_compile  # noqa: E402
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


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats; on Linux CPU, the peak RSS)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the process's peak resident set
    except OSError:
        pass


def peak_gb(device: torch.device) -> float | None:
    """Peak memory since :func:`reset_peak` in GiB (CPU: whole-process RSS, not only tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration, ValueError):
        return None


def make_model(args, name: str, causal: bool, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    model_cfg = load_preset(name, vocab_size=args.vocab, seq_len=args.seq_len)
    with torch.device(device):  # initialise in place (a 1B model on CPU takes a while)
        model = Transformer(model_cfg, causal=causal)
    model.checkpoint_every = int(args.activation_checkpointing)  # 0 = off, K = every K-th block
    return model


def time_engine(
    args,
    name: str,
    objective_name: str,
    device: torch.device,
    *,
    compiled: bool | None = None,
    loss_chunk: int | None = None,
) -> tuple[list[float], float | None]:
    """(step times, peak memory GiB) of the real DeepSpeed engine + train_step for one
    objective; ``compiled``/``loss_chunk`` default to ``--compile`` / ``--loss-chunk``."""
    compiled = use_compile(args.compile, device) if compiled is None else compiled
    loss_chunk = args.loss_chunk if loss_chunk is None else loss_chunk
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
    objective = build_objective(objective_name, mask_id=args.vocab, loss_chunk=loss_chunk)
    torch._dynamo.reset()
    model = make_model(args, name, objective.causal, device)
    if compiled:
        compile_blocks(model)
    reset_peak(device)
    engine = build_engine(cfg, model, 10**6, 1)
    loader = SyntheticLoader(args.micro, args.seq_len, args.vocab)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(engine, loader, objective, args.accum, device, i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = peak_gb(device)
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times[args.warmup :], peak


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
        times, mem = time_engine(args, name, objective, device)
        med = statistics.median(times)
        tps = tokens_per_step / med
        out[objective] = {"step_s": med, "tokens_per_s": tps, "peak_gb": mem}
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
    done = {fam: out[fam] for fam in ("arm", "mdm")}  # the run above: not timed twice
    if args.compile_compare:
        same = "compiled" if use_compile(args.compile, device) else "eager"
        out["compile"] = compare(
            args, name, device, "compiled", "eager", known={same: done}, compiled=(True, False)
        )
    if args.loss_compare:
        chunk = args.loss_chunk or 4096
        same = {chunk: "chunked", 0: "plain"}.get(args.loss_chunk)
        out["loss"] = compare(
            args, name, device, "chunked", "plain", known={same: done}, loss_chunk=(chunk, 0)
        )
    if args.cut_compare:
        out["cut"] = cut_compare(args, name, device)
    return out


def compare(
    args, name: str, device, new: str, old: str, known: dict | None = None, **variants
) -> dict:
    """Step time and peak memory of two engine variants (``variants``: option -> (new, old)),
    ARM and MDM, measured back to back in this process; ratio = new / old step time.
    ``known``: {label: {objective: {"step_s", "peak_gb"}}} already measured in this run."""
    out: dict = {}
    for objective in ("arm", "mdm"):
        row = {}
        for label, i in ((new, 0), (old, 1)):
            if label in (known or {}):
                done = known[label][objective]
                row[label] = {"step_s": done["step_s"], "peak_gb": done["peak_gb"]}
                continue
            kw = {k: v[i] for k, v in variants.items()}
            times, peak = time_engine(args, name, objective, device, **kw)
            row[label] = {"step_s": statistics.median(times), "peak_gb": peak}
        row["ratio"] = row[new]["step_s"] / row[old]["step_s"]
        out[objective] = row
        mem = " ".join(
            f"{k} {row[k]['peak_gb']:.2f} GiB" for k in (new, old) if row[k]["peak_gb"] is not None
        )
        print(
            f"  {name} {objective} {new}/{old} step-time ratio: {row['ratio']:.3f}  "
            f"({row[new]['step_s'] * 1e3:.1f} vs {row[old]['step_s'] * 1e3:.1f} ms; peak {mem})"
        )
    return out


def _dense_mask_attention(q, k, v, lengths):
    """The previous cut implementation: one SDPA call with a boolean key mask [B, 1, 1, T]."""
    keys = torch.arange(q.shape[2], device=q.device)
    mask = (keys < lengths.to(q.device)[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cut_compare(args, name: str, device) -> dict:
    """Forward + backward of an MDM micro-batch with one row cut to half length: per-row fused
    attention (``trainer/model.py: cut_attention``) vs the dense-mask path; no cut for scale."""
    import trainer.model as model_module

    model = make_model(args, name, False, device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, args.vocab, (args.micro, args.seq_len), device=device)
    cut = torch.full((args.micro,), args.seq_len)
    cut[0] = args.seq_len // 2
    fused = model_module.cut_attention

    def run(lengths) -> float:
        times = []
        for _ in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            model(ids, lengths=lengths).float().square().mean().backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        return statistics.median(times[args.warmup :])

    out = {"no_cut_s": run(None), "fused_s": run(cut)}
    try:
        model_module.cut_attention = _dense_mask_attention
        out["dense_mask_s"] = run(cut)
    finally:
        model_module.cut_attention = fused
    out["fused_over_dense"] = out["fused_s"] / out["dense_mask_s"]
    print(
        f"  {name} one cut row, fwd+bwd: per-row fused {out['fused_s'] * 1e3:.1f} ms, dense mask "
        f"{out['dense_mask_s'] * 1e3:.1f} ms (ratio {out['fused_over_dense']:.3f}), "
        f"no cut {out['no_cut_s'] * 1e3:.1f} ms"
    )
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
    p.add_argument(
        "--compile",
        default="false",
        choices=["auto", "true", "false"],
        help="torch.compile the blocks in the main timings (as TrainConfig.compile)",
    )
    p.add_argument("--loss-chunk", type=int, default=4096, help="as TrainConfig.loss_chunk")
    p.add_argument(
        "--activation-checkpointing",
        type=int,
        default=0,
        help="recompute every K-th block in the backward pass (0 = off), as the trainer's key",
    )
    p.add_argument("--compile-compare", action="store_true", help="compiled vs eager ratio")
    p.add_argument("--loss-compare", action="store_true", help="chunked vs plain loss ratio")
    p.add_argument("--cut-compare", action="store_true", help="cut rows: fused vs dense mask")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    if args.tiny:
        args.models, args.seq_len, args.vocab, args.micro, args.accum = "tiny-0.3M", 32, 256, 4, 2
        args.warmup, args.steps, args.loader_rows = 2, 5, 2048
        args.loss_chunk = 64  # 128 tokens per micro-batch: two chunks
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
