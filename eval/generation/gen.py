"""``maskscale eval gen``: conditional generation, quality against speed per MDM step count.

The paper's generation claim is a trade-off: an MDM answers faster with fewer reverse-process
steps and worse with too few. This command measures both sides on a prompt file, for every step
count asked for, with the one sampler everything else uses (``eval.generation.sampling.Sampler``):

* speed: wall time per answer. The first batch of each step count is a warm-up (run, not
  timed: kernel selection, allocator growth); then every batch is timed (CUDA synchronised)
  and divided by its size; the reported value is the median over batches.
* quality proxies: the perplexity of the answers under a reference ARM (``--judge RUN``) given
  their prompts, ``exp(-sum log p(answer | prompt) / answer tokens)`` over all answers, with the
  exact ARM likelihood of ``eval.measure.likelihood.Scorer`` (the judge scores the sampled token ids
  when it shares the run's tokenizer, else the re-tokenised texts); and distinct-n, unique
  n-grams / all n-grams over every answer's whitespace words (tokenizer-independent, so runs
  with different tokenizers compare), for n = 1, 2. Low judge ppl with low distinct-n means
  repetitive text: read the two together.

An ARM run has no step count: it is sampled once with its KV cache (the step list is ignored
and the report says so), giving the ARM point of the same table.

Prompts: JSONL, either ``{"prompt": str}`` or MT-Bench's question layout (``question_id``,
``turns``: the first turn is the prompt; ``category`` is kept). No chat template is applied.
A bad line stops the run before any model loads, naming file:line and the field.

Outputs (``--out``, default ``RUN_DIR/eval/gen``): ``gen.json`` (settings, one row per step
count, per-answer token counts and judge log-probs), ``gen.md`` (the table), ``gen.png`` (judge
ppl and distinct-n against seconds per answer, one point per step count) and, for an external
judge, one MT-Bench answer file per step count in FastChat's layout
``model_answer/<model_id>.jsonl`` (``question_id``, ``answer_id``, ``model_id``,
``choices: [{index: 0, turns: [answer]}]``, ``tstamp``). All of it is logged to the run's
MLflow run (metrics ``eval/gen/<point>/...``, files as artifacts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eval.generation.sampling import STRATEGIES, Sample, Sampler, SamplingConfig
from eval.measure.loading import EvalError, LoadedModel, dtype_name, jsonl_records, load_model
from eval.measure.outputs import (
    log_to_mlflow,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)

FORMAT = "maskscale-eval-gen/1"
ANSWER_DIR = "model_answer"
"""FastChat's llm_judge reads every ``<model_id>.jsonl`` of this folder."""
DISTINCT_N = (1, 2)


