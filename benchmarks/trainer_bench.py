"""Trainer benchmarks: step time, tokens/s and MFU of the real DeepSpeed engine per variant.

Questions answered with medians over repeated steps, as ratios measured in the same process:

1. Does the MDM objective cost more than the ARM one on the same model and batch? (goal: MDM/ARM
   step-time ratio <= 1.05; both use T positions per row, same FLOPs)
2. What does a lever buy? Each *variant* is the trainer's config with a few keys overridden
   (``compiled``: compile=true, ``plain-loss``: loss_chunk=0, ...; :data:`VARIANTS`, or ad hoc
   with ``--variant NAME:KEY=VALUE,...``), measured for ARM and MDM; the table gives each
   variant's step time relative to the first one of the run, and its peak memory.
3. Can the memory-mapped loader feed the trainer? loader rows/s vs rows/s the trainer consumes
   (goal >= 20x, so data never stalls a step).
4. ``torch-loop``: what the DeepSpeed engine costs over a plain torch loop (ARM; CPU mostly).
5. ``--cut-compare``: forward + backward of a micro-batch with one length-cut row through the
   per-row fused attention vs the previous dense boolean mask.

Why variants are config overrides: a new trainer lever (a config key) is measured by adding one
line to :data:`VARIANTS` (or one ``--variant`` flag), and the benchmark builds model, objective
and engine the way ``trainer/loop.py`` does, so what is timed is what training runs.

Every measurement is a record in the ``--json`` file, written after each one; a failure (OOM,
NCCL, compile error, a crash, the section's time limit) is recorded and the next variant runs
(benchmarks/benchjson.py). benchmarks/gpu_table.py renders the JSONs as one markdown table.

    python benchmarks/trainer_bench.py                  # CPU defaults (~1 min on 2 cores)
    python benchmarks/trainer_bench.py --tiny           # seconds: smoke run of every part
    python benchmarks/trainer_bench.py --device cuda --models 1028M:8 --seq-len 2048 \\
        --precision bf16 --compile true --variants base,eager --json out.json   # gpu_check.sh
    python benchmarks/trainer_bench.py --tiny --variants base,plain-loss --cut-compare \\
        --variant fused-math:optim.fused=true,attention_backend=math   # ad hoc: any keys
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchjson import Recorder, failure, without_mlflow  # noqa: E402

from pipeline.configlib import ConfigError, apply_overrides, from_dict  # noqa: E402
from pipeline.shards import MANIFEST, ShardMeta, ShardWriter  # noqa: E402
from trainer.budget import peak_flops  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.model import ModelConfig, flops_per_token, flops_per_token_litgpt  # noqa: E402
from trainer.presets import load_preset  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "base": [],  # the command line's settings
    "compiled": ["compile=true"],
    "eager": ["compile=false"],
    "plain-loss": ["loss_chunk=0"],
    "checkpointed": ["activation_checkpointing=1"],
    "zero0": ["zero_stage=0"],
    "zero1": ["zero_stage=1"],
    "fp32": ["precision=fp32"],
    # issue 17's GPU levers (trainer/engine.py, trainer/model.py)
    "fused": ["optim.fused=true"],
    "unfused": ["optim.fused=false"],
    "flash": ["attention_backend=flash"],
    "cudnn": ["attention_backend=cudnn"],
    "math": ["attention_backend=math"],
    "plain-engine": ["engine=plain", "zero_stage=0"],
}
"""Named variants: TrainConfig overrides (``key=value``, dotted for sections, as the CLI's) on
top of the command line's settings. Add a lever here once the trainer has its config key."""

TORCH_LOOP = "torch-loop"
"""A special variant: the same ARM steps in a plain torch loop (AdamW, accumulation, clipping)."""


class SyntheticLoader:
    """Random rows with unique keys, pre-generated so data costs nothing in step timings."""

    def __init__(self, micro: int, seq_len: int, vocab: int, n: int = 8):
        g = torch.Generator().manual_seed(0)
        self.batches = [
            torch.randint(0, vocab, (micro, seq_len + 1), generator=g) for _ in range(n)
        ]
        self.micro, self.i, self.epoch = micro, 0, 0

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, keys, lengths) as trainer/data.py's CorpusLoader: every row full length."""
        tokens = self.batches[self.i % len(self.batches)]
        keys = torch.arange(self.i * self.micro, (self.i + 1) * self.micro)
        self.i += 1
        return tokens, keys, torch.full((self.micro,), tokens.shape[1])


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


