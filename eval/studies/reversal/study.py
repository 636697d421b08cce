"""``maskscale study reverse``: the reversal-curse study (paper-notes.md, claim 5).

    maskscale study reverse --arm runs/arm --mdm runs/mdm --generate --seed 0 --epochs 10 \
        --out studies/reverse [--config configs/train/tiny-cpu.yaml] [key=value ...]
    maskscale study reverse --arm ... --mdm ... --data reversal_curse/data/june_version

Why: an ARM fine-tuned on "<name> is <description>" cannot answer "who is <description>?",
while an MDM, which learns every conditional of the sequence, can. The study runs that
experiment end to end from two pretrained runs:

1. data: Berglund et al.'s layout, written by the study (``--generate``, seeded) or read
   from ``--data`` (the original files work: same names and fields);
2. fine-tune each family on ``all_prompts_train.jsonl`` for ``--epochs`` with
   ``python -m pipeline.cli train task=sft`` in a subprocess, so each is an ordinary run
   directory (checkpoints, resume, export, MLflow) under ``OUT/runs/<family>-sft``. The MDM
   trains with the unconditional loss on prompt + completion (``sft.target=all``), as the
   paper; the ARM on completions; both at a global batch of 64 rows (SMDM's; an override
   ``batch.global_batch=N`` wins, the ``--config`` file's batch does not). A finished
   fine-tune (its ``summary.json`` and export exist, same training file, settings and batch)
   is skipped, an unfinished one resumes from its checkpoint, and one asked for more
   ``--epochs`` than it ran continues (``checkpoint.reschedule=true``);
3. sample every test prompt: MDM low-confidence, 32 steps, temperature 0 (``--block-length``:
   semi-autoregressive blocks, each filled before the next); ARM greedy with a KV cache;
   answers of ``--length`` tokens (default: the longest reference + 4);
4. rank every candidate answer of each test prompt by likelihood (multiple choice:
   does the model prefer the true name/description, against chance? Every candidate of a
   test file is scored as candidate + EOS padding to one width, its longest candidate + 1; a
   tie for first is no hit; ``--no-choice`` skips it);
5. with ``--cfg W`` (unsupervised classifier-free guidance; SMDM's evaluation samples with
   0.8), steps 3 and 4 run for the MDM twice, at w = 0 and at W, reported side by side
   (columns ``MDM`` and ``MDM-CFG<W>``); the default 0 runs it once, unguided;
6. score each question type and direction (contained answers, BLEU) and write
   ``OUT/answers.jsonl``, ``OUT/choices.jsonl``, ``OUT/results.json``, ``OUT/table.md`` and
   ``OUT/reverse.png``; log the metrics and files to an MLflow run ``study-reverse`` (in the
   fine-tunes' tracking store and experiment).

``key=value`` overrides go to both fine-tunes (after the study's own, so they win), e.g.
``optim.lr=1e-3 batch.global_batch=32``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from eval.studies.reversal.config import FAMILIES, TRAIN_FILE, ReverseStudyConfig, variant
from eval.studies.reversal.finetune import file_sha256, fine_tune, resolve_uri, say
from pipeline.configlib import ConfigError

STUDY_RUN = "study-reverse"


# ----------------------------------------------------------------------------- data


def prepare_data(cfg: ReverseStudyConfig) -> Path:
    """The data folder: ``--data`` checked, or generated (deterministic) into OUT/data."""
    from eval.studies.reversal.data import write_dataset

    if cfg.data is not None:
        folder = Path(cfg.data)
    else:
        folder = Path(cfg.out) / "data"
        write_dataset(folder, cfg.seed, cfg.people, cfg.train_templates, cfg.test_templates)
    read_tests(folder)  # fail before any training on a malformed test file
    if not (folder / TRAIN_FILE).is_file():
        raise ConfigError(f"{folder / TRAIN_FILE}: missing (Berglund et al.'s training file)")
    return folder


def read_tests(folder: Path) -> dict[str, list[dict]]:
    """Test file stem -> prompt/completion records; errors name file, line and field."""
    from eval.studies.reversal.score import TEST_FILES

    missing = [f"{s}.jsonl" for s in TEST_FILES if not (folder / f"{s}.jsonl").is_file()]
    if missing:
        raise ConfigError(
            f"{folder}: missing {', '.join(missing)}; pass a folder in Berglund et al.'s layout "
            "or --generate"
        )
    tests = {}
    for stem in TEST_FILES:
        path, records = folder / f"{stem}.jsonl", []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            for key in ("prompt", "completion"):
                if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                    raise ConfigError(f"{path}:{number}: field {key!r} missing or not a string")
            records.append({"prompt": rec["prompt"], "completion": rec["completion"]})
        if not records:
            raise ConfigError(f"{path}: no records")
        tests[stem] = records
    return tests


# ----------------------------------------------------------------------------- sampling


def prompt_template(overrides: list[str]) -> str:
    """The fine-tunes' ``sft.prompt_template`` (prompts are sampled in the trained format)."""
    template = "{prompt}"
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "sft.prompt_template":
            template = value
    return template


