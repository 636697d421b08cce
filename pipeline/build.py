"""``maskscale corpus build``: raw dumps -> deduplicated, temporally split, packed Arrow shards.

The build is a chain of datatrove executors, one per stage, each with its own folder
``OUTPUT/.work/<stage>-<key>``. The key fingerprints the stage's own settings *and* the keys
of the stages it reads, so:

- rerunning the same command after a kill skips every completed task (datatrove's completion
  markers) and redoes only the unfinished ones, whose outputs are overwritten whole;
- changing a setting gives the affected stage and everything downstream a new folder, so a
  stale stage is never reused (datatrove alone would skip it even with new parameters);
- identical inputs and settings produce identical bytes (no timestamps, no unordered sets);
- keys include a fingerprint of the code each stage runs and the versions of the libraries
  that shape its bytes (:mod:`pipeline.codekey`), so a fix (or a local patch) to packing reruns
  packing and what follows it, and an upgrade never reuses stages written by older code.

Publishing is the exception to "skip what is complete": OUTPUT holds one build at a time, so
when the published manifest's ``build_key`` is not this build's, the publish stage is redone
(config A, then B, then A again leaves A published, not B). ``clean_work`` then optionally
removes the work files the published corpus no longer needs.

Local runs stages one after the other in this process; Ray runs them the same way on a Ray
cluster; Slurm submits them as a chain of dependent array jobs and returns at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from tqdm import tqdm

from pipeline import codekey
from pipeline.config import CorpusConfig
from pipeline.configlib import ConfigError, fingerprint, to_dict
from pipeline.dedup import plan_dedup
from pipeline.filters import (
    WORKER_MODULES,
    QualityFilters,
    filter_settings,
    resolve_language_model,
)
from pipeline.inputs import PLAN_CACHE
from pipeline.manifest import HashShards, PublishCorpus
from pipeline.packing import PackTails, TokenizePack
from pipeline.readers import RawDumpReader, discover_inputs, load_date_map, plan_tasks
from pipeline.shards import file_sha256
from pipeline.steps import IntermediateWriter, TokenizerInstall, TokenizerTrainer
from pipeline.temporal import TemporalSplitter, UndatedGuard, check_undated
from pipeline.workdir import clean_work, redo_stale_publish

# stages a build may leave out (dedup off); executor.slurm.stages may still name them
OPTIONAL_STAGES = ("exact-signatures", "exact-find", "minhash-signatures", "minhash-buckets",
                   "minhash-cluster")  # fmt: skip


@dataclass
class Stage:
    """One datatrove executor run: a pipeline over ``tasks`` tasks in ``folder``."""

    name: str
    folder: str
    pipeline: list
    tasks: int
    workers: int
    key: str = ""
    after: Callable[[], None] | None = None
    """Run in this process once the stage has finished (local and Ray executors)."""
    memory: Callable[[], tuple[float, str]] | None = None
    """Slurm: (GB its task needs, what that was derived from), asked at submit time; raises the
    ``mem_per_cpu_gb`` default (an ``executor.slurm.stages`` entry that sets it wins)."""

    @property
    def logging_dir(self) -> str:
        return os.path.join(self.folder, "logs")

    def data(self, sub: str = "data") -> str:
        return os.path.join(self.folder, sub)


def stage_versions(stage: str) -> dict[str, str]:
    """Package versions and code fingerprint that enter ``stage``'s key (see codekey)."""
    return codekey.stage_versions(stage)


class _Planner:
    """Builds the chain of stages; each stage's key extends the key of what it reads."""

    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.work = os.path.join(os.path.abspath(cfg.output), ".work")
        self.stages: list[Stage] = []

    def add(self, name: str, parent_key: str, settings, tasks: int, make_pipeline) -> Stage:
        key = fingerprint({"parent": parent_key, "settings": settings, "stage": name,
                           "versions": stage_versions(name)})  # fmt: skip
        folder = os.path.join(self.work, f"{len(self.stages):02d}-{name}-{key}")
        stage = Stage(name, folder, [], tasks, min(self.cfg.executor.workers, tasks), key)
        stage.pipeline = make_pipeline(stage)
        self.stages.append(stage)
        return stage


