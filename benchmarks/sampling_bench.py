"""Sampling speed: the MDM reverse process at steps L, L/2, L/4, L/8 against ARM KV-cache decoding.

The paper's speed claim: an MDM fills all L answer slots in every forward, so it trades quality
for speed through its step count, while an ARM with a KV cache pays L cheap one-token forwards.
Both models here have the same preset shape (random weights: speed does not depend on them), the
same prompts, batch and answer length L, and run in the same process, round-robin, as medians
of repeats. Throughput is answer tokens per second (batch x L / time; EOS stopping is off so
every row produces L tokens). The report names the largest step count at which the MDM is
faster than the ARM (goal: at L/4 steps or more). ``--no-cache`` adds the ARM without a cache.

    python benchmarks/sampling_bench.py                   # tiny-3M, vocab 32000, CPU, 1 thread
    python benchmarks/sampling_bench.py --length 32 --repeats 1        # smoke run
    python benchmarks/sampling_bench.py --device cuda --dtype bf16 --model 113M --length 256 \\
        --prompt 256 --batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.sampling import Sampler, SamplingConfig  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.presets import load_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-3M", help="model preset (configs/model/NAME.yaml)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--length", type=int, default=64, help="answer tokens L")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--batch", type=int, default=8, help="prompts per batch")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--strategy", choices=("low-confidence", "random"), default="low-confidence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cache", action="store_true", help="also time the ARM without a cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="auto: process CPU time on a CPU device with one thread (stable on a shared "
        "machine), wall time otherwise",
    )
    return p.parse_args(argv)


def median_times(
    fns: dict[str, Callable[[], object]], repeats: int, device, clock: str
) -> dict[str, float]:
    """Median time of each function over ``repeats`` round-robin rounds after a warm-up
    (``clock="cpu"``: this process's CPU time, what the work costs whatever else runs)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = now()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append(now() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_sampler(model: Transformer, args, **kw) -> Sampler:
    cfg = SamplingConfig(
        length=args.length,
        temperature=args.temperature,
        batch_size=args.batch,
        stop_at_eos=False,
        **kw,
    )
    return Sampler(model, causal=model.causal, mask_id=model.cfg.mask_id, eos_id=0, cfg=cfg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = load_preset(args.model, vocab_size=args.vocab, seq_len=args.seq_len)
    torch.manual_seed(0)
    arm = Transformer(cfg, causal=True).to(device=device, dtype=dtype).eval()
    mdm = Transformer(cfg, causal=False).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g).tolist()
    fns: dict[str, Callable[[], object]] = {"ARM kv-cache": make_sampler(arm, args)}
    if args.no_cache:
        fns["ARM no cache"] = make_sampler(arm, args, cache=False)
    steps = sorted({max(1, args.length // d) for d in (1, 2, 4, 8)}, reverse=True)
    for n in steps:
        fns[f"MDM {n} steps"] = make_sampler(mdm, args, steps=n, strategy=args.strategy)
    runs = {name: (lambda s=s: s.generate(prompts)) for name, s in fns.items()}
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    print(
        f"{args.model} (vocab {args.vocab}), {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} thread(s): batch {args.batch}, prompt {args.prompt}, "
        f"L = {args.length}, MDM {args.strategy}, temperature {args.temperature:g}, "
        f"median of {args.repeats} "
        f"({clock} time)",
        flush=True,
    )
    times = median_times(runs, args.repeats, device, clock)
    tokens = args.batch * args.length
    arm_rate = tokens / times["ARM kv-cache"]
    print(f"{'sampler':<16} {'seconds':>9} {'tokens/s':>10} {'vs ARM':>8}")
    for name, sec in times.items():
        rate = tokens / sec
        print(f"{name:<16} {sec:>9.3f} {rate:>10.1f} {rate / arm_rate:>7.2f}x")
    faster = [n for n in steps if tokens / times[f"MDM {n} steps"] > arm_rate]
    if faster:
        n = max(faster)
        verdict = f"the MDM is faster than the ARM at {n} steps (L/{args.length / n:g}) or fewer"
    else:
        verdict = f"the MDM is slower than the ARM at every step count down to {min(steps)}"
    print(f"crossover: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
