"""Text-in, text-out generation requests (the lm-evaluation-harness's ``generate_until``).

A request is ``(context, gen_kwargs)`` with the harness's keys: ``until`` (stop strings, a
string or a list), ``max_gen_toks``, ``do_sample``, ``temperature`` and ``top_p``. Requests with
the same length and sampling settings share one ``sampling.Sampler`` call (batched, with a
progress bar); the MDM settings (steps, strategy, CFG scale) and the seed come from the model
args. The answer is the decoded sample cut before the first stop string: an ARM row stops as
soon as its text contains one, an MDM answer (all slots are filled together) is cut afterwards.

The answer length L is the request's ``max_gen_toks`` (the model args' default when the task
sets none), capped at half the model's context so a prompt keeps room; contexts longer than
``seq_len - L`` lose their oldest tokens (counted and reported on stderr).
"""

from __future__ import annotations

import math
import sys

from eval.generation.sampling import Sampler, SamplingConfig
from eval.measure.loading import EvalError

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
        prompts.append(list(tok.encode(context, add_special_tokens=False).ids))
        groups.setdefault(_settings(loaded, args, kwargs, where), []).append(i)
    answers: list[str] = [""] * len(requests)
    cut = 0
    for (length, temperature, top_p), members in groups.items():
        cfg = SamplingConfig(
            length=length,
            steps=args.steps,
            strategy=args.strategy,
            temperature=temperature,
            top_p=top_p,
            cfg_scale=args.cfg if loaded.family == "mdm" else 0.0,
            seed=args.seed,
            batch_size=args.batch_size or 16,
        )
        sampler = Sampler.from_loaded(loaded, cfg)

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
