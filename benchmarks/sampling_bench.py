"""Sampling speed: the MDM reverse process at steps L, L/2, L/4, L/8 against ARM KV-cache decoding.

The paper's speed claim: an MDM fills all L answer slots in every forward, so it trades quality
for speed through its step count, while an ARM with a KV cache pays L cheap one-token forwards.
Both models here have the same preset shape (random weights: speed does not depend on them), the
same prompts, batch and answer length L, and run in the same process, round-robin, as medians
of repeats. Throughput is answer tokens per second (batch x L / time; EOS stopping is off so
every row produces L tokens). For each batch size (``--batch 1,8``) and MDM unmasking strategy
the report names the crossover: the largest step count at which the MDM is faster than the ARM
(goal: at L/4 steps or more). Which one wins depends on the regime, not on the code alone: see
benchmarks/sampling_bench.md. ``--no-cache`` adds the ARM without a cache; ``--json OUT`` writes
every number (benchmarks/gpu_table.py prints it as a markdown table), rewritten after each batch
size; a failure in one batch size (OOM, ...; label ``sampling/batchN``, injectable with
``MASKSCALE_BENCH_FAIL``) is recorded there and the next one runs (benchmarks/benchjson.py).

    python benchmarks/sampling_bench.py --batch 1,8       # tiny-3M, vocab 32000, CPU, 1 thread
    python benchmarks/sampling_bench.py --smoke --batch 1,2          # seconds: tiny sizes
    python benchmarks/sampling_bench.py --device cuda --dtype bf16 --model 113M --length 256 \\
        --prompt 64 --batch 1,16 --seq-len 512 --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchjson import (  # noqa: E402
    SectionTimeout,
    environment,
    failure,
    free_memory,
    maybe_fail,
    on_sigterm,
    write_atomic,
)

from eval.generation.sampling import STRATEGIES, Sampler, SamplingConfig  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.presets import load_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARM = "ARM kv-cache"
SMOKE = {"model": "tiny-0.3M", "vocab": 256, "seq_len": 32, "length": 8, "prompt": 4, "repeats": 1}
"""``--smoke`` overrides: a shape that runs in seconds (tests check the output structure)."""


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def strategy_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in STRATEGIES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"strategies must be among {STRATEGIES}, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-3M", help="model preset (configs/model/NAME.yaml)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--length", type=int, default=64, help="answer tokens L")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--batch", type=int_list, default=[8], help="prompts per batch, e.g. 1,8")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--strategy",
        type=strategy_list,
        default=list(STRATEGIES),
        help="MDM unmasking strategies, comma-separated (default: both)",
    )
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
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this file")
    p.add_argument("--smoke", action="store_true", help=f"tiny shape for a quick check: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.prompt + args.length > args.seq_len:
        p.error(f"--prompt + --length = {args.prompt + args.length} exceeds --seq-len")
    return args


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


def make_sampler(model: Transformer, args, batch: int, **kw) -> Sampler:
    cfg = SamplingConfig(
        length=args.length,
        temperature=args.temperature,
        batch_size=batch,
        stop_at_eos=False,
        **kw,
    )
    return Sampler(model, causal=model.causal, mask_id=model.cfg.mask_id, eos_id=0, cfg=cfg)


def step_counts(length: int) -> list[int]:
    """L, L/2, L/4, L/8 (at least 1), largest first."""
    return sorted({max(1, length // d) for d in (1, 2, 4, 8)}, reverse=True)


def bench_batch(models: dict, args, batch: int, device, clock: str) -> dict:
    """Every sampler's median time at one batch size, the table rows and the crossovers."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, args.vocab, (batch, args.prompt), generator=g).tolist()
    samplers = {ARM: ("arm", None, None, make_sampler(models["arm"], args, batch))}
    if args.no_cache:
        no_cache = make_sampler(models["arm"], args, batch, cache=False)
        samplers["ARM no cache"] = ("arm", None, None, no_cache)
    for strategy in args.strategy:
        for n in step_counts(args.length):
            s = make_sampler(models["mdm"], args, batch, steps=n, strategy=strategy)
            samplers[f"MDM {strategy} {n}"] = ("mdm", strategy, n, s)
    runs = {name: (lambda s=v[3]: s.generate(prompts)) for name, v in samplers.items()}
    times = median_times(runs, args.repeats, device, clock)
    tokens = batch * args.length
    arm_rate = tokens / times[ARM]
    rows = [
        {
            "sampler": name,
            "family": family,
            "strategy": strategy,
            "steps": steps,
            "seconds": times[name],
            "tokens_per_s": tokens / times[name],
            "vs_arm": tokens / times[name] / arm_rate,
        }
        for name, (family, strategy, steps, _) in samplers.items()
    ]
    crossover = {
        strategy: max(
            (r["steps"] for r in rows if r["strategy"] == strategy and r["vs_arm"] > 1),
            default=None,
        )
        for strategy in args.strategy
    }
    return {"batch": batch, "tokens": tokens, "rows": rows, "crossover": crossover}