def answer_length(tokenizer, tests: dict[str, list[dict]]) -> int:
    longest = max(
        len(tokenizer.encode(r["completion"], add_special_tokens=False).ids)
        for rows in tests.values()
        for r in rows
    )
    return longest + 4


def sample_family(
    cfg: ReverseStudyConfig,
    family: str,
    loaded,
    tests: dict[str, list[dict]],
    cfg_scale: float = 0.0,
) -> tuple[dict[str, list[dict]], dict]:
    """Answers to every test prompt from one loaded fine-tune (guided by ``cfg_scale``: MDM
    only), each record's ``family`` its report name (``config.variant``), and the settings."""
    from eval.generation.sampling import Sampler, SamplingConfig

    tok, name = loaded.tokenizer, variant(family, cfg_scale)
    length = cfg.length or answer_length(tok, tests)
    scfg = SamplingConfig(length=length, steps=cfg.steps, strategy="low-confidence",
                          temperature=0.0, batch_size=cfg.batch_size, cache=True,
                          block_length=cfg.block_length if family == "mdm" else None,
                          cfg_scale=cfg_scale)  # fmt: skip
    sampler = Sampler.from_loaded(loaded, scfg)
    template = prompt_template(cfg.overrides)
    settings = {"length": length, "temperature": 0.0, "prompt_template": template}
    if family == "mdm":
        settings |= {
            "steps": cfg.steps,
            "strategy": "low-confidence",
            "block_length": cfg.block_length,
            "cfg_scale": cfg_scale,
        }
    settings |= {"kv_cache": True} if family == "arm" else {}
    out = {}
    start = time.perf_counter()
    for stem, rows in tests.items():
        prompts = [
            tok.encode(template.format(prompt=r["prompt"]), add_special_tokens=False).ids
            for r in rows
        ]
        samples = sampler.generate(prompts, progress=True)
        out[stem] = [
            {**r, "family": name, "file": stem, "answer": tok.decode(s.tokens)}
            for r, s in zip(rows, samples, strict=True)
        ]
    settings["seconds"] = round(time.perf_counter() - start, 2)
    say(f"{name.upper()} sampled {sum(map(len, tests.values()))} prompts in "
        f"{settings['seconds']:.1f} s ({_describe(settings)})")  # fmt: skip
    return out, settings


def _describe(s: dict) -> str:
    """One line of sampling settings (an MDM's have ``steps``)."""
    if "steps" in s:
        blocks = f" in blocks of {s['block_length']}" if s.get("block_length") else ""
        cfg = f", CFG w={s['cfg_scale']:g}" if s.get("cfg_scale") else ""
        return f"L={s['length']}, {s['steps']} steps low-confidence{blocks}, temperature 0{cfg}"
    return f"L={s['length']}, greedy, KV cache"


# ----------------------------------------------------------------------------- report


def write_report(
    cfg: ReverseStudyConfig,
    data: Path,
    answers: list[dict],
    settings: dict,
    runs: dict,
    ranked: list[dict],
) -> tuple[list, list[Path]]:
    """Score the answers (and the rankings, when any); write answers.jsonl, results.json,
    table.md, reverse.png and choices.jsonl."""
    from eval.measure.outputs import write_json_atomic, write_text_atomic
    from eval.studies.reversal.choice import choice_metrics, score_choices
    from eval.studies.reversal.score import TEST_FILES, bar_plot, metrics_of, score_file

    out, names = Path(cfg.out), list(settings)  # arm, mdm[, mdm-cfgW]
    cells = [
        score_file(fam, stem, [a for a in answers if a["family"] == fam and a["file"] == stem])
        for fam in names
        for stem in TEST_FILES
    ]
    choices = (
        [
            score_choices(fam, stem, [r for r in ranked if (r["family"], r["file"]) == (fam, stem)])
            for fam in names
            for stem in TEST_FILES
        ]
        if ranked
        else []
    )
    files = [write_text_atomic(out / "answers.jsonl", _jsonl(answers))]
    files += [write_text_atomic(out / "choices.jsonl", _jsonl(ranked))] if ranked else []
    results = {
        "data": str(data), "train_sha256": file_sha256(data / TRAIN_FILE),
        "config": asdict(cfg), "runs": {k: str(v) for k, v in runs.items()},
        "sampling": settings, "cells": [asdict(c) | {"label": c.label} for c in cells],
        "choices": [asdict(c) for c in choices], "metrics": metrics_of(cells) | choice_metrics(choices),
        "choice_widths": {r["file"]: r["width"] for r in ranked},
    }  # fmt: skip
    files.append(write_json_atomic(out / "results.json", results))
    table = _table_text(cfg, data, runs, settings, cells, choices)
    files.append(write_text_atomic(out / "table.md", table))
    title = f"Reversal curse ({cfg.epochs_text()})"
    files.append(bar_plot(cells, out / "reverse.png", title, choices=choices))
    return cells, files


