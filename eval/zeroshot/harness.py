"""maskscale models inside the lm-evaluation-harness, and the zero-shot runs built on them.

Why the real harness: the paper's zero-shot numbers come from lm-evaluation-harness tasks
(prompt templates, answer sets, metrics), so reimplementing them would measure something else.
The harness only needs a model that answers ``loglikelihood`` requests (text pairs) and
``loglikelihood_rolling`` requests (whole texts). ``MaskscaleLM`` is that model for both
families: ``text.TextScorer`` turns text into token ids with the run's own tokenizer (the
harness's pair split after the EOS that starts every training document, ``tasks.encode_pair``)
and hands them to ``likelihood.Scorer`` - exact for an ARM; Monte Carlo ELBO or chain rule,
optionally with unsupervised classifier-free guidance, for an MDM. ``generate_until`` requests
are answered by ``sampling.Sampler`` (``eval/generation/generate.py``: MDM reverse process with
the model args' steps / strategy / block_length / cfg; ARM KV-cache sampling), with the task's
``until`` stop strings, ``max_gen_toks``, ``temperature`` / ``do_sample`` and ``top_p``.

Guidance is not the model's likelihood: with ``cfg`` != 0 (MDM) ``loglikelihood_rolling`` is
refused (a whole text has no prompt to guide, and its word / byte perplexity would pass for the
model's), and ``run_groups`` renames every perplexity-type metric the harness derived from the
guided log-likelihoods (``perplexity``, ``word_perplexity``, ``byte_perplexity``,
``bits_per_byte``) to ``cfg_<metric>``. Through bare ``lm_eval`` no such renaming happens: use
``maskscale eval harness``, or cfg=0, when a task reports perplexity.

``lm-eval`` >= 0.4.12 is required (pyproject pins it; ``MaskscaleLM`` checks it): older
evaluators reach for ``lm.accelerator`` under data parallelism. The harness's ``--batch_size``
(an int, or the command line's string: ``"8"``, ``"auto"``, ``"auto:4"``) sets rows per
forward as a token budget of batch_size x seq_len; ``auto`` leaves the token budget to
``token_budget`` (or the Scorer's default); ``max_batch_size`` is not used.

It is registered as ``maskscale`` (family from the run), ``maskscale-arm`` and ``maskscale-mdm``
(the same, but refusing a run of the other family), so ``lm_eval.simple_evaluate(model=
"maskscale", model_args="path=RUN,estimator=chain_rule,cfg=1.1")`` works once this module is
imported. ``maskscale eval harness`` (eval/zeroshot/cli.py) checks the task names
(``task_manager``) before loading anything, then ``run_groups`` evaluates: the paper's eight
tasks need different estimators and CFG scales (``configs/eval/paper-tasks.yaml``), so each
group of tasks sharing model args gets one ``simple_evaluate`` call on the one loaded model, and
the results merge into a single dict the harness's table printer accepts. Under ``torchrun``
the harness shards requests by rank and gathers metrics on rank 0 through the model's
``all_gather`` / ``gather_object`` / ``barrier`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path

import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.measure.loading import EvalError, load_model
from eval.measure.ppl import init_distributed
from eval.zeroshot.text import ModelArgs, TextScorer, parse_model_args

PAPER_TASKS = "eval/paper-tasks.yaml"
"""The reference's protocol, inside the config folder (pipeline/configdir.py)."""
MIN_HARNESS = (0, 4, 12)
"""Oldest lm-eval whose evaluator uses only what ``MaskscaleLM`` has (``device``, ``rank``,
``world_size``, ``all_gather``, ``gather_object``, ``barrier``); 0.4.11 and older call
``lm.accelerator``."""
PERPLEXITIES = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
"""Harness metrics computed from log-likelihoods as if they were the model's."""


def check_harness_version(text: str) -> None:
    """Refuse an lm-eval older than MIN_HARNESS, saying how to upgrade."""
    got = tuple(int(x) for x in re.findall(r"\d+", text)[:3])
    if got < MIN_HARNESS:
        need = ".".join(map(str, MIN_HARNESS))
        raise EvalError(
            f"lm-eval {text} is older than {need}: its evaluator calls lm.accelerator, which "
            f"maskscale models do not have; pip install 'lm-eval>={need},<0.5'"
        )


# ----------------------------------------------------------------------------- harness model