def _writer(folder: str, filename: str = "${rank}.jsonl.zst") -> IntermediateWriter:
    return IntermediateWriter(folder, filename)


def plan_stages(cfg: CorpusConfig) -> list[Stage]:
    """The ordered stages of a build (nothing runs here)."""
    # first: a missing language model is a config error before anything is listed or written
    filters, filtering = _quality_filters(cfg)
    # never the build's own output (its .work/ holds JSONL) even when an input folder holds it
    files = discover_inputs(cfg.input, exclude=cfg.output)
    # url, size and mtime/etag: an input rewritten in place invalidates every stage built from it
    inputs_fp = fingerprint([(f.url, f.size, f.version) for f in files])
    # the partition depends on the inputs and records.task_bytes only (never on the executor)
    work = plan_tasks(files, cfg.records.task_bytes,
                      cache=os.path.join(os.path.abspath(cfg.output), ".work", PLAN_CACHE))  # fmt: skip
    tasks = len(work)
    p = _Planner(cfg)
    rc = cfg.records
    read_settings = {
        # strict only decides whether a bad record stops the build: a build it lets finish
        # wrote exactly what a lenient one writes, so it stays out of the key
        "records": {k: v for k, v in to_dict(rc).items() if k != "strict"},
        "source": cfg.default_source,
        "exclude": sorted(cfg.exclude_sources),
        "date_map": file_sha256(cfg.date_map) if cfg.date_map else None,
    }
    date_map = load_date_map(cfg.date_map)
    # quality filters change the stream every reading stage sees: their settings (and the
    # language model's sha256) join the read key
    if filters is not None:
        read_settings["filters"] = filtering

    def reader(record_to: Stage | None = None) -> RawDumpReader:
        """The raw reader, inline in every stage that reads documents. Only the split stage
        (``record_to``) writes rejects and damaged-file records; its stats are the manifest's."""
        rejects, corrupt = (record_to.data("rejects"), record_to.data("corrupt")) if record_to \
            else (None, None)  # fmt: skip
        return RawDumpReader(work, rejects, corrupt_folder=corrupt,
                             default_source=cfg.default_source,
                             exclude_sources=cfg.exclude_sources, max_chars=rc.max_chars,
                             too_long=rc.too_long, strict=rc.strict, date_map=date_map,
                             min_date=rc.min_date, max_date=rc.max_date,
                             filters=filters)  # fmt: skip

    # no ingest copy: the reader is deterministic, so every stage that runs it sees the same
    # stream (the dedup filters address documents by their index in it)
    read_key = fingerprint({"inputs": inputs_fp, "read": read_settings,
                            "versions": stage_versions("read")})  # fmt: skip
    dedup_filters, dedup_key = plan_dedup(p, reader, read_key, tasks)
    sc = cfg.split
    split_settings = {**to_dict(sc), "source_dates": cfg.source_dates}
    decon = _decontaminator(cfg)
    if decon is not None:  # only then: a build without it keeps its keys
        split_settings["decontaminate"] = decon.key
    split = p.add("split", dedup_key, split_settings, tasks, lambda s: [
        reader(record_to=s), *dedup_filters(),
        TemporalSplitter(sc.cutoff, sc.validation_fraction, sc.seed, sc.holdout_ranges,
                         cfg.source_dates, sc.undated, decontaminate=decon),
        _writer(s.data(), "${split}/${rank}.jsonl.zst"),
    ])  # fmt: skip
    split.after = lambda: _report_undated(cfg, split)
    # the documents before the cutoff (train + validation) do not depend on the validation
    # fraction, so neither does the BPE trained on a sample of them; the split's code does
    pre_cutoff = {"parent": dedup_key, "cutoff": sc.cutoff, "undated": sc.undated,
                  "source_dates": cfg.source_dates, "code": stage_versions("split")}  # fmt: skip
    if decon is not None:  # decontamination removes train documents the BPE samples from
        pre_cutoff["decontaminate"] = decon.key
    pre_cutoff_key = fingerprint(pre_cutoff)
    tok_stage = _plan_tokenizer(p, cfg, split, pre_cutoff_key, tasks)
    pc = cfg.pack
    tok_path = tok_stage.data("tokenizer.json")
    pack = p.add("pack", f"{split.key}+{tok_stage.key}", to_dict(pc), tasks, lambda s: [
        TokenizePack(split.data(), s.data(), tok_path, cfg.tokenizer.eos_token, pc.seq_len,
                     pc.rows_per_shard, pc.batch_docs, tails_folder=s.data("tails")),
    ])  # fmt: skip
    _plan_publish(p, pack, tok_path, tasks)
    _check_stage_resources(cfg, p.stages)
    return p.stages


