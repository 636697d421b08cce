"""Running ``maskscale corpus overlap``: plans its two stages like the build's (keyed folders
under ``CORPUS/.work``, datatrove's local executor) and assembles the report.

Kept apart from :mod:`pipeline.overlap` (the stages' steps) so that the code fingerprint of
those stages (:mod:`pipeline.codekey`) covers the code that writes their bytes, not the
whole build planner this module imports.
"""

from __future__ import annotations

import os

from pipeline.build import Stage, run_local
from pipeline.codekey import stage_versions
from pipeline.configlib import fingerprint
from pipeline.ngrams import HASH_SCHEME, Task
from pipeline.overlap import OverlapError, OverlapFind, OverlapSignatures, write_queries
from pipeline.overlap_report import assemble
from pipeline.shards import read_manifest


def split_stage_data(corpus: str, manifest: dict) -> tuple[str, str, int]:
    """(split stage folder, its data folder, its number of tasks), or OverlapError."""
    rel = manifest.get("stages", {}).get("split")
    folder = os.path.join(corpus, rel) if rel else None
    data = os.path.join(folder, "data") if folder else None
    train = os.path.join(data, "train") if data else None
    if not train or not os.path.isdir(train) or not os.listdir(train):
        raise OverlapError(
            f"{corpus}: the split stage's documents ({data or 'manifest.stages.split'}) are "
            "gone (`corpus build --clean-work` deletes them) or the corpus has no train split; "
            "rerun the same `maskscale corpus build` command without --clean-work to recompute "
            "them, then this command"
        )
    done = os.path.join(folder, "logs", "completions")
    tasks = len(os.listdir(done)) if os.path.isdir(done) else 0
    ranks = [int(n.split(".")[0]) for s in os.listdir(data) if os.path.isdir(os.path.join(data, s))
             for n in os.listdir(os.path.join(data, s)) if n.endswith(".jsonl.zst")]  # fmt: skip
    return folder, data, max([tasks, *(r + 1 for r in ranks)])


def plan_overlap(corpus: str, manifest: dict, tasks: list[Task], n: int, finder_workers: int,
                 workers: int):  # fmt: skip
    """The two stages (not run) and the folders the report reads."""
    split_folder, data, n_tasks = split_stage_data(corpus, manifest)
    splits = sorted(s for s in os.listdir(data) if os.path.isdir(os.path.join(data, s)))
    work = os.path.join(corpus, ".work")
    sig_key = fingerprint({"split": os.path.basename(split_folder), "n": n, "scheme": HASH_SCHEME,
                           "slices": finder_workers,
                           "versions": stage_versions("overlap-signatures")})  # fmt: skip
    sig_dir = os.path.join(work, f"overlap-signatures-{sig_key}")
    find_key = fingerprint({"parent": sig_key, "versions": stage_versions("overlap-find"),
                            "tasks": {t.name: t.content_sha256()
                                                         for t in tasks}})  # fmt: skip
    find_dir = os.path.join(work, f"overlap-find-{find_key}")
    sigs = Stage("overlap-signatures", sig_dir, [OverlapSignatures(
        data, os.path.join(sig_dir, "data"), splits, n, finder_workers)], n_tasks,
        min(workers, n_tasks), sig_key)  # fmt: skip
    tasks_dir = os.path.join(find_dir, "tasks")
    find = Stage("overlap-find", find_dir, [OverlapFind(
        os.path.join(sig_dir, "data"), tasks_dir, os.path.join(find_dir, "data"))],
        finder_workers, min(workers, finder_workers), find_key)  # fmt: skip
    return [sigs, find], {"data": data, "signatures": os.path.join(sig_dir, "data"),
                          "tasks": tasks_dir, "matches": os.path.join(find_dir, "data"),
                          "splits": [s for s in splits if s != "train"]}  # fmt: skip


def prepare_tasks(tasks: list[Task], n: int, finder_workers: int, tasks_dir: str) -> None:
    """Task queries, hashed here (they are small) before the find stage runs."""
    for task in tasks:
        counts = write_queries(task.items, n, finder_workers, tasks_dir, task.name)
        counts.tofile(os.path.join(tasks_dir, f"{task.name}.u32"))


def run_overlap(corpus: str, tasks: list[Task], n: int = 13, finder_workers: int = 1,
                workers: int = 2, progress: bool = True) -> dict:  # fmt: skip
    """Run (or reuse) both stages and return the report (``overlap.json``'s content)."""
    if n < 1 or finder_workers < 1 or workers < 1:
        raise OverlapError("--ngram, --finder-workers and --workers must be >= 1")
    manifest = read_manifest(corpus)
    stages, where = plan_overlap(corpus, manifest, tasks, n, finder_workers, workers)
    os.makedirs(where["tasks"], exist_ok=True)
    prepare_tasks(tasks, n, finder_workers, where["tasks"])
    run_local(stages, progress)
    return assemble(where, tasks, n, finder_workers, manifest)