# ----------------------------------------------------------------------------- variants


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` (one of :data:`VARIANTS`) or ``NAME:KEY=VALUE[,KEY=VALUE...]`` (ad hoc)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep:
        if name not in VARIANTS and name != TORCH_LOOP:
            raise argparse.ArgumentTypeError(
                f"unknown variant {name!r}: use one of {', '.join([*VARIANTS, TORCH_LOOP])} "
                "or NAME:KEY=VALUE[,KEY=VALUE...] (TrainConfig keys, e.g. fused:optim.fused=true)"
            )
        return name, list(VARIANTS.get(name, []))
    overrides = [o.strip() for o in rest.split(",") if o.strip()]
    if not name or not overrides or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], e.g. ac2:"
            "activation_checkpointing=2"
        )
    return name, overrides


def train_config(args, model: str, micro: int, objective: str, overrides: list[str]):
    """The TrainConfig a run with the command line's settings plus ``overrides`` would use."""
    base = {
        "corpus": "synthetic",
        "model": model,
        "objective": objective,
        "budget": {"steps": 10**6},
        "precision": args.precision,
        "zero_stage": args.zero_stage,
        "batch": {"global_batch": micro * args.accum, "micro_batch": micro},
        "compile": args.compile,
        "loss_chunk": args.loss_chunk,
        "activation_checkpointing": args.activation_checkpointing,
    }
    return from_dict(TrainConfig, apply_overrides(base, overrides))


def model_config(args, cfg: TrainConfig) -> ModelConfig:
    overrides = {"vocab_size": args.vocab, "seq_len": args.seq_len, **cfg.model_overrides}
    return load_preset(cfg.model, **overrides)


# ----------------------------------------------------------------------------- measurements


def time_steps(args, step, device: torch.device, first=None) -> dict:
    """Warm-up then timed calls of ``step``: median, first call (compile time) and all times.
    ``first`` (a context manager factory), if given, wraps the first warm-up call."""
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        if i == 0 and first is not None and args.warmup > 0:
            with first():
                step()
        else:
            step()
        sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    return {"step_s": statistics.median(timed), "first_step_s": times[0], "step_times": times}


def mfu_fields(args, cfg: TrainConfig, model, device, step_s: float) -> dict:
    """tokens/s and MFU in two counts: the project's (6 x non-embedding parameters + attention,
    trainer/model.py: flops_per_token) and 6 x all parameters + attention (litgpt's)."""
    mc = model_config(args, cfg)
    tokens = cfg.batch.global_batch * args.seq_len
    tps = tokens / step_s
    n_all = sum(p.numel() for p in model.parameters())
    counts = {
        "flops_per_token": flops_per_token(mc, args.seq_len),
        "flops_per_token_all_params": flops_per_token_litgpt(mc, args.seq_len),
    }
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(device))
    out = {"tokens_per_step": tokens, "tokens_per_s": tps, "params": n_all, **counts}
    out["peak_flops"] = peak
    out["mfu"] = counts["flops_per_token"] * tps / peak if peak else None
    out["mfu_all_params"] = counts["flops_per_token_all_params"] * tps / peak if peak else None
    return out


def time_engine(args, cfg: TrainConfig, device: torch.device) -> dict:
    """Step times, tokens/s, MFU and peak memory of the real DeepSpeed engine + train_step,
    built as trainer/loop.py builds them for ``cfg``."""
    from trainer.build import build_model
    from trainer.compiling import compile_blocks, use_compile
    from trainer.engine import build_engine, train_step
    from trainer.model import set_attention_backend
    from trainer.objectives import build_objective, forced_cut

    mc = model_config(args, cfg)
    kw = {"eps": cfg.mdm.eps, "random_length_prob": cfg.mdm.random_length_prob}
    kw.update(t_sampling=cfg.mdm.t_sampling, loss_weighting=cfg.mdm.loss_weighting)
    objective = build_objective(
        cfg.objective,
        mc.mask_id,
        loss_chunk=cfg.loss_chunk,
        **(kw if cfg.objective == "mdm" else {}),
    )
    torch._dynamo.reset()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # initialise in place (a 1B model on CPU takes a while)
        model = build_model(cfg, mc, objective.causal, 1)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    set_attention_backend(model, cfg.attention_backend, device, dtype)  # as the loop does
    compiled = use_compile(cfg.compile, device)
    if compiled:
        compile_blocks(model)
    reset_peak(device)
    engine = build_engine(cfg, model, 10**6, 1)
    build_s = time.perf_counter() - t0
    loader = SyntheticLoader(cfg.batch.micro_batch, args.seq_len, args.vocab)
    step = iter(range(1, 10**9))
    # the MDM's first warm-up step cuts one row, so the cut-row path is compiled before timing
    out = time_steps(
        args,
        lambda: train_step(engine, loader, objective, args.accum, device, next(step)),
        device,
        first=lambda: forced_cut(objective),
    )
    out.update(build_s=build_s, compiled=compiled, peak_gb=peak_gb(device))
    out.update(mfu_fields(args, cfg, model, device, out["step_s"]))
    engine = model = None  # the step closure holds them: drop before freeing the cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def time_torch_loop(args, cfg: TrainConfig, device: torch.device) -> dict:
    """The same ARM steps with a plain torch loop: AdamW, accumulation, clipping (eager)."""
    from trainer.model import Transformer
    from trainer.objectives import build_objective

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_config(args, cfg), causal=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
    objective = build_objective("arm", model.cfg.mask_id)
    loader = SyntheticLoader(cfg.batch.micro_batch, args.seq_len, args.vocab)
    reset_peak(device)

    def step():
        for _ in range(args.accum):
            tokens, keys, _ = loader.next_micro_batch()
            loss = objective.train_loss(model, tokens.to(device), keys) / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    out = time_steps(args, step, device)
    out["peak_gb"] = peak_gb(device)
    out.update(mfu_fields(args, cfg, model, device, out["step_s"]))
    return out


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


def loader_rows_per_s(args) -> dict:
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
        return {"rows_per_s": n * args.micro / (time.perf_counter() - t0)}


def _dense_mask_attention(q, k, v, lengths):
    """The previous cut implementation: one SDPA call with a boolean key mask [B, 1, 1, T]."""
    keys = torch.arange(q.shape[2], device=q.device)
    mask = (keys < lengths.to(q.device)[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cut_compare(args, cfg: TrainConfig, device) -> dict:
    """Forward + backward of an MDM micro-batch with one row cut to half length: per-row fused
    attention (``trainer/model.py: cut_attention``) vs the dense-mask path; no cut for scale."""
    import trainer.model as model_module

    torch.manual_seed(0)
    with torch.device(device):
        model = model_module.Transformer(model_config(args, cfg), causal=False)
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    micro = cfg.batch.micro_batch
    ids = torch.randint(0, args.vocab, (micro, args.seq_len), device=device)
    cut = torch.full((micro,), args.seq_len)
    cut[0] = args.seq_len // 2
    fused = model_module.cut_attention

    def run(lengths) -> float:
        def step():
            model(ids, lengths=lengths).float().square().mean().backward()

        median = time_steps(args, step, device)["step_s"]
        model.zero_grad(set_to_none=True)
        return median

    out = {"no_cut_s": run(None), "fused_s": run(cut)}
    try:
        model_module.cut_attention = _dense_mask_attention
        out["dense_mask_s"] = run(cut)
    finally:
        model_module.cut_attention = fused
    out["fused_over_dense"] = out["fused_s"] / out["dense_mask_s"]
    return out


# ----------------------------------------------------------------------------- the run


def plan(args, device: torch.device) -> list[tuple[str, dict, object]]:
    """(label, meta, measure) of every measurement, in order: per model, each variant for ARM
    then MDM (torch-loop: ARM only), then the cut-row probe; the loader last."""
    out = []
    for spec in args.models.split(","):
        model, _, micro = spec.partition(":")
        micro = int(micro) if micro else args.micro
        shape = {"model": model, "micro": micro, "accum": args.accum, "seq_len": args.seq_len}
        for name, overrides in args.variants:
            for objective in ("arm",) if name == TORCH_LOOP else ("arm", "mdm"):
                cfg = train_config(args, model, micro, objective, overrides)
                meta = {**shape, "variant": name, "objective": objective, "overrides": overrides}
                fn = time_torch_loop if name == TORCH_LOOP else time_engine
                label = f"{model}/{name}/{objective}"
                out.append((label, meta, lambda fn=fn, cfg=cfg: fn(args, cfg, device)))
        if args.cut_compare:
            cfg = train_config(args, model, micro, "mdm", [])
            meta = {**shape, "variant": "cut-rows", "objective": "mdm", "overrides": []}
            out.append(
                (f"{model}/cut-rows/mdm", meta, lambda cfg=cfg: cut_compare(args, cfg, device))
            )
    if not args.skip_loader:
        meta = {"model": None, "variant": "loader", "objective": None, "overrides": []}
        out.append(("loader", meta, lambda: loader_rows_per_s(args)))
    return out


def describe(record: dict) -> str:
    """One printed line per record."""
    label = record["label"]
    if record["status"] != "ok":
        err = record.get("error", {})
        return f"  {label}: {record['status'].upper()} {err.get('kind', '')} {record.get('reason', '')}"
    if "rows_per_s" in record:
        return f"  {label}: {record['rows_per_s']:,.0f} rows/s"
    if "fused_over_dense" in record:
        return (
            f"  {label}: one cut row, fwd+bwd: per-row fused {record['fused_s'] * 1e3:.1f} ms, "
            f"dense mask {record['dense_mask_s'] * 1e3:.1f} ms "
            f"(ratio {record['fused_over_dense']:.3f}), no cut {record['no_cut_s'] * 1e3:.1f} ms"
        )
    mfu = f"  MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    mem = f"  peak {record['peak_gb']:.2f} GiB" if record.get("peak_gb") is not None else ""
    return (
        f"  {label}: {record['step_s'] * 1e3:8.1f} ms/step  {record['tokens_per_s']:12,.0f} "
        f"tokens/s{mfu}{mem}  (first step {record['first_step_s']:.1f} s)"
    )


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--skip-loader", action="store_true", help="no loader rows/s measurement")
    p.add_argument(
        "--compile",
        default="false",
        choices=["auto", "true", "false"],
        help="torch.compile the blocks in the base settings (as TrainConfig.compile)",
    )
    p.add_argument("--loss-chunk", type=int, default=4096, help="as TrainConfig.loss_chunk")
    p.add_argument(
        "--activation-checkpointing",
        type=int,
        default=0,
        help="recompute every K-th block in the backward pass (0 = off), as the trainer's key",
    )
    p.add_argument(
        "--variants",
        default=f"base,{TORCH_LOOP}",
        help=f"comma-separated named variants ({', '.join([*VARIANTS, TORCH_LOOP])}); the "
        "first is the reference the table divides by",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
        help="an ad hoc variant after --variants (TrainConfig overrides); repeatable",
    )
    p.add_argument("--cut-compare", action="store_true", help="cut rows: fused vs dense mask")
    p.add_argument("--compile-compare", action="store_true", help="shorthand: add compiled, eager")
    p.add_argument("--loss-compare", action="store_true", help="shorthand: add plain-loss")
    p.add_argument("--skip-plain", action="store_true", help=f"shorthand: drop {TORCH_LOOP}")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--json", help="write every record to this file (after each measurement)")
    p.add_argument("--resume", action="store_true", help="keep the --json file's finished records")
    p.add_argument("--previous-exit", type=int, help="with --resume: how the last run ended")
    p.add_argument("--time-limit", type=float, help="seconds after which no new measurement starts")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, its variants validated (a bad key fails here, not minutes in)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.compile = {"true": True, "false": False}.get(args.compile, args.compile)
    if args.tiny:
        args.models, args.seq_len, args.vocab, args.micro, args.accum = "tiny-0.3M", 32, 256, 4, 2
        args.warmup, args.steps, args.loader_rows = 2, 5, 2048
        args.loss_chunk = 64  # 128 tokens per micro-batch: two chunks
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    names += ["compiled", "eager"] if args.compile_compare else []
    names += ["plain-loss"] if args.loss_compare else []
    names = [n for n in dict.fromkeys(names) if not (args.skip_plain and n == TORCH_LOOP)]
    try:
        named = [parse_variant(v) for v in names]
        args.variants = named + [parse_variant(v) for v in args.variant]
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if len({n for n, _ in args.variants}) != len(args.variants):
        p.error(f"variant names must be unique: {[n for n, _ in args.variants]}")
    for name, overrides in args.variants:
        try:
            train_config(args, "tiny-0.3M", args.micro, "arm", overrides)
        except ConfigError as exc:
            p.error(f"variant {name!r}: {exc}")
    return args


def main(argv=None) -> int:
    from trainer.engine import init_distributed

    args = parse_args(argv)
    start = time.monotonic()
    torch.manual_seed(0)
    saved = {k: v for k, v in vars(args).items() if k not in ("json",)}
    rec = Recorder(args.json, "trainer", copy.deepcopy(saved), args.device, resume=args.resume)
    rec.crash_status = args.previous_exit
    rec.data["reference_variant"] = args.variants[0][0] if args.variants else None
    try:
        dist = init_distributed()
    except Exception as exc:  # no DeepSpeed, no NCCL: the JSON says so instead of nothing
        rec.data["error"] = failure(exc, "setup")["error"]
        rec.save()
        return 1
    device = torch.device(args.device) if args.device != "cuda" else dist.device
    print(
        f"device={device} precision={args.precision} zero={args.zero_stage} "
        f"seq_len={args.seq_len} micro={args.micro} accum={args.accum} "
        f"variants={[n for n, _ in args.variants]}",
        flush=True,
    )
    deadline = start + args.time_limit if args.time_limit else None
    rec.on_record = lambda record: print(describe(record), flush=True)
    steps = plan(args, device)
    status = rec.run_all(steps, deadline)
    failed = [r["label"] for r in rec.data["records"] if r["status"] != "ok"]
    print(f"{len(rec.data['records']) - len(failed)} measured, not measured: {failed or 'none'}")
    return status


if __name__ == "__main__":
    without_mlflow()
    sys.exit(main())