def _decontaminator(cfg: CorpusConfig):
    """The tasks of ``decontaminate:`` as n-gram hashes, or None when it lists none."""
    from pipeline.ngrams import TaskLoadError, TaskNgrams, load_tasks

    dc = cfg.decontaminate
    if not dc.tasks:
        return None
    try:
        decon = TaskNgrams(load_tasks(dc.tasks, dc.include_path), dc.ngram)
    except TaskLoadError as e:
        raise ConfigError(f"decontaminate.tasks: {e}") from None
    # the split stage runs pipeline.ngrams only when decontaminating: its code enters the key
    decon.key["code"] = codekey.module_hash("pipeline.ngrams")
    return decon


def _quality_filters(cfg: CorpusConfig) -> tuple[QualityFilters | None, dict | None]:
    """(the enabled quality filters, their stage-key settings), or (None, None) when all are
    off. Removed documents are labelled by the split their date puts them in."""
    if not cfg.filters.enabled():
        return None, None
    sc = cfg.split
    period = TemporalSplitter(sc.cutoff, sc.validation_fraction, sc.seed, sc.holdout_ranges,
                              cfg.source_dates, sc.undated)  # fmt: skip
    model = resolve_language_model(cfg.filters.language.model) \
        if cfg.filters.language.enabled else None  # fmt: skip
    return QualityFilters(cfg.filters, model, period), filter_settings(cfg.filters, model)


def _plan_publish(p: _Planner, pack: Stage, tok_path: str, tasks: int) -> None:
    cfg, pc = p.cfg, p.cfg.pack
    tails = p.add("pack-tails", pack.key, {}, 1, lambda s: [
        PackTails(pack.data("tails"), s.data(), tasks, tok_path, cfg.tokenizer.eos_token,
                  pc.seq_len, pc.rows_per_shard),
    ])  # fmt: skip
    shard_dirs = [pack.data(), tails.data()]
    # tasks in the key: datatrove's per-rank completions only hold for one task count
    hashes = p.add("hash", tails.key, {"tasks": tasks}, tasks, lambda s: [
        HashShards(shard_dirs),
    ])  # fmt: skip
    stage_dirs = {st.name: st.folder for st in p.stages}
    # neither executor settings nor records.strict change what is published (see plan_stages)
    publish_settings = {k: v for k, v in to_dict(cfg).items() if k != "executor"}
    publish_settings["records"] = {k: v for k, v in publish_settings["records"].items()
                                   if k != "strict"}  # fmt: skip
    code = codekey.code_record(["read", *stage_dirs, "publish"])
    p.add("publish", hashes.key, publish_settings, 1, lambda s: [
        PublishCorpus(cfg.output, stage_dirs, shard_dirs, tails.data(), tok_path, to_dict(cfg),
                      build_key=s.key, versions=codekey.all_versions(), code=code),
    ])  # fmt: skip