def _table_text(
    cfg: ReverseStudyConfig, data: Path, runs: dict, settings: dict, cells: list, choices: list
) -> str:
    """table.md: what was run, the sampled table and, when ranked, the multiple-choice one."""
    from eval.studies.reversal.choice import choice_table
    from eval.studies.reversal.score import markdown_table

    head = (
        f"# Reversal-curse study\n\nData: `{data}`; fine-tunes: "
        + ", ".join(f"{k.upper()} `{v}`" for k, v in runs.items())
        + f", {cfg.epochs_text()}.\nSampling: "
        + "; ".join(f"{k.upper()} {_describe(s)}" for k, s in settings.items())
        + ".\nMetric: reference contained in output (%), BLEU for name→description.\n"
        + _guidance_note(cfg)
        + "\n"
    )
    table = head + markdown_table(cells)
    if choices:
        table += (
            "\nMultiple choice: the true answer alone has the highest likelihood among every "
            "candidate of its test file (a tie for first is no hit), each candidate scored as "
            "candidate + EOS padding to one width per file, the longest candidate + 1 tokens "
            "(ARM exact, MDM chain rule; `eval/studies/reversal/choice.py`).\n\n"
            + choice_table(choices)
        )
    return table


def _guidance_note(cfg: ReverseStudyConfig) -> str:
    """What the guided MDM column is, when there is one."""
    if not cfg.cfg_scale:
        return ""
    name = variant("mdm", cfg.cfg_scale).upper()
    return (
        f"{name}: the same MDM fine-tune sampled and scored with unsupervised classifier-free "
        f"guidance w = {cfg.cfg_scale:g} (`--cfg`), beside MDM without (w = 0).\n"
    )


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def log_study(cfg: ReverseStudyConfig, metrics: dict[str, float], files: list[Path]) -> str | None:
    """An MLflow run ``study-reverse`` with the metrics and the report files."""
    import warnings

    uri = resolve_uri(cfg)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment)
        tags = {"study": "reverse", "arm_init": str(cfg.arm), "mdm_init": str(cfg.mdm)}
        rid = client.create_run(exp_id, run_name=STUDY_RUN, tags=tags).info.run_id
        for key in (
            "epochs", "mdm_epochs", "steps", "block_length", "cfg_scale", "seed", "data", "people"
        ):  # fmt: skip
            client.log_param(rid, key, str(getattr(cfg, key)))
        for key, value in metrics.items():
            client.log_metric(rid, key.replace("→", "-"), float(value))
        for path in files:
            client.log_artifact(rid, str(path))
        client.set_terminated(rid)
        return rid
    except Exception as e:  # the report on disk is what matters; MLflow is a copy
        warnings.warn(f"could not log the study to MLflow at {uri}: {e}", RuntimeWarning, 2)
        return None