def verdict(crossover: int | None, length: int) -> str:
    if crossover is None:
        return f"slower than the ARM at every step count down to {step_counts(length)[-1]}"
    goal = "meets" if crossover >= length / 4 else "misses"
    return f"faster at <= {crossover} steps (L/{length / crossover:g}): {goal} the L/4 goal"


def print_batch(result: dict, length: int) -> None:
    print(f"\nbatch {result['batch']}:")
    print(f"{'sampler':<28} {'seconds':>9} {'tokens/s':>10} {'vs ARM':>8}")
    for r in result["rows"]:
        name = r["sampler"] if r["family"] == "arm" else f"MDM {r['strategy']} {r['steps']} steps"
        print(f"{name:<28} {r['seconds']:>9.3f} {r['tokens_per_s']:>10.1f} {r['vs_arm']:>7.2f}x")
    for strategy, steps in result["crossover"].items():
        print(f"crossover ({strategy}): the MDM is {verdict(steps, length)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = load_preset(args.model, vocab_size=args.vocab, seq_len=args.seq_len)
    torch.manual_seed(0)
    models = {
        family: Transformer(cfg, causal=family == "arm").to(device=device, dtype=dtype).eval()
        for family in ("arm", "mdm")
    }
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    load_before = os.getloadavg()
    print(
        f"{args.model} (vocab {args.vocab}), {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} thread(s): prompt {args.prompt}, L = {args.length}, "
        f"temperature {args.temperature:g}, median of {args.repeats} ({clock} time); "
        f"load {load_before[0]:.2f}",
        flush=True,
    )
    out = {
        "benchmark": "sampling",
        "header": environment(device),
        "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "load_1min": [load_before[0]],
        "results": [],
    }
    status = run_batches(models, args, device, clock, out)
    out["load_1min"].append(os.getloadavg()[0])
    print(
        f"\nload average (1 min): {out['load_1min'][0]:.2f} before, {out['load_1min'][1]:.2f} after"
    )
    write_atomic(args.json, out)
    return status


def run_batches(models: dict, args, device, clock: str, out: dict) -> int:
    """Each batch size in turn, the JSON rewritten after each; a failed one is recorded as
    ``{"batch", "status": "failed", "error"}`` and the next runs; SIGTERM (the section's time
    limit) records a timeout and returns 124."""
    on_sigterm()
    for batch in args.batch:
        label = f"sampling/batch{batch}"
        failed = False
        try:
            maybe_fail(label)
            out["results"].append(
                {**bench_batch(models, args, batch, device, clock), "status": "ok"}
            )
            print_batch(out["results"][-1], args.length)
        except Exception as exc:
            out["results"].append({"batch": batch, "label": label, **failure(exc, label)})
            failed = True
        except SectionTimeout as exc:
            out["results"].append({"batch": batch, "label": label, **failure(exc, label)})
            write_atomic(args.json, out)
            return 124
        if failed:
            free_memory()
        write_atomic(args.json, out)  # after every batch: a time limit keeps what is done
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores visible)"


if __name__ == "__main__":
    sys.exit(main())
