"""Corpus build at scale: per-stage rates, a SlimPajama-627B projection, and a datatrove reference.

    python benchmarks/pipeline_scale.py --size-mb 50 --files 40 --workers 2 --nodes 64 --cores 64

1. Generates (once, cached) a synthetic SlimPajama-format dump of ``--size-mb`` uncompressed
   JSONL with planted exact and near duplicates (benchmarks/synth_dump.py).
2. Builds it with maskscale into a fresh output folder, running whatever stages
   ``pipeline.build.plan_stages`` returns one at a time through ``run_local`` and timing each;
   prints per-stage wall time, MB/s and docs/s (of the raw input), CPU time, the largest single
   task and peak memory of the process tree. Tasks follow from ``records.task_bytes``; its
   default (512 MiB) would make a small dump a single task, so the build gets about stored
   bytes / (2 x workers), rounded up to whole files (about 2 x workers tasks, every worker
   busy), unless ``--set records.task_bytes=...`` says otherwise.
3. Projects core-, wall- and node-hours for SlimPajama-627B on ``--nodes`` x ``--cores`` from the
   measured CPU time per stage and each stage's parallelism at full scale, which follows from
   the stage's role (``STAGE_ROLES``), never from the task count measured here: data-parallel
   stages run one task per ``--task-bytes`` of stored input, MinHash buckets num_buckets x
   workers_per_bucket, exact-find ``dedup.exact_finder_workers``, the rest one task.
4. Runs a datatrove-only reference of the same stages on the same dump with the same tasks and
   workers: JsonlReader (zstd, SlimPajama adapter) -> exact dedup (signature, find, filter) ->
   MinHash (signature, buckets, cluster, filter; whitespace words) -> DocumentTokenizer +
   DocumentTokenizerMerger with the tokenizer.json maskscale trained. The reference chains its
   filters inline (the lean datatrove idiom: no intermediate copies) and shuffles nothing.
   Prints the end-to-end ratio maskscale / datatrove in docs/s (goal >= 1.2) with BPE training
   excluded from maskscale (the reference is handed the trained tokenizer), and per-stage ratios
   where stages correspond.

Both pipelines run their pooled stages from one forkserver that preloaded maskscale's pipeline
modules (``pipeline.build.preload_workers``, what ``maskscale corpus build`` does locally), so
a worker pool starts without re-importing datatrove in every worker of every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("LOGURU_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scale_measure import (  # noqa: E402
    StageResult,
    best_of,
    executor_overhead,
    measure,
    run_pipeline,
    stage_stats,
)
from synth_dump import DumpParams, ensure_dump  # noqa: E402

# SlimPajama-627B (train split), from its dataset card and the SlimPajama-6B card (a 1% sample
# of train: chunk1 of 10 chunks, then 10% of it = 5,489,000 docs, 23.92 GB of text).
# SlimPajama's zstd chunks are ~15 MB each and read whole (one work unit per file).
FULL_FILES = 59_166
FULL_COMPRESSED = 895e9
FULL_DOCS = 5_489_000 * 100
FULL_BYTES = 23.918e9 * 100
FULL_TOKENS = 627e9

# What each maskscale stage is: (parallelism at scale, what its work grows with).
#   data: one task per records.task_bytes of stored input; finder: dedup.exact_finder_workers
#   tasks; buckets: num_buckets x workers_per_bucket; serial: one task.
#   bytes: the text read; docs: signatures only; tasks: one partial row per (task, split,
#   source) stream (pack-tails); bpe: the tokenizer's training sample.
STAGE_ROLES = {
    "exact-signatures": ("data", "bytes"),  # every data stage reads the raw dump itself
    "exact-find": ("finder", "docs"),
    "minhash-signatures": ("data", "bytes"),  # the exact-dedup filter runs inline here
    "minhash-buckets": ("buckets", "docs"),
    "minhash-cluster": ("serial", "docs"),
    "split": ("data", "bytes"),  # the MinHash filter runs inline here
    "tokenizer": ("serial", "bpe"),
    "pack": ("data", "bytes"),
    "pack-tails": ("serial", "tasks"),
    "hash": ("data", "bytes"),
    "publish": ("serial", "bytes"),  # hard-links shards and reads their hashes: per shard
}

# Stage correspondence maskscale -> reference, by exact name; BPE training is excluded from the
# ratio. Both sides run their dedup filters inline in the next stage that reads the documents.
GROUPS = [
    ("read + exact signatures", ("exact-signatures",), ("exact-signatures",)),
    ("exact find", ("exact-find",), ("exact-find",)),
    ("exact filter + minhash signatures", ("minhash-signatures",), ("minhash-signatures",)),
    ("minhash buckets", ("minhash-buckets",), ("minhash-buckets",)),
    ("minhash cluster", ("minhash-cluster",), ("minhash-cluster",)),
    ("filter + split + tokenize + write", ("split", "pack", "pack-tails", "hash", "publish"),
     ("tokenize", "merge")),
]  # fmt: skip
EXCLUDED = ("tokenizer",)  # BPE training: the reference gets maskscale's trained tokenizer


def group_of(name: str, ref: bool = False) -> str | None:
    if not ref and name in EXCLUDED:
        return None
    for group, ms_names, ref_names in GROUPS:
        if name in (ref_names if ref else ms_names):
            return group
    return None


def check_known(names: list[str]) -> None:
    """Fail before building when the pipeline has stages this benchmark does not know."""
    unknown = [n for n in names if n not in STAGE_ROLES]
    grouped = {n for _, ms_names, _ in GROUPS for n in ms_names} | set(EXCLUDED)
    ungrouped = [n for n in names if n in STAGE_ROLES and n not in grouped]
    if unknown or ungrouped:
        raise SystemExit(
            f"pipeline_scale.py: stage(s) {', '.join(unknown + ungrouped)} have no role in "
            "STAGE_ROLES or no group in GROUPS; add them there so the projection and the "
            "comparison stay right"
        )


def full_data_tasks(task_bytes: int, stored: float, files: int) -> int:
    """Tasks of a data-parallel stage at full scale: ``plan_tasks`` packs whole .zst files,
    in order, into tasks of at most ``task_bytes`` (a bigger file is a task of its own)."""
    per_task = max(1, math.floor(task_bytes / (stored / files)))
    return math.ceil(files / per_task)


def build_task_bytes(dump: Path, workers: int) -> int:
    """records.task_bytes for the measured build: about 2 x workers tasks, so every worker stays
    busy. .zst files are read whole, so a task is ceil(files / (2 x workers)) of the largest."""
    sizes = [p.stat().st_size for p in dump.rglob("*.jsonl.zst")]
    return math.ceil(len(sizes) / (2 * workers)) * max(sizes)


# -- maskscale -----------------------------------------------------------------------------------
def run_maskscale(dump: Path, out: Path, workers: int, overrides: list[str], verbose: bool):
    from pipeline.build import plan_stages, run_local
    from pipeline.config import CorpusConfig
    from pipeline.configlib import load_config

    cfg = load_config(CorpusConfig, None, [f'input=["{dump}"]', f"output={out}",
                                           f"executor.workers={workers}", *overrides])  # fmt: skip
    stages = plan_stages(cfg)
    check_known([s.name for s in stages])
    if verbose:
        print(f"  maskscale build: records.task_bytes={cfg.records.task_bytes:,} -> "
              f"{stages[0].tasks} tasks per data-parallel stage, {workers} workers")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        name, folder = getattr(stage, "name", "?"), getattr(stage, "folder", "")
        logdir = getattr(stage, "logging_dir", os.path.join(folder, "logs"))
        tasks = getattr(stage, "tasks", 1)
        workers_ = getattr(stage, "workers", min(workers, tasks))
        print(f"  maskscale {name:<22} {tasks:>4} tasks ...", end="", flush=True)
        res = measure(name, folder, logdir, tasks, workers_,
                      lambda st=stage: run_local([st], progress=False))  # fmt: skip
        print(f" {res.wall_s:7.1f} s")
        results.append(res)
    return cfg, results


def find_tokenizer(out: Path, results: list[StageResult]) -> Path:
    """The tokenizer.json maskscale published (or, failing that, the one its stage wrote)."""
    candidates = [out / "tokenizer.json"]
    candidates += [p for r in results for p in sorted(Path(r.folder).rglob("tokenizer.json"))]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no tokenizer.json under {out}: did the maskscale build finish?")


# -- datatrove reference ---------------------------------------------------------------------------
def slimpajama_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """SlimPajama record -> Document dict (the default adapter nests ``meta`` one level deep)."""
    meta = data.get("meta") or {}
    return {"text": data["text"], "id": f"{path}/{id_in_file}",
            "metadata": {"source": meta.get("redpajama_set_name")}}  # fmt: skip


def doc_text(doc) -> str:
    return doc.text


def reference_stages(cfg, dump: Path, work: Path, tok_path: Path, tasks: int) -> list[tuple]:
    """(name, pipeline, tasks) of the datatrove-only reference, in order."""
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer, DocumentTokenizerMerger

    from pipeline.steps import SpaceWordTokenizer

    d = cfg.dedup
    mcfg = MinhashConfig(n_grams=getattr(d, "n_grams", 5), num_buckets=getattr(d, "num_buckets", 14),
                         hashes_per_bucket=getattr(d, "hashes_per_bucket", 8),
                         seed=getattr(d, "seed", 1))  # fmt: skip
    xcfg = ExactDedupConfig(content_getter=doc_text)
    w = {k: str(work / k) for k in ("xsig", "xdup", "msig", "mbuck", "mclus", "tok", "merged")}

    def reader():
        return JsonlReader(str(dump), compression="zstd", adapter=slimpajama_adapter)

    tokenizer = DocumentTokenizer(w["tok"], tokenizer_name_or_path=str(tok_path),
                                  eos_token=cfg.tokenizer.eos_token, shuffle_documents=False)  # fmt: skip
    return [
        ("exact-signatures", [reader(), ExactDedupSignature(w["xsig"], xcfg)], tasks),
        ("exact-find", [ExactFindDedups(w["xsig"], w["xdup"], xcfg)], 1),
        ("minhash-signatures", [reader(), ExactDedupFilter(w["xdup"], xcfg),
                                MinhashDedupSignature(w["msig"], mcfg,
                                                      language=SpaceWordTokenizer())], tasks),
        ("minhash-buckets", [MinhashDedupBuckets(w["msig"], w["mbuck"], config=mcfg)],
         mcfg.num_buckets),
        ("minhash-cluster", [MinhashDedupCluster(w["mbuck"], w["mclus"], config=mcfg)], 1),
        ("tokenize", [reader(), ExactDedupFilter(w["xdup"], xcfg), MinhashDedupFilter(w["mclus"]),
                      tokenizer], tasks),
        ("merge", [DocumentTokenizerMerger(w["tok"], w["merged"], "train", shuffle=False,
                                           progress=False)], 1),
    ]  # fmt: skip


def run_reference(cfg, dump: Path, work: Path, tok_path: Path, tasks: int, workers: int):
    results = []
    for name, pipeline, n in reference_stages(cfg, dump, work, tok_path, tasks):
        logdir = str(work / "logs" / name)
        print(f"  datatrove {name:<22} {n:>4} tasks ...", end="", flush=True)
        res = measure(name, str(work), logdir, n, min(workers, n),
                      lambda p=pipeline, n=n, ld=logdir: run_pipeline(p, n, workers, ld))  # fmt: skip
        print(f" {res.wall_s:7.1f} s")
        results.append(res)
    return results


# -- reports -------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def print_stage_table(title: str, results: list[StageResult], mb: float, docs: int) -> None:
    print(f"\n{title}  (MB/s and docs/s of the raw input: {mb:.1f} MB, {docs:,} docs)")
    print(f"{'stage':<22}{'tasks':>6}{'wall s':>9}{'cpu s':>9}{'MB/s':>8}{'docs/s':>9}"
          f"{'max task s':>11}{'peak RSS MiB':>13}{'max proc MiB':>13}")  # fmt: skip
    for r in results:
        print(f"{r.name:<22}{r.tasks:>6}{r.wall_s:>9.1f}{r.cpu_s:>9.1f}{mb / r.wall_s:>8.2f}"
              f"{docs / r.wall_s:>9,.0f}{r.max_task_s:>11.1f}{_mb(r.peak_rss):>13}"
              f"{_mb(r.peak_proc_rss):>13}")  # fmt: skip
    wall = sum(r.wall_s for r in results)
    print(f"{'total':<22}{'':>6}{wall:>9.1f}{sum(r.cpu_s for r in results):>9.1f}"
          f"{mb / wall:>8.2f}{docs / wall:>9,.0f}{'':>11}"
          f"{_mb(max(r.peak_rss for r in results)):>13}"
          f"{_mb(max(r.peak_proc_rss for r in results)):>13}")  # fmt: skip


def _bpe_cap(cfg) -> int | None:
    """The tokenizer config's character budget for BPE training, whatever it is called."""
    tc = getattr(cfg, "tokenizer", None)
    items = vars(tc).items() if tc is not None else ()
    return next((v for k, v in items if "chars" in k and isinstance(v, int) and v > 0), None)