def _report_undated(cfg: CorpusConfig, split: Stage) -> None:
    """After the split: stop (split.undated=error) or warn (train) about undated documents."""
    warning = check_undated(split.logging_dir, cfg.split.cutoff, cfg.source_dates,
                            cfg.split.undated)  # fmt: skip
    if warning:
        print(f"maskscale: {warning}", flush=True)


def _check_stage_resources(cfg: CorpusConfig, stages: list[Stage]) -> None:
    names = [s.name for s in stages]
    unknown = sorted(set(cfg.executor.slurm.stages) - set(names) - set(OPTIONAL_STAGES))
    if unknown:
        valid = ", ".join(dict.fromkeys(names + list(OPTIONAL_STAGES)))
        raise ConfigError(f"executor.slurm.stages: unknown stage(s) {', '.join(unknown)}; "
                          f"stages are: {valid}")  # fmt: skip


def _plan_tokenizer(p: _Planner, cfg: CorpusConfig, split: Stage, pre_cutoff_key: str,
                    tasks: int) -> Stage:  # fmt: skip
    tc, sc = cfg.tokenizer, cfg.split

    def guard() -> UndatedGuard:  # on Slurm the undated check runs here (see temporal.py)
        return UndatedGuard(split.folder, sc.cutoff, cfg.source_dates, sc.undated)

    if tc.path:
        src = Path(tc.path)
        if src.is_dir():
            raise ConfigError(
                f"tokenizer.path {src} is a directory; pass the tokenizer.json file inside it"
            )
        if not src.is_file():
            raise ConfigError(f"tokenizer.path {src} does not exist")
        settings = {"sha256": file_sha256(src), "eos": tc.eos_token}
        return p.add("tokenizer", pre_cutoff_key, settings, 1, lambda s: [
            guard(), TokenizerInstall(str(src.resolve()), s.data("tokenizer.json"), tc.eos_token),
        ])  # fmt: skip
    settings = {"vocab": tc.vocab_size, "eos": tc.eos_token, "sample_chars": tc.train_sample_chars,
                "sample_seed": tc.sample_seed}  # fmt: skip
    return p.add("tokenizer", pre_cutoff_key, settings, 1, lambda s: [
        guard(),
        TokenizerTrainer(split.folder, tasks, s.data("tokenizer.json"), tc.vocab_size,
                         tc.eos_token, tc.train_sample_chars, tc.sample_seed),
    ])  # fmt: skip