@register_model("maskscale")
class MaskscaleLM(LM):
    """lm-evaluation-harness model for maskscale ARM and MDM runs (see the module docstring)."""

    family: str | None = None
    """Family this registered name insists on (None: whatever the run is)."""

    def __init__(self, loaded=None, max_batch_size=None, **kwargs):
        super().__init__()
        check_harness_version(installed_version("lm_eval"))
        self.args = ModelArgs(**parse_model_args(kwargs))
        self.args.validate()
        if loaded is None:
            if not self.args.path:
                raise EvalError("model arg path=RUN_DIR (or an export dir) is required")
            loaded = load_model(
                self.args.path, self.args.checkpoint, self.args.device, self.args.dtype
            )
        if self.family is not None and loaded.family != self.family:
            raise EvalError(
                f"{self.args.path or loaded.export_dir} is an {loaded.family.upper()} run; use "
                f"model 'maskscale-{loaded.family}' or 'maskscale'"
            )
        self.text = TextScorer(loaded, self.args)
        self._device = loaded.device
        self._rank, self._world_size = init_distributed(loaded.device)

    # data parallel under torchrun: the harness shards requests by rank and gathers on rank 0
    # through these four methods (single process: the base class's no-ops)

    def all_gather(self, tensor):
        if self._world_size == 1:
            return tensor
        import torch
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    @property
    def loaded(self):
        return self.text.loaded

    @property
    def tokenizer_name(self) -> str:
        return f"maskscale-{self.loaded.tokenizer_sha256[:16]}"

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        if not requests:
            return []
        return self.text.score([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self.text.loglikelihood_rolling(r.args[0]) for r in requests]

    def generate_until(self, requests) -> list[str]:
        from eval.generation.generate import generate_until

        return generate_until(self.loaded, self.args, [tuple(r.args) for r in requests])


@register_model("maskscale-arm")
class MaskscaleARM(MaskscaleLM):
    family = "arm"


@register_model("maskscale-mdm")
class MaskscaleMDM(MaskscaleLM):
    family = "mdm"


# ----------------------------------------------------------------------------- paper tasks


@dataclass
class TaskChoice:
    """One task of configs/eval/paper-tasks.yaml and the reference's settings for it."""

    task: str
    estimator: str = "mc"
    """MDM likelihood estimator for this task (``mc`` or ``chain_rule``)."""
    cfg: float = 0.0
    """Unsupervised CFG scale for this task."""
    mc_samples: int | None = None
    """Overrides the file's ``mc_samples`` for this task."""
    greedy: bool = False
    """MDM ``is_greedy`` by greedy unmasking: only tasks whose metric uses it (LAMBADA's acc)."""


@dataclass
class PaperTasks:
    """The reference's zero-shot protocol: tasks, estimators, CFG scales, MC samples."""

    tasks: list[TaskChoice] = field(default_factory=list)
    mc_samples: int = 1024
    """Monte Carlo samples per continuation (the reference's mc_num)."""
    num_fewshot: int = 0
    """Shots (the paper reports zero-shot)."""


def load_paper_tasks(path: str | Path | None = None) -> PaperTasks:
    """Parse and validate the per-task choices file (default: the shipped PAPER_TASKS)."""
    from pipeline.configdir import config_path, resolve_config_file

    path = config_path(PAPER_TASKS) if path is None else resolve_config_file(path)
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"tasks", "mc_samples", "num_fewshot"}
    if unknown:
        raise EvalError(f"{path}: unknown key(s) {sorted(unknown)}")
    choices = []
    for i, entry in enumerate(raw.get("tasks") or []):
        try:
            choice = TaskChoice(**entry)
        except TypeError as e:
            raise EvalError(f"{path}: tasks[{i}]: {e}") from None
        ModelArgs(
            estimator=choice.estimator, cfg=float(choice.cfg), greedy=choice.greedy
        ).validate()
        choices.append(choice)
    if not choices:
        raise EvalError(f"{path}: no tasks")
    return PaperTasks(choices, int(raw.get("mc_samples", 1024)), int(raw.get("num_fewshot", 0)))


def group_tasks(
    choices: list[TaskChoice], family: str, base: dict, default_mc: int
) -> list[tuple[list[str], dict]]:
    """[(tasks, model args)] with one entry per distinct setting; ``base`` (the user's
    --model-args) wins over the file. ARM likelihoods are exact, so an ARM gets one group."""
    groups: dict[tuple, list[str]] = {}
    for c in choices:
        if family == "arm":
            args = {**base}
        else:
            per_task = {"estimator": c.estimator, "cfg": float(c.cfg), "greedy": bool(c.greedy)}
            per_task["mc_samples"] = c.mc_samples or default_mc
            args = {**per_task, **base}
        groups.setdefault(tuple(sorted(args.items())), []).append(c.task)
    return [(tasks, dict(key)) for key, tasks in groups.items()]