def _full_scale(r: StageResult, tasks: tuple[int, int], args, cfg, meta) -> tuple:
    """(kind, parallel tasks at full scale, what the work grows with, scale factor) of a stage,
    from its role (``STAGE_ROLES``), never from the task count measured here. ``tasks``: data
    tasks (measured build, full scale)."""
    role, basis = STAGE_ROLES[r.name]
    d = cfg.dedup
    finder = d.exact_finder_workers
    kind, par = {
        "data": ("data", tasks[1]),
        "finder": ("serial", 1) if finder == 1 else ("fixed", finder),
        "buckets": ("fixed", d.num_buckets * d.workers_per_bucket),
        "serial": ("serial", 1),
    }[role]
    if basis == "bpe":
        cap = _bpe_cap(cfg)
        if cap:
            x = min(args.full_bytes, cap) / min(meta["bytes_uncompressed"], cap)
            return "capped", 1, "cap", x
        basis = "bytes"
    x = {
        "bytes": args.full_bytes / meta["bytes_uncompressed"],
        "docs": args.full_docs / meta["docs"],
        "tasks": tasks[1] / tasks[0],
    }[basis]
    return kind, par, basis, x


CLUSTER_RESULTS = Path(__file__).with_name("cluster_scale.md")
"""benchmarks/cluster_scale.py's measurements (the JSON block of its report)."""


