"""Text-in, text-out generation requests (the lm-evaluation-harness's ``generate_until``).

A request is ``(context, gen_kwargs)`` with the harness's keys: ``until`` (stop strings, a
string or a list), ``max_gen_toks``, ``do_sample``, ``temperature`` and ``top_p``. Requests with
the same length and sampling settings share one ``sampling.Sampler`` call (batched, with a
progress bar); the MDM settings (steps, strategy, semi-autoregressive ``block_length``, CFG
scale) and the seed come from the model args. The answer is the decoded sample cut before the
first stop string: an ARM row stops as soon as its text contains one, an MDM answer (all slots
are filled together) is cut afterwards.

Every prompt starts with the EOS id, as every training document follows one (not doubled when
the context's own tokens start with it; the same rule as ``eval.zeroshot.tasks.encode_pair``).
With ``block_length`` and no ``steps``, an MDM takes the answer length rounded up to a multiple
of the block count (the sampler needs the same steps per block).

The answer length L is the request's ``max_gen_toks`` (the model args' default when the task
sets none), capped at half the model's context so a prompt keeps room; contexts longer than
``seq_len - L`` lose their oldest tokens (counted and reported on stderr).
"""

from __future__ import annotations

import math
import sys

from eval.generation.sampling import Sampler, SamplingConfig
from eval.measure.loading import EvalError
from pipeline.configlib import ConfigError

KNOWN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


def _stop_strings(until, where: str) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list | tuple) or not all(isinstance(s, str) for s in until):
        raise EvalError(f"{where}: 'until' must be a string or a list of strings, got {until!r}")
    return [s for s in until if s]


def _settings(loaded, args, kwargs: dict, where: str) -> tuple[int, float, float]:
    """(answer length, temperature, top_p) of one request."""
    unknown = sorted(set(kwargs) - KNOWN_KWARGS)
    if unknown:
        print(f"[generate] {where}: ignoring generation kwargs {unknown}", file=sys.stderr)
    length = kwargs.get("max_gen_toks", args.max_gen_toks)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise EvalError(f"{where}: max_gen_toks must be a positive integer, got {length!r}")
    length = min(length, max(1, loaded.seq_len // 2))
    temperature = kwargs.get("temperature", 0.0)
    if kwargs.get("do_sample") is False:
        temperature = 0.0
    top_p = kwargs.get("top_p", 1.0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise EvalError(f"{where}: {name} must be a number, got {value!r}")
    if top_p is None or top_p <= 0 or top_p > 1:
        top_p = 1.0
    return length, float(temperature), float(top_p)


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text


def mdm_steps(args, length: int) -> int | None:
    """The model args' steps; with blocks and no steps, ``length`` rounded up to a multiple of
    the block count."""
    if args.steps is not None or not args.block_length:
        return args.steps
    blocks = -(-length // args.block_length)
    return blocks * -(-length // blocks)


def prompt_ids(tok, context: str, eos_id: int) -> list[int]:
    """The context's ids after the EOS that starts every training document (once)."""
    ids = list(tok.encode(context, add_special_tokens=False).ids)
    return ids if ids[:1] == [eos_id] else [eos_id, *ids]


def generate_until(loaded, args, requests: list[tuple[str, dict]]) -> list[str]:
    """Answers (text) to ``(context, gen_kwargs)`` requests, in order; ``args`` is the
    harness model's ``ModelArgs``."""
    tok = loaded.tokenizer
    groups: dict[tuple, list[int]] = {}
    prompts, stops = [], []
    for i, (context, kwargs) in enumerate(requests):
        where = f"generate_until request {i}"
        kwargs = dict(kwargs or {})
        stops.append(_stop_strings(kwargs.get("until"), where))
        prompts.append(prompt_ids(tok, context, loaded.eos_id))
        groups.setdefault(_settings(loaded, args, kwargs, where), []).append(i)
    answers: list[str] = [""] * len(requests)
    cut = 0
    mdm = loaded.family == "mdm"
    for (length, temperature, top_p), members in groups.items():
        cfg = SamplingConfig(
            length=length,
            steps=mdm_steps(args, length) if mdm else args.steps,
            strategy=args.strategy,
            temperature=temperature,
            top_p=top_p,
            cfg_scale=args.cfg if mdm else 0.0,
            seed=args.seed,
            batch_size=args.batch_size or 16,
            block_length=args.block_length if mdm else None,
        )
        try:
            sampler = Sampler.from_loaded(loaded, cfg)
        except ConfigError as e:
            raise EvalError(f"generate_until (model args steps / block_length): {e}") from None

        def stop(j: int, ids: list[int], members=members) -> bool:
            found = stops[members[j]]
            if not found:
                return False
            text = tok.decode(ids)
            return any(s in text for s in found)

        samples = sampler.generate([prompts[i] for i in members], stop=stop, progress=True)
        for i, sample in zip(members, samples, strict=True):
            answers[i] = cut_at_stops(tok.decode(sample.tokens), stops[i])
            cut += sample.prompt_cut > 0
    if cut:
        print(f"[generate] {cut} context(s) cut from the left to fit", file=sys.stderr)
    return answers