# ----------------------------------------------------------------------------- running


def task_manager(include_path: str | Path | None, tasks: list[str]):
    """A harness TaskManager that knows ``tasks``, refusing unknown names before any model loads.

    Indexing the harness's own task library takes seconds, so when every requested task is
    defined under ``include_path`` only that folder is indexed.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path}: no such directory of task YAMLs")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise EvalError(
            f"unknown task(s) {unknown}: not a harness task, group or tag, nor defined by a "
            "YAML under --include-path (see `lm_eval ls tasks` for the harness's names)"
        )
    return manager


def evaluate(lm: MaskscaleLM, tasks: list[str], manager, **kw) -> dict:
    """One ``lm_eval.simple_evaluate`` call; dataset download failures become EvalErrors."""
    import os

    import lm_eval

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap stderr without a process pool
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, log_samples=False, **kw
        )
    except ConnectionError as e:
        raise EvalError(
            f"a dataset of {tasks} is not available offline ({e}); download it once with "
            "network access (HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0) so it lands in the "
            "Hugging Face cache, or use local task YAMLs with --include-path"
        ) from None
    return res


def run_groups(loaded, groups: list[tuple[list[str], dict]], manager, **kw) -> dict:
    """Evaluate each (tasks, model args) group on one loaded model; merge the results."""
    merged: dict = {}
    for tasks, args in groups:
        lm = MaskscaleLM(loaded=loaded, **args)
        print(f"[harness] {', '.join(tasks)} with {describe(loaded, lm.args)}", file=sys.stderr)
        res = evaluate(lm, tasks, manager, **kw)
        if res is None:  # not rank 0 of a data-parallel run: rank 0 holds the results
            continue
        guided = label_guided(res) if lm.text.guided else []
        for key, value in res.items():
            if isinstance(value, dict) and key != "config":
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
        merged.setdefault("maskscale", {"groups": []})["groups"].append(
            {"tasks": tasks, "model_args": dataclasses.asdict(lm.args), "cfg_metrics": guided}
        )
    if merged:
        merged["maskscale"].update(model_info(loaded))
    return merged


def label_guided(results: dict) -> list[str]:
    """Rename the perplexity-type metrics of guided results to ``cfg_<metric>`` (in place), in
    ``results``, ``groups`` and ``higher_is_better``; the renamed ``task/metric`` names."""
    renamed = []
    for section in ("results", "groups", "higher_is_better"):
        for task, metrics in (results.get(section) or {}).items():
            new = {}
            for key, value in metrics.items():
                metric, comma, filt = key.partition(",")
                base = metric.removesuffix("_stderr")
                if base in PERPLEXITIES:
                    new["cfg_" + metric + comma + filt] = value
                    if section == "results" and metric == base:
                        renamed.append(f"{task}/{metric}")
                else:
                    new[key] = value
            results[section][task] = new
    return renamed


def describe(loaded, args: ModelArgs) -> str:
    if loaded.family == "arm":
        return "exact ARM likelihood"
    text = "chain rule" if args.estimator == "chain_rule" else f"MC ELBO n={args.mc_samples}"
    return text + (f", CFG w={args.cfg:g}" if args.cfg else "")


def model_info(loaded) -> dict:
    return {
        "run": loaded.name,
        "family": loaded.family,
        "export_dir": str(loaded.export_dir),
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "step": loaded.step,
        "tokens": loaded.info.get("tokens"),
        "tokenizer_sha256": loaded.tokenizer_sha256,
    }


# ----------------------------------------------------------------------------- outputs


def results_name(tasks: list[str]) -> str:
    """harness-<tasks>.json, the task list shortened (with a hash) if it is long."""
    import hashlib

    joined = "+".join(tasks)
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", joined)
    if len(safe) > 80:
        safe = safe[:60] + "-" + hashlib.sha1(joined.encode()).hexdigest()[:10]
    return f"harness-{safe}.json"


def flat_metrics(results: dict, prefix: str = "eval/harness") -> dict[str, float]:
    """{"eval/harness/<task>/<metric>": value} for every finite number in results["results"]."""
    out = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(value):
                out[f"{prefix}/{task}/{name}"] = float(value)
    return {re.sub(r"[^\w\-./ ]", "_", k): v for k, v in out.items()}