def cluster_at_scale(args, cfg) -> dict | None:
    """The MinHash cluster step at full scale from ``cluster_scale.md``'s measured growth
    (seconds and peak memory against duplicate pairs, log-log fit as there), at the pair
    count the Slurm default assumes (documents x num_buckets x 0.5 pairs per document and
    bucket, ``pipeline/cluster.py``); None when no measurement is recorded. The cluster step
    grows with pairs, not documents, and a tiny build measures mostly its fixed costs."""
    from cluster_scale import fit

    from pipeline.cluster import ASSUMED_PAIRS_PER_DOC_PER_BUCKET, memory_gb

    if not CLUSTER_RESULTS.is_file():
        return None
    text = CLUSTER_RESULTS.read_text()
    block = text.split("```json", 1)[-1].split("```", 1)[0]
    try:
        rows = [r for r in json.loads(block) if "base_rss" in r.get("ours", {})]  # measured
    except ValueError:
        return None
    if not rows:
        return None
    pairs = args.full_docs * cfg.dedup.num_buckets * ASSUMED_PAIRS_PER_DOC_PER_BUCKET
    xs = [r["pairs"] for r in rows]
    seconds = fit(xs, [r["ours"]["seconds"] for r in rows], pairs)
    net = fit(xs, [r["ours"]["peak_rss"] - r["ours"]["base_rss"] for r in rows], pairs)
    return {"pairs": pairs, "core_h": seconds / 3600, "measured_gib": net / 2**30,
            "slurm_gb": memory_gb(int(pairs), int(args.full_docs))}  # fmt: skip