class _QuietLocalExecutor(LocalPipelineExecutor):
    """Local executor whose tasks log to their files only (warnings go to the console)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        # datatrove only uses local_rank to decide console verbosity (!= 0: errors only). Its
        # steps' own tqdm bars would tear through our per-stage bars, so they go to /dev/null;
        # everything is still in the task's log file and exceptions still propagate.
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)


def _completed(stage: Stage) -> int:
    done_dir = os.path.join(stage.logging_dir, "completions")
    return len(os.listdir(done_dir)) if os.path.isdir(done_dir) else 0


def _watch(stage: Stage, bar: tqdm, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        bar.n = _completed(stage)
        bar.refresh()


def preload_workers(extra: tuple[str, ...] = ()) -> None:
    """Start the local executor's forkserver with the pipeline modules already imported.

    datatrove starts a fresh worker pool for every stage; each worker, forked from the
    forkserver, imported datatrove, pyarrow, tokenizers and ours again while unpickling its
    steps: ~0.4 CPU s per worker per stage, more than many small stages' work. Children of a
    forkserver that preloaded them start in milliseconds. The forkserver is a new interpreter
    that ignores this process's ``sys.path`` (which a script may have extended), so it is
    started here with that path as PYTHONPATH: it preloads the very files this process uses.
    No effect when the forkserver already runs. ``extra``: more modules to preload (the quality
    filters' NLTK, whose import costs more than a small task's filtering).
    """
    import multiprocess
    from multiprocess import forkserver

    multiprocess.get_context("forkserver").set_forkserver_preload(
        ["__main__", "pipeline.build", *extra]
    )
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def run_local(stages: list[Stage], progress: bool = True, preload: tuple[str, ...] = ()) -> None:
    preload_workers(preload)
    for i, stage in enumerate(stages, start=1):
        executor = _QuietLocalExecutor(
            stage.pipeline, tasks=stage.tasks, workers=stage.workers,
            logging_dir=stage.logging_dir, start_method="forkserver",
        )  # fmt: skip
        desc = f"[{i}/{len(stages)}] {stage.name}"
        bar = tqdm(total=stage.tasks, desc=desc, unit="task", disable=not progress, leave=True)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(stage, bar, stop), daemon=True)
        watcher.start()
        try:
            executor.run()
        finally:
            stop.set()
            watcher.join()
            bar.n = _completed(stage)
            bar.close()
        if stage.after is not None:
            stage.after()


def run_ray(stages: list[Stage]) -> None:
    from datatrove.executor import RayPipelineExecutor

    for stage in stages:
        RayPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, workers=stage.workers,
            logging_dir=stage.logging_dir,
        ).run()  # fmt: skip
        if stage.after is not None:
            stage.after()


def stage_resources(sc, name: str, need_gb: float | None = None) -> dict:
    """Slurm resources of stage ``name``: its ``executor.slurm.stages`` entry over defaults;
    ``need_gb`` (what its task needs) raises the default memory, never an explicit entry."""
    res = sc.stages.get(name)
    out = {}
    for key in ("time", "partition", "cpus_per_task", "mem_per_cpu_gb"):
        override = getattr(res, key) if res is not None else None
        out[key] = getattr(sc, key) if override is None else override
    if need_gb is not None and (res is None or res.mem_per_cpu_gb is None):
        per_cpu = math.ceil(need_gb / out["cpus_per_task"])
        out["mem_per_cpu_gb"] = max(out["mem_per_cpu_gb"], per_cpu)
    return out


def submit_slurm(cfg: CorpusConfig, stages: list[Stage]) -> None:
    from datatrove.executor import SlurmPipelineExecutor

    sc = cfg.executor.slurm
    previous = None
    for stage in stages:
        need_gb, basis = stage.memory() if stage.memory else (None, "")
        resources = stage_resources(sc, stage.name, need_gb)
        if stage.memory:
            print(f"maskscale: {stage.name}: {resources['mem_per_cpu_gb']} GB per CPU "
                  f"(needs ~{need_gb:.1f} GB for {basis})", flush=True)  # fmt: skip
        previous = SlurmPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, workers=cfg.executor.workers,
            sbatch_args=dict(sc.sbatch_args), job_name=f"maskscale-{stage.name}",
            logging_dir=stage.logging_dir, depends=previous, **resources,
        )  # fmt: skip
    previous.run()  # launches the whole dependency chain


def build_corpus(cfg: CorpusConfig, progress: bool = True, clean: bool = False) -> dict | None:
    """Run (or, on Slurm, submit) every stage; returns the manifest when finished here.

    ``clean`` (``--clean-work``): after a successful publish, remove the work files the
    published corpus no longer needs (see :func:`pipeline.workdir.clean_work`); ignored when
    the build is only submitted (Slurm): rerun the command with it once the jobs are done.
    """
    from pipeline.shards import read_manifest

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stages = plan_stages(cfg)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    redo_stale_publish(cfg.output, stages[-1])
    start = time.time()
    if cfg.executor.kind == "local":
        run_local(stages, progress, preload=WORKER_MODULES if cfg.filters.enabled() else ())
    elif cfg.executor.kind == "ray":
        run_ray(stages)
    else:
        submit_slurm(cfg, stages)
        return None
    manifest = read_manifest(cfg.output)
    if clean:
        manifest["cleaned"] = clean_work(cfg.output, stages)
    manifest["elapsed_s"] = round(time.time() - start, 2)
    return manifest
