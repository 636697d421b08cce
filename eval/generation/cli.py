"""``maskscale sample RUN``: generate text from a trained ARM or MDM run.

    maskscale sample RUN --prompt "Once upon a time" [--length 64 --steps 16 --temperature 0.7
                         --cfg 1.0 --strategy low-confidence|random --top-p 0.9 --seed 0]
    maskscale sample RUN --input prompts.jsonl [--output answers.jsonl]

One prompt: the answer text goes to stdout, everything else (model, settings, speed) to
stderr, so ``$(maskscale sample ...)`` captures just the text. Batch mode reads JSON lines
``{"prompt": str, "seed": int (optional), ...}`` and writes one JSON line per prompt, in
order: the input record plus ``answer``, ``n_tokens``, ``eos`` and ``prompt_cut`` (stdout
without ``--output``; the file is written atomically). A bad line stops the run before the
model loads, naming file, line and field: a prompt file is small and silently skipping a
prompt would leave its answer missing. ``--steps``, ``--strategy`` and ``--cfg`` are MDM
settings and are refused for an ARM run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MDM_ONLY = ("steps", "strategy", "cfg", "block_length")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate text from a run (MDM reverse process or ARM KV-cache sampling)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run directory or export folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; the answer is printed to stdout")
    src.add_argument("--input", metavar="FILE", help='JSONL of {"prompt": ...} records')
    p.add_argument("--output", metavar="FILE", help="answers JSONL (default: stdout)")
    p.add_argument("--length", type=int, default=64, help="new tokens L (default 64)")
    p.add_argument("--steps", type=int, help="MDM reverse steps (default: L)")
    p.add_argument("--strategy", choices=("low-confidence", "random"), help="MDM unmasking")
    p.add_argument(
        "--block-length", type=int, help="MDM semi-autoregressive blocks of this many slots"
    )
    p.add_argument("--cfg", type=float, help="MDM unsupervised CFG scale w (default 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed (hashed with each prompt)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="export this step first")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    p.set_defaults(func=cmd_sample)


def read_prompts(path: str | Path) -> list[dict]:
    """Records of a prompt JSONL file (blank lines skipped); errors name file:line and field."""
    from eval.measure.loading import EvalError, jsonl_records

    records = []
    for where, obj in jsonl_records(path, "--input"):
        if not isinstance(obj, dict):
            raise EvalError(f"{where}: expected a JSON object with a 'prompt' field")
        if not isinstance(obj.get("prompt"), str):
            what = "is missing" if "prompt" not in obj else "must be a string"
            raise EvalError(f"{where}: field 'prompt' {what}")
        seed = obj.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise EvalError(f"{where}: field 'seed' must be an integer, got {seed!r}")
        records.append(obj)
    if not records:
        raise EvalError(f"{path}: no prompts (every line is empty)")
    return records


def _config(args: argparse.Namespace, family: str):
    from eval.generation.sampling import SamplingConfig
    from eval.measure.loading import EvalError

    given = [f"--{k.replace('_', '-')}" for k in MDM_ONLY if getattr(args, k) is not None]
    if family == "arm" and given:
        raise EvalError(f"{', '.join(given)}: MDM settings, but {args.run} is an ARM run")
    return SamplingConfig(
        length=args.length,
        steps=args.steps,
        strategy=args.strategy or "low-confidence",
        temperature=args.temperature,
        top_p=args.top_p,
        cfg_scale=args.cfg or 0.0,
        seed=args.seed,
        batch_size=args.batch_size,
        block_length=args.block_length,
    )


def _describe(loaded, cfg) -> str:
    text = f"{loaded.name} ({loaded.family.upper()}, step {loaded.step}): L={cfg.length}"
    if loaded.family == "mdm":
        text += f", {cfg.n_steps} steps {cfg.strategy}"
        text += f" in blocks of {cfg.block_length}" if cfg.block_length else ""
        text += f", CFG w={cfg.cfg_scale:g}" if cfg.cfg_scale else ""
    else:
        text += ", KV cache"
    text += f", temperature {cfg.temperature:g}"
    return text + (f", top-p {cfg.top_p:g}" if cfg.top_p < 1 else "")


def cmd_sample(args: argparse.Namespace) -> int:
    from eval.generation.sampling import Sampler
    from eval.measure.loading import EvalError, load_model
    from eval.measure.outputs import write_text_atomic
    from pipeline.configlib import ConfigError

    try:
        records = read_prompts(args.input) if args.input else [{"prompt": args.prompt}]
        loaded = load_model(args.run, args.checkpoint, args.device, args.dtype)
        sampler = Sampler.from_loaded(loaded, _config(args, loaded.family))
    except (EvalError, ConfigError) as e:
        print(f"maskscale sample: {e}", file=sys.stderr)
        return 2
    tok = loaded.tokenizer
    prompts = [tok.encode(r["prompt"], add_special_tokens=False).ids for r in records]
    seeds = [r.get("seed", args.seed) for r in records]
    print(f"[sample] {_describe(loaded, sampler.cfg)}", file=sys.stderr)
    start = time.perf_counter()
    samples = sampler.generate(prompts, seeds=seeds, progress=args.input is not None)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(s.tokens) for s in samples)
    cut = sum(1 for s in samples if s.prompt_cut)
    print(
        f"[sample] {len(samples)} answer(s), {n_tokens} tokens in {seconds:.2f} s "
        f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s)"
        + (f"; {cut} prompt(s) cut from the left to fit seq_len={loaded.seq_len}" if cut else ""),
        file=sys.stderr,
    )
    answers = [tok.decode(s.tokens) for s in samples]
    if not args.input:
        print(answers[0])
        return 0
    lines = [
        json.dumps(
            {**r, "answer": a, "n_tokens": len(s.tokens), "eos": s.eos, "prompt_cut": s.prompt_cut}
        )
        for r, a, s in zip(records, answers, samples, strict=True)
    ]
    text = "".join(line + "\n" for line in lines)
    if args.output:
        print(f"[sample] answers: {write_text_atomic(Path(args.output), text)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