def print_projection(results: list[StageResult], overhead: StageResult, args, cfg, meta) -> None:
    cores_total = args.nodes * args.cores
    file_mb = args.full_stored / args.full_files / 1e6
    full_tasks = full_data_tasks(args.task_bytes, args.full_stored, args.full_files)
    build_tasks = next(r.tasks for r in results if STAGE_ROLES[r.name][0] == "data")
    d = cfg.dedup
    print(f"\nProjection: SlimPajama-627B on {args.nodes} nodes x {args.cores} cores. Assumptions:")
    cap = _bpe_cap(cfg)
    for line in (
        f"corpus: {args.full_docs / 1e6:,.0f}M docs, {args.full_bytes / 1e12:.2f} TB uncompressed "
        f"text, {args.full_stored / 1e9:.0f} GB zstd in {args.full_files:,} files of "
        f"~{file_mb:.1f} MB, {FULL_TOKENS / 1e9:.0f}B Llama tokens (SlimPajama-627B card; docs "
        "and bytes = 100 x the 1% sample SlimPajama-6B)",
        f"work = CPU s measured here, net of executor start-up ({overhead.cpu_s:.1f} CPU s per "
        "pooled stage, from an empty stage), x full/synthetic: bytes for stages that read text, "
        "docs for exact-find and MinHash buckets/cluster (signatures only), data tasks for "
        "pack-tails (one partial row per task, split and source); publish's fixed cost is scaled "
        "with bytes too (an upper bound)",
        f"BPE training reads at most {cap or 'all'} chars (tokenizer cap); the synthetic text's "
        f"{meta['bytes_uncompressed'] / meta['docs']:,.0f} B/doc stands in for SlimPajama's "
        f"{args.full_bytes / args.full_docs:,.0f}",
        f"kind by stage role, not by the tasks measured here (the build ran {build_tasks} data "
        f"tasks): 'data' stages (signatures, split, pack, hash) run one task per "
        f"records.task_bytes = {args.task_bytes / 2**20:,.0f} MiB (--task-bytes) of zstd; .zst "
        f"files are read whole, so {full_tasks:,} tasks (ceil({args.full_files:,} files / "
        f"floor(task_bytes / file size)); ceil(stored / task_bytes) = "
        f"{math.ceil(args.full_stored / args.task_bytes):,}; one per file below ~{file_mb:.0f} MB)",
        f"'fixed': minhash-buckets = num_buckets x workers_per_bucket = {d.num_buckets} x "
        f"{d.workers_per_bucket}, exact-find = dedup.exact_finder_workers when > 1; 'serial' "
        f"(one task): exact-find (exact_finder_workers = {d.exact_finder_workers}), "
        "minhash-cluster, tokenizer, pack-tails, publish",
        "one core per task, perfect packing, no I/O, network or scheduler limits; node-h = "
        "wall-h x the nodes a stage occupies",
    ):
        print(f"  - {line}")
    print(f"{'stage':<22}{'kind':>7}{'tasks':>8}{'x by':>6}{'core-h':>10}{'wall-h':>9}{'nodes':>7}"
          f"{'node-h':>10}")  # fmt: skip
    tot = [0.0, 0.0, 0.0]
    cluster = cluster_at_scale(args, cfg)
    for r in results:
        kind, par, basis, x = _full_scale(r, (build_tasks, full_tasks), args, cfg, meta)
        core_h = r.work_s(overhead) * x / 3600
        if r.name == "minhash-cluster" and cluster is not None:
            basis, core_h = "pairs", cluster["core_h"]
        slots = max(1, min(par, cores_total))
        wall_h = core_h / slots
        nodes = math.ceil(slots / args.cores)
        node_h = wall_h * nodes
        tot = [tot[0] + core_h, tot[1] + wall_h, tot[2] + node_h]
        print(f"{r.name:<22}{kind:>7}{par:>8,}{basis:>6}{core_h:>10,.1f}{wall_h:>9.2f}{nodes:>7}"
              f"{node_h:>10,.1f}")  # fmt: skip
    print(f"{'total':<22}{'':>7}{'':>8}{'':>6}{tot[0]:>10,.1f}{tot[1]:>9.2f}{'':>7}"
          f"{tot[2]:>10,.1f}")  # fmt: skip
    print(
        f"  (node-h counts the nodes each stage occupies; holding all {args.nodes} nodes "
        f"for the whole build: {tot[1] * args.nodes:,.0f} node-h)"
    )
    if cluster is not None:
        print(
            f"  minhash-cluster 'pairs': {cluster['pairs']:.3g} duplicate pairs assumed "
            f"(docs x {cfg.dedup.num_buckets} buckets x 0.5), time and memory from the growth "
            f"measured by cluster_scale.py ({CLUSTER_RESULTS.name}): one process, "
            f"~{cluster['measured_gib']:,.1f} GiB above its imports; its Slurm default asks "
            f"{cluster['slurm_gb']:,.0f} GB (pipeline/cluster.py's model, with margin)"
        )