@dataclass
class GenConfig:
    """Settings of a generation-quality evaluation (recorded with its results)."""

    steps: list[int] = field(default_factory=list)
    """MDM reverse-process step counts, one table row each; empty = L, L/2, L/4, L/8."""
    length: int = 64
    """New tokens L per answer (the MDM's answer slots, the most an ARM writes)."""
    strategy: str = "low-confidence"
    """MDM unmasking: ``low-confidence`` or ``random``."""
    temperature: float = 0.0
    """Sampling temperature; 0 = argmax (deterministic)."""
    batch_size: int = 8
    """Prompts per generation batch, the unit that is timed."""
    seed: int = 0
    """Hashed with each prompt's tokens into its sampling seed."""

    def validate(self) -> None:
        for key in ("length", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise EvalError(f"--{key.replace('_', '-')}: must be a positive integer")
        if any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise EvalError(f"--steps: every step count must be a positive integer: {self.steps}")
        if self.strategy not in STRATEGIES:
            raise EvalError(f"--strategy {self.strategy!r}: choose one of {STRATEGIES}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EvalError(f"--temperature: must be >= 0, got {self.temperature}")

    def step_counts(self) -> list[int]:
        """The step counts to run, ascending, without repeats."""
        if self.steps:
            return sorted(set(self.steps))
        return sorted({max(1, self.length // d) for d in (1, 2, 4, 8)})


@dataclass(frozen=True)
class Prompt:
    question_id: int | str
    text: str
    category: str | None = None


# ----------------------------------------------------------------------------- prompts


def _prompt_of(obj, where: str) -> tuple[str, object]:
    """(prompt text, question id or None) of one parsed line."""
    if not isinstance(obj, dict):
        raise EvalError(f"{where}: expected a JSON object with 'prompt' or 'turns'")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise EvalError(f"{where}: field 'prompt' must be a string")
        return obj["prompt"], obj.get("question_id")
    turns = obj.get("turns")
    if turns is None:
        raise EvalError(
            f"{where}: no 'prompt' field and no 'turns' (MT-Bench layout); give one of them"
        )
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise EvalError(f"{where}: field 'turns' must be a non-empty list of strings")
    if "question_id" not in obj:
        raise EvalError(f"{where}: MT-Bench question without 'question_id'")
    return turns[0], obj["question_id"]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file (blank lines skipped); errors name file:line and the field.
    A record without ``question_id`` gets its 1-based position in the file's prompts."""
    prompts: list[Prompt] = []
    seen: dict[object, str] = {}
    for where, obj in jsonl_records(path, "--prompts"):
        text, qid = _prompt_of(obj, where)
        qid = len(prompts) + 1 if qid is None else qid
        if not isinstance(qid, int | str) or isinstance(qid, bool):
            raise EvalError(f"{where}: field 'question_id' must be an integer or a string")
        if qid in seen:
            raise EvalError(f"{where}: question_id {qid!r} repeats line {seen[qid]}")
        seen[qid] = where.rsplit(":", 1)[1]
        category = obj.get("category")
        prompts.append(Prompt(qid, text, category if isinstance(category, str) else None))
    if not prompts:
        raise EvalError(f"{path}: no prompts (every line is empty)")
    return prompts


# ----------------------------------------------------------------------------- metrics


def distinct_n(texts: list[list[str]] | list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams over every sequence (n-grams never span two sequences);
    NaN when there is no n-gram at all."""
    grams = [tuple(seq[i : i + n]) for seq in texts for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def judge_scores(judge: LoadedModel | None, loaded: LoadedModel, prompt_ids, samples, texts):
    """log p(answer | prompt) under the judge ARM per answer (None without a judge) and the
    answer's token count in the judge's tokenizer."""
    from eval.measure.likelihood import Scorer

    if judge is None:
        return [None] * len(samples), [len(s.tokens) for s in samples]
    if judge.tokenizer_sha256 == loaded.tokenizer_sha256:
        requests = [(p, s.tokens) for p, s in zip(prompt_ids, samples, strict=True)]
    else:
        enc = judge.tokenizer.encode
        requests = [
            (enc(prompt, add_special_tokens=False).ids, enc(text, add_special_tokens=False).ids)
            for prompt, text in texts
        ]
    scorable = [i for i, (_, y) in enumerate(requests) if y]
    results = Scorer.from_loaded(judge).loglikelihood([requests[i] for i in scorable])
    logprobs: list[float | None] = [0.0] * len(requests)
    for i, res in zip(scorable, results, strict=True):
        logprobs[i] = res.logprob
    return logprobs, [len(y) for _, y in requests]


def summarise(point: dict, samples: list[Sample], answers: list[str], logprobs, n_judged):
    """Fill a table row from its answers."""
    words = [a.split() for a in answers]
    n_tokens = sum(len(s.tokens) for s in samples)
    point.update(
        answers=len(samples),
        tokens_per_answer=n_tokens / len(samples),
        eos_rate=sum(s.eos for s in samples) / len(samples),
        empty_answers=sum(1 for s in samples if not s.tokens),
        **{f"distinct_{n}": distinct_n(words, n) for n in DISTINCT_N},
    )
    point["tokens_per_s"] = n_tokens / len(samples) / point["sec_per_answer"]
    if logprobs[0] is None:
        point["judge_nll"] = point["judge_ppl"] = None
        return point
    total = sum(n_judged)
    nll = -math.fsum(logprobs) / total if total else math.nan
    point["judge_nll"], point["judge_ppl"] = nll, math.exp(min(nll, 700.0))
    return point


# ----------------------------------------------------------------------------- sampling


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(sampler: Sampler, prompt_ids: list[list[int]], bar) -> tuple[list, list]:
    """(samples in prompt order, seconds per answer of each timed batch). Batches group
    prompts of similar length; the first batch runs once more beforehand as the warm-up."""
    size = sampler.cfg.batch_size
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    sampler.generate([prompt_ids[i] for i in batches[0]])  # warm-up, not timed
    bar.update()
    samples: list[Sample | None] = [None] * len(prompt_ids)
    per_answer = []
    for batch in batches:
        _sync(sampler.device)
        start = time.perf_counter()
        got = sampler.generate([prompt_ids[i] for i in batch])
        _sync(sampler.device)
        per_answer.append((time.perf_counter() - start) / len(batch))
        for i, s in zip(batch, got, strict=True):
            samples[i] = s
        bar.update()
    return samples, per_answer  # type: ignore[return-value]


def evaluate(
    loaded: LoadedModel,
    prompts: list[Prompt],
    cfg: GenConfig,
    judge: LoadedModel | None = None,
    progress: bool = True,
) -> dict:
    """The gen report of one run: one point per step count (one point for an ARM)."""
    cfg.validate()
    tok = loaded.tokenizer
    prompt_ids = [tok.encode(p.text, add_special_tokens=False).ids for p in prompts]
    mdm = loaded.family == "mdm"
    counts = cfg.step_counts() if mdm else [None]
    n_batches = math.ceil(len(prompts) / cfg.batch_size) + 1
    bar = tqdm(total=len(counts) * n_batches, desc="gen", unit="batch", disable=not progress)
    points = []
    for steps in counts:
        bar.set_postfix_str(f"steps={steps}" if mdm else "ARM")
        sampler = Sampler.from_loaded(loaded, sampling_config(cfg, steps, mdm))
        samples, per_answer = timed_generate(sampler, prompt_ids, bar)
        answers = [tok.decode(s.tokens) for s in samples]
        texts = [(p.text, a) for p, a in zip(prompts, answers, strict=True)]
        logprobs, n_judged = judge_scores(judge, loaded, prompt_ids, samples, texts)
        point = {
            "point": f"s{steps}" if mdm else "arm",
            "steps": steps,
            "model_id": f"{loaded.name}-steps{steps}" if mdm else loaded.name,
            "sec_per_answer": statistics.median(per_answer),
            "batches_timed": len(per_answer),
        }
        summarise(point, samples, answers, logprobs, n_judged)
        point["answer_tokens"] = [len(s.tokens) for s in samples]
        point["judge_logprob"] = logprobs
        point["answer_texts"] = answers
        points.append(point)
    bar.close()
    return {
        "format": FORMAT,
        "run": loaded.name,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "family": loaded.family,
        "step": loaded.step,
        "judge": judge.name if judge is not None else None,
        "judge_dir": str(judge.run_dir or judge.export_dir) if judge is not None else None,
        "settings": {
            **asdict(cfg),
            "device": str(loaded.device),
            "dtype": dtype_name(loaded.dtype),
        },
        "note": None if mdm else "ARM run: one KV-cache pass; the step list does not apply",
        "questions": [p.question_id for p in prompts],
        "points": points,
    }


def sampling_config(cfg: GenConfig, steps: int | None, mdm: bool) -> SamplingConfig:
    return SamplingConfig(
        length=cfg.length,
        steps=steps,
        strategy=cfg.strategy if mdm else "low-confidence",
        temperature=cfg.temperature,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )


# ----------------------------------------------------------------------------- outputs


def answer_records(report: dict, point: dict, prompts: list[Prompt]) -> list[dict]:
    """MT-Bench answer-file records of one point (FastChat llm_judge layout)."""
    stamp = time.time()
    records = []
    for p, text in zip(prompts, point["answer_texts"], strict=True):
        key = f"{point['model_id']}\0{p.question_id}\0{text}".encode()
        record = {
            "question_id": p.question_id,
            "answer_id": hashlib.blake2b(key, digest_size=11).hexdigest(),
            "model_id": point["model_id"],
            "choices": [{"index": 0, "turns": [text]}],
            "tstamp": stamp,
        }
        if p.category is not None:
            record["category"] = p.category
        records.append(record)
    return records


def _fmt(value, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def markdown(report: dict, png_name: str) -> str:
    judge = report["judge"] or "none (pass --judge ARM_RUN)"
    lines = [
        f"# Generation quality vs speed: {report['run']} ({report['family'].upper()})",
        "",
        f"{len(report['questions'])} prompts, L={report['settings']['length']}, "
        f"temperature {report['settings']['temperature']:g}, judge: {judge}.",
        "",
        "| steps | s/answer | tokens/s | tokens/answer | judge ppl | distinct-1 | distinct-2 "
        "| EOS rate | empty |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['steps'] if p['steps'] is not None else 'ARM'} | {p['sec_per_answer']:.4f} "
            f"| {p['tokens_per_s']:.1f} | {p['tokens_per_answer']:.1f} "
            f"| {_fmt(p['judge_ppl'], '.2f')} | {_fmt(p['distinct_1'], '.3f')} "
            f"| {_fmt(p['distinct_2'], '.3f')} | {p['eos_rate']:.2f} | {p['empty_answers']} |"
        )
    if report["note"]:
        lines += ["", report["note"] + "."]
    lines += ["", f"![quality vs speed]({png_name})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Judge ppl (left) and distinct-n (right) against seconds per answer, one labelled
    point per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    x = [p["sec_per_answer"] for p in pts]
    labels = [str(p["steps"]) if p["steps"] is not None else "ARM" for p in pts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    series = [(left, "judge_ppl", "judge ppl")] + [
        (right, f"distinct_{n}", f"distinct-{n}") for n in DISTINCT_N
    ]
    for ax, key, name in series:
        y = [math.nan if p[key] is None else p[key] for p in pts]
        ax.plot(x, y, marker="o", label=name)
        for xi, yi, label in zip(x, y, labels, strict=True):
            ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_ylabel(f"perplexity under {report['judge'] or '(no judge)'}")
    right.set_ylabel("unique / all n-grams")
    for ax in (left, right):
        ax.set_xlabel("seconds per answer (median over batches)")
        ax.grid(alpha=0.3)
    right.legend()
    fig.suptitle(f"{report['run']}: quality vs speed (labels: steps)")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path


def metrics_of(report: dict) -> dict[str, float]:
    keys = ("sec_per_answer", "tokens_per_s", "judge_ppl", "distinct_1", "distinct_2")
    return {
        f"eval/gen/{p['point']}/{k}": p[k]
        for p in report["points"]
        for k in keys
        if p[k] is not None
    }


def write_report(report: dict, prompts: list[Prompt], out: Path, run_dir: Path | None) -> dict:
    """Write every output file (atomically) and log them to the run's MLflow run."""
    paths = {"png": plot(report, out / "gen.png")}
    paths["md"] = write_text_atomic(out / "gen.md", markdown(report, "gen.png"))
    paths["json"] = write_json_atomic(out / "gen.json", report)
    for p in report["points"]:
        text = "".join(json.dumps(r) + "\n" for r in answer_records(report, p, prompts))
        paths[p["point"]] = write_text_atomic(out / ANSWER_DIR / f"{p['model_id']}.jsonl", text)
    log_to_mlflow(run_dir, metrics_of(report), report["step"] or 0, list(paths.values()))
    return paths


# ----------------------------------------------------------------------------- command


def parse_steps(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EvalError(f"--steps {text!r}: give comma-separated integers, e.g. 16,32,64") from None


def config_from_args(args: argparse.Namespace) -> GenConfig:
    cfg = GenConfig(
        steps=parse_steps(args.steps),
        length=args.length,
        strategy=args.strategy,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    cfg.validate()
    return cfg


def load_judge(args: argparse.Namespace) -> LoadedModel | None:
    if not args.judge:
        return None
    judge = load_model(args.judge, None, args.device, args.dtype)
    if judge.family != "arm":
        raise EvalError(f"--judge {args.judge}: an MDM run; the judge must be an ARM run")
    return judge


def cmd_gen(args: argparse.Namespace) -> int:
    from pipeline.configlib import ConfigError

    try:
        cfg = config_from_args(args)
        prompts = read_prompts(args.prompts)
        loaded = load_model(args.run, args.checkpoint, args.device, args.dtype)
        if loaded.family == "arm" and cfg.steps:
            print(f"[gen] {loaded.name} is an ARM run: --steps does not apply; one KV-cache "
                  "pass gives its point", file=sys.stderr)  # fmt: skip
        judge = load_judge(args)
        Sampler.from_loaded(loaded, sampling_config(cfg, None, loaded.family == "mdm"))
    except (EvalError, ConfigError) as e:
        print(f"maskscale eval gen: {e}", file=sys.stderr)
        return 2
    report = evaluate(loaded, prompts, cfg, judge)
    out = Path(args.out) if args.out else loaded.out_dir / "gen"
    write_report(report, prompts, out, loaded.run_dir)
    print(markdown(report, "gen.png"))
    print(f"report: {out / 'gen.md'} (+ gen.json, gen.png, {ANSWER_DIR}/*.jsonl)")
    return 0