def run_study(cfg: ReverseStudyConfig) -> dict:
    """The whole study (module docstring); returns results.json's content plus the run id."""
    from eval.measure.loading import load_model
    from eval.studies.reversal.choice import rank_answers

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg)
    tests = read_tests(data)
    say(f"data {data}: " + ", ".join(f"{k} {len(v)}" for k, v in tests.items()))
    runs = {fam: fine_tune(cfg, fam, data) for fam in FAMILIES}
    answers, settings, ranked = [], {}, []
    for fam in FAMILIES:
        loaded = load_model(runs[fam], None, cfg.device, cfg.dtype)
        for w in cfg.cfg_scales(fam):  # the MDM unguided, then guided with --cfg
            name = variant(fam, w)
            by_file, settings[name] = sample_family(cfg, fam, loaded, tests, w)
            answers += [a for rows in by_file.values() for a in rows]
            if cfg.choice:
                by_file = rank_answers(loaded, tests, prompt_template(cfg.overrides), cfg_scale=w)
                ranked += [
                    r | {"family": name, "file": f} for f, rows in by_file.items() for r in rows
                ]
                say(f"{name.upper()} ranked every candidate answer of each test prompt")
        del loaded
    cells, files = write_report(cfg, data, answers, settings, runs, ranked)
    results = json.loads((out / "results.json").read_text())
    results["mlflow_run_id"] = log_study(cfg, results["metrics"], files) if cfg.mlflow else None
    return results


# ----------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    study = subparsers.add_parser("study", help="generation studies (reversal curse)")
    sub = study.add_subparsers(dest="study_command", metavar="STUDY")
    p = sub.add_parser(
        "reverse",
        help="reversal-curse study: fine-tune an ARM and an MDM, test both directions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arm", required=True, metavar="RUN", help="pretrained ARM run")
    p.add_argument("--mdm", required=True, metavar="RUN", help="pretrained MDM run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="Berglund et al.'s files (their layout)")
    src.add_argument("--generate", action="store_true", help="generate the data offline")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--people", type=int, default=30, help="generated people per group (30)")
    p.add_argument("--train-templates", type=int, default=30, help="per direction (30)")
    p.add_argument("--test-templates", type=int, default=10, help="per direction (10)")
    p.add_argument("--epochs", type=float, default=10.0, help="fine-tuning epochs (10)")
    p.add_argument("--mdm-epochs", type=float, help="the MDM's epochs (default: --epochs)")
    p.add_argument("--out", default="studies/reverse", help="study folder")
    p.add_argument("--config", help="training recipe YAML for the fine-tunes")
    p.add_argument("--steps", type=int, default=32, help="MDM sampling steps (32)")
    p.add_argument(
        "--block-length", type=int, help="MDM semi-autoregressive blocks (default: none)"
    )
    p.add_argument("--length", type=int, help="answer tokens (default: longest reference + 4)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per sampling batch")
    p.add_argument("--tracking-uri", help="MLflow URI (default: the ARM init run's)")
    p.add_argument("--experiment", default="study-reverse", help="MLflow experiment")
    p.add_argument("--no-mlflow", action="store_true", help="no MLflow at all")
    p.add_argument("--device", default="auto", help="sampling device: auto, cpu, cuda:N")
    p.add_argument("--dtype", default="auto", help="sampling dtype: auto, fp32, bf16")
    p.add_argument(
        "--no-choice", action="store_true", help="skip the likelihood ranking of candidates"
    )
    p.add_argument(
        "--cfg", type=float, default=0.0, metavar="W",
        help="MDM classifier-free guidance scale for sampling and likelihood; W > 0 reports "
        "the MDM with and without it (SMDM's evaluate_reverse: 0.8; default 0)",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for both fine-tunes")
    p.set_defaults(func=cmd_reverse)
    study.set_defaults(func=lambda args: study.print_help() or 2)


def cmd_reverse(args: argparse.Namespace) -> int:
    from eval.measure.loading import EvalError

    cfg = ReverseStudyConfig(
        arm=args.arm, mdm=args.mdm, out=args.out, data=args.data, seed=args.seed,
        people=args.people, train_templates=args.train_templates,
        test_templates=args.test_templates, epochs=args.epochs, config=args.config,
        mdm_epochs=args.mdm_epochs,
        overrides=list(args.overrides or []), steps=args.steps, length=args.length,
        block_length=args.block_length,
        batch_size=args.batch_size, tracking_uri=args.tracking_uri,
        experiment=args.experiment, mlflow=not args.no_mlflow, device=args.device,
        dtype=args.dtype, choice=not args.no_choice, cfg_scale=args.cfg,
    )  # fmt: skip
    try:
        results = run_study(cfg)
    except (EvalError, ConfigError, ValueError) as e:
        print(f"maskscale study reverse: {e}", file=sys.stderr)
        return 2
    print((Path(cfg.out) / "table.md").read_text())
    if results["mlflow_run_id"]:
        say(f"logged to MLflow run {results['mlflow_run_id']} ({STUDY_RUN})")
    say(f"results: {Path(cfg.out) / 'results.json'}, plot: {Path(cfg.out) / 'reverse.png'}")
    return 0
