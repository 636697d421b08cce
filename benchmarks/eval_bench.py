"""Likelihood benchmarks: what packing, CFG and the chain rule cost against bare forwards.

Three questions, each on the same model and tokens in one run, as medians of repeats:

1. Monte Carlo ELBO throughput (scored continuations/s at n samples) against a bare batched
   forward (``model(ids)``, full logits) over the same rows: requests x n rows of context +
   continuation tokens (goal: ratio >= 0.9). Also against a trunk-only forward
   (``model.features``), which isolates the packing overhead from the saving of running the
   head only at scored positions, and the share of sample rows that mask nothing (scored 0
   without a forward).
2. Unsupervised CFG: MC time with cfg_scale != 0 over MC time without (goal <= 2.05x).
3. Chain rule: time for l-token continuations against a bare forward over its l rows each.

    python benchmarks/eval_bench.py                    # tiny-3M, seq 256, vocab 32000, CPU
    python benchmarks/eval_bench.py --requests 1 --mc-samples 16 --repeats 1   # smoke run
    python benchmarks/eval_bench.py --device cuda --dtype bf16 --model 113M --seq-len 2048 \\
        --context 1024 --requests 16 --token-budget 65536
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

from eval.measure.likelihood import LikelihoodConfig, Scorer  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.presets import load_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-3M", help="model preset (configs/model/NAME.yaml)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--requests", type=int, default=2, help="requests per call")
    p.add_argument("--context", type=int, default=112, help="context tokens per request")
    p.add_argument("--continuation", type=int, default=16, help="continuation tokens (l)")
    p.add_argument("--mc-samples", type=int, default=128)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--token-budget", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="auto: process CPU time on a CPU device with one thread (stable on a shared "
        "machine), wall time otherwise",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch default); one "
        "thread gives stable timings on a shared machine",
    )
    return p.parse_args(argv)


def median_times(
    fns: dict[str, Callable[[], object]], repeats: int, device, clock: str = "wall"
) -> dict[str, float]:
    """Median time of each function over ``repeats`` rounds, after one warm-up round.

    The functions run round-robin within each round, so a load change on a shared machine hits
    all of them alike. ``clock="cpu"`` measures this process's CPU time instead of wall time:
    with one thread it is what the work costs, whatever else the machine runs.
    """
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


def bare_forward(model: Transformer, rows: int, length: int, budget: int, device, head: bool):
    """A function running ``rows`` random rows of ``length`` tokens in batches of the budget."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (rows, length), generator=g)
    per_batch = max(1, budget // length)

    @torch.inference_mode()
    def run() -> None:
        for lo in range(0, rows, per_batch):
            batch = ids[lo : lo + per_batch].to(device)
            out = model(batch) if head else model.features(batch)
            out.float().sum().item()  # the logits are read, as a scorer reads them

    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.context + args.continuation > args.seq_len:
        sys.exit("--context + --continuation must fit in --seq-len")
    device = torch.device(args.device)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    cfg = load_preset(args.model, seq_len=args.seq_len, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = Transformer(cfg, causal=False).to(device=device, dtype=DTYPES[args.dtype]).eval()
    g = torch.Generator().manual_seed(1)
    requests = [
        (
            torch.randint(0, args.vocab, (args.context,), generator=g).tolist(),
            torch.randint(0, args.vocab, (args.continuation,), generator=g).tolist(),
        )
        for _ in range(args.requests)
    ]
    length, n, l_cont = args.context + args.continuation, args.mc_samples, args.continuation

    def scorer(**kw) -> Scorer:
        lcfg = LikelihoodConfig(token_budget=args.token_budget, greedy=False, **kw)
        return Scorer(model, causal=False, mask_id=cfg.mask_id, seq_len=args.seq_len, cfg=lcfg)

    mc, mc_cfg = scorer(mc_samples=n), scorer(mc_samples=n, cfg_scale=args.cfg_scale)
    chain = scorer(estimator="chain_rule")
    greedy = Scorer(
        model,
        causal=False,
        mask_id=cfg.mask_id,
        seq_len=args.seq_len,
        cfg=LikelihoodConfig(token_budget=args.token_budget, estimator="chain_rule"),
    )
    rows, chain_rows = args.requests * n, args.requests * l_cont
    plans = [mc._mc_plan(mc._prepare(i, r)) for i, r in enumerate(requests)]
    run_rows = sum(int(p.block.ids.shape[0]) for p in plans)
    budget = args.token_budget
    t = median_times(
        {
            "mc": lambda: mc.loglikelihood(requests),
            "bare": bare_forward(model, rows, length, budget, device, head=True),
            "trunk": bare_forward(model, rows, length, budget, device, head=False),
            "cfg": lambda: mc_cfg.loglikelihood(requests),
            "chain": lambda: chain.loglikelihood(requests),
            "chain_bare": bare_forward(model, chain_rows, length, budget, device, head=True),
            "greedy": lambda: greedy.loglikelihood(requests),
        },
        args.repeats,
        device,
        clock,
    )
    t_mc, t_bare, t_trunk, t_cfg = t["mc"], t["bare"], t["trunk"], t["cfg"]
    t_chain, t_chain_bare, t_greedy = t["chain"], t["chain_bare"], t["greedy"]

    print(
        f"model {args.model} (vocab {args.vocab}, seq {args.seq_len}) on {device} {args.dtype}, "
        f"{torch.get_num_threads()} threads, {clock} clock; {args.requests} requests of {args.context} + "
        f"{l_cont} tokens; token budget {args.token_budget}; medians of {args.repeats}"
    )
    print(f"1. MC ELBO, n={n}: {args.requests / t_mc:.3f} continuations/s ({t_mc:.3f} s)")
    print(f"   bare forward, {rows} rows x {length} tokens: {t_bare:.3f} s")
    print(f"   throughput ratio MC / bare forward: {t_bare / t_mc:.2f}  (goal >= 0.9)")
    print(
        f"   trunk-only forward (no head): {t_trunk:.3f} s; ratio {t_trunk / t_mc:.2f}; "
        f"rows run {run_rows}/{rows} ({1 - run_rows / rows:.0%} of samples mask nothing)"
    )
    print(f"2. CFG w={args.cfg_scale}: {t_cfg:.3f} s; cost ratio vs no CFG: {t_cfg / t_mc:.2f}x")
    print("   (goal <= 2.05x)")
    print(
        f"3. chain rule, l={l_cont}: {t_chain:.3f} s vs bare forward of its {chain_rows} rows "
        f"{t_chain_bare:.3f} s: cost ratio {t_chain / t_chain_bare:.2f}x"
    )
    print(
        f"   + greedy unmasking (is_greedy, random targets stop early): {t_greedy:.3f} s "
        f"({t_greedy / t_chain:.2f}x the chain rule alone)"
    )


if __name__ == "__main__":
    main()