def _sum_by_group(results: list[StageResult], ref: bool, attr: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        g = group_of(r.name, ref)
        if g is not None:
            out[g] = out.get(g, 0.0) + getattr(r, attr)
    return out


def _ratio(ms_s: float, ref_s: float) -> str:
    return f"{ref_s / ms_s:7.2f}" if ms_s > 0 and ref_s > 0 else f"{'-':>7}"


def print_comparison(
    ms: list[StageResult], ref: list[StageResult], docs: int, overhead: StageResult
) -> None:
    wall = _sum_by_group(ms, False, "wall_s"), _sum_by_group(ref, True, "wall_s")
    cpu = _sum_by_group(ms, False, "cpu_s"), _sum_by_group(ref, True, "cpu_s")
    print(
        "\nmaskscale vs datatrove reference: ratio = maskscale docs/s / datatrove docs/s = "
        "datatrove s / maskscale s\n(wall: elapsed; cpu: CPU s of the process tree, steadier "
        "when other work shares the machine)"
    )
    print(
        f"{'stage group':<34}{'ms wall':>8}{'dt wall':>8}{'ratio':>7}{'ms cpu':>8}{'dt cpu':>8}"
        f"{'ratio':>7}  maskscale stages"
    )
    for g, *_ in GROUPS:
        names = ", ".join(r.name for r in ms if group_of(r.name) == g)
        (a, b), (c, d) = (wall[0].get(g, 0.0), wall[1].get(g, 0.0)), (cpu[0].get(g, 0.0),
                                                                       cpu[1].get(g, 0.0))  # fmt: skip
        print(f"{g:<34}{a:>8.1f}{b:>8.1f}{_ratio(a, b)}{c:>8.1f}{d:>8.1f}{_ratio(c, d)}  {names}")
    ms_t, ref_t = sum(wall[0].values()), sum(wall[1].values())
    ms_c, ref_c = sum(cpu[0].values()), sum(cpu[1].values())
    print(f"{'end to end (BPE training excluded)':<34}{ms_t:>8.1f}{ref_t:>8.1f}{_ratio(ms_t, ref_t)}"
          f"{ms_c:>8.1f}{ref_c:>8.1f}{_ratio(ms_c, ref_c)}")  # fmt: skip
    tok_t = sum(r.wall_s for r in ms if group_of(r.name) is None)
    ms_n = sum(r.work_s(overhead) for r in ms if group_of(r.name) is not None)
    ref_n = sum(r.work_s(overhead) for r in ref)
    print(
        f"END TO END: maskscale {docs / ms_t:,.0f} docs/s, datatrove {docs / ref_t:,.0f} docs/s "
        f"(wall) -> ratio {ref_t / ms_t:.2f} (goal >= 1.2)\n  CPU ratio {ref_c / ms_c:.2f}; "
        f"CPU net of executor start-up (as at scale) {_ratio(ms_n, ref_n).strip()}; wall "
        f"counting maskscale's BPE training ({tok_t:.1f} s) too: {ref_t / (ms_t + tok_t):.2f}"
    )


def print_dedup_check(out: Path, ref_results: list[StageResult], ref_work: Path, meta) -> None:
    from pipeline.shards import read_manifest

    planted = meta["planted"]
    print(f"\nplanted: {planted['exact_dup']:,} exact and {planted['near_dup']:,} near duplicates "
          f"in {meta['docs']:,} docs")  # fmt: skip
    m = read_manifest(str(out))
    dups = m.get("duplicates", {})
    tokens = sum(s.get("tokens", 0) for s in m.get("sources", {}).values())
    print(
        f"maskscale removed: exact {dups.get('exact', '?')}, near {dups.get('near', '?')}; "
        f"kept {m.get('documents', {}).get('kept', 0):,} docs, {tokens:,} tokens"
    )
    st = {r.name: stage_stats(str(ref_work / "logs" / r.name)) for r in ref_results}
    tok = st.get("tokenize", {})

    def pick(step: str, label: str) -> int:
        return int(sum(v for k, v in tok.items() if step in k.lower() and k.endswith(label)))

    print(f"datatrove removed: exact {pick('exact', '|dropped')}, near "
          f"{pick('minhash', '|dropped')}; kept {pick('minhash', '|forwarded'):,} docs, "
          f"{pick('token', '|tokens'):,} tokens")  # fmt: skip


def parse_args() -> argparse.Namespace:
    from pipeline.config import RecordConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=50, help="uncompressed JSONL MB to generate")
    ap.add_argument("--files", type=int, default=40, help="number of .jsonl.zst input files")
    ap.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    ap.add_argument("--nodes", type=int, default=64, help="projection: cluster nodes")
    ap.add_argument("--cores", type=int, default=64, help="projection: cores per node")
    ap.add_argument("--exact-dup", type=float, default=0.03, help="fraction of exact copies")
    ap.add_argument("--near-dup", type=float, default=0.03, help="fraction of near copies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="where generated dumps are kept")
    ap.add_argument(
        "--work-dir", type=Path, default=None, help="build folders (default: a tmp dir)"
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; best per stage")
    ap.add_argument("--keep", action="store_true", help="keep the build folders")
    ap.add_argument("--no-reference", action="store_true", help="skip the datatrove reference")
    ap.add_argument("--full-docs", type=float, default=FULL_DOCS)
    ap.add_argument("--full-bytes", type=float, default=FULL_BYTES)
    ap.add_argument("--full-files", type=int, default=FULL_FILES, help="zstd files at full scale")
    ap.add_argument("--full-stored", type=float, default=FULL_COMPRESSED,
                    help="stored (zstd) bytes at full scale")  # fmt: skip
    ap.add_argument(
        "--task-bytes",
        type=int,
        default=RecordConfig.task_bytes,
        help="projection: records.task_bytes at full scale (default: the config's, 512 MiB)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="corpus config override for the maskscale build (repeatable)",
    )
    return ap.parse_args()


def run_all(args, dump: Path, meta: dict, work: Path) -> None:
    mb, docs = meta["bytes_uncompressed"] / 1e6, meta["docs"]
    overhead = executor_overhead(args.workers, str(work / "empty"))
    ms_runs, ref_runs = [], []
    overrides = list(args.set)
    if not any(o.startswith("records.task_bytes=") for o in overrides):
        tb = build_task_bytes(dump, args.workers)
        overrides.append(f"records.task_bytes={tb}")
        print(f"records.task_bytes={tb:,} for the measured build: whole .zst files, about stored "
              f"bytes / (2 x {args.workers} workers), so every worker stays busy (the default "
              "512 MiB would make this dump one task)")  # fmt: skip
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats}")
        out = work / f"maskscale-{i}"
        cfg, ms = run_maskscale(dump, out, args.workers, overrides, verbose=i == 0)
        ms_runs.append(ms)
        if not args.no_reference:
            tok_path = find_tokenizer(out, ms)
            tasks = min(ms[0].tasks, meta["files"])
            ref_runs.append(
                run_reference(cfg, dump, work / f"datatrove-{i}", tok_path, tasks, args.workers)
            )
    ms = best_of(ms_runs)
    note = f", best of {args.repeats} repeats per stage" if args.repeats > 1 else ""
    print_stage_table(f"maskscale build{note}", ms, mb, docs)
    print_projection(ms, overhead, args, cfg, meta)
    if ref_runs:
        ref = best_of(ref_runs)
        print_stage_table(f"datatrove reference{note}", ref, mb, docs)
        print_comparison(ms, ref, docs, overhead)
        print_dedup_check(out, ref, work / f"datatrove-{args.repeats - 1}", meta)


def main() -> None:
    from pipeline.build import preload_workers

    args = parse_args()
    # maskscale's local executor has its forkserver preload the pipeline modules (which import
    # datatrove's executor, I/O and dedup modules); set here, before the first pool, it holds
    # for the start-up measurement and the datatrove reference too: one forkserver for all
    preload_workers()
    params = DumpParams(args.size_mb, args.files, args.exact_dup, args.near_dup, seed=args.seed)
    dump, meta = ensure_dump(params, args.cache_dir)
    mb, docs = meta["bytes_uncompressed"] / 1e6, meta["docs"]
    print(
        f"dump {dump}: {meta['files']} files, {docs:,} docs, {mb:.1f} MB uncompressed, "
        f"{meta['bytes_compressed'] / 1e6:.1f} MB zstd, {meta['bytes_uncompressed'] / docs:,.0f} "
        f"B/doc; {args.workers} workers on {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="maskscale-scale-"))
    for old in [*work.glob("maskscale-*"), *work.glob("datatrove-*"), work / "empty"]:
        shutil.rmtree(old, ignore_errors=True)
    start = time.perf_counter()
    try:
        run_all(args, dump, meta, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\ntotal benchmark time {time.perf_counter() - start:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
