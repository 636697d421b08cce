"""The build's work folder ``OUTPUT/.work``: when publishing must be redone, and cleaning it.

Stage folders are reused whenever their key matches (see :mod:`pipeline.build`), which is what
makes resuming and partial rebuilds cheap. Two things need more than that:

- **Publishing is not idempotent across configs.** OUTPUT holds one build. After config A,
  then B, then A again, A's publish stage is complete, so datatrove would skip it and leave B
  published (the same holds for code: the build key includes every stage's code fingerprint,
  so going back to older code republishes its corpus). The manifest therefore records ``build_key`` (the publish stage's key) and
  :func:`redo_stale_publish` drops the publish stage's completion markers whenever the
  published key is not the one about to be built.
- **Work files cost disk.** Intermediate copies of the corpus (split outputs)
  are as large as the input. Published shards are hard links (or copies) of the pack shards, so
  they own their bytes: deleting the work folders never touches the published corpus.
  :func:`clean_work` removes every stage folder of older builds, and in the stages of the
  published build everything but the provenance -- ``logs/`` (datatrove's stats and task
  logs, which the manifest was assembled from) and the split's ``rejects/``. Completion markers
  go too, so a later build reruns a cleaned stage instead of trusting outputs that are gone.
"""

from __future__ import annotations

import json
import os
import shutil

from pipeline.shards import MANIFEST

KEEP = ("logs", "rejects")


def published_key(output: str) -> str | None:
    """The ``build_key`` of the corpus published in ``output`` (None: none, or unreadable)."""
    try:
        with open(os.path.join(output, MANIFEST)) as f:
            return json.load(f).get("build_key")
    except (OSError, ValueError, AttributeError):
        return None


def redo_stale_publish(output: str, publish) -> bool:
    """Make the publish stage run again unless OUTPUT already holds exactly this build."""
    if published_key(output) == publish.key:
        return False
    shutil.rmtree(os.path.join(publish.logging_dir, "completions"), ignore_errors=True)
    return True


def _size_freed(path: str) -> int:
    """Bytes that deleting ``path`` frees (hard-linked files are still owned elsewhere)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_nlink == 1:
                total += st.st_size
    return total


def _remove(path: str) -> int:
    freed = _size_freed(path) if os.path.isdir(path) else os.lstat(path).st_size
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
    return freed


def clean_work(output: str, stages: list) -> dict:
    """Remove what the published corpus no longer needs; returns {removed_stages, freed_bytes}.

    Refuses (ValueError) unless OUTPUT holds the build of ``stages``: cleaning after a failed or
    different build could delete the only copy of work another build still needs.
    """
    if published_key(output) != stages[-1].key:
        raise ValueError(
            f"{output} does not hold the build planned here (manifest build_key differs); "
            "run the build to completion before cleaning its work folder"
        )
    work = os.path.join(os.path.abspath(output), ".work")
    current = {os.path.basename(s.folder) for s in stages}
    removed, freed = 0, 0
    for name in sorted(os.listdir(work)) if os.path.isdir(work) else []:
        folder = os.path.join(work, name)
        if name not in current:  # older builds' stages, and the input plan cache
            removed += os.path.isdir(folder)
            freed += _remove(folder)
            continue
        for entry in sorted(os.listdir(folder)):
            if entry not in KEEP:
                freed += _remove(os.path.join(folder, entry))
        completions = os.path.join(folder, "logs", "completions")
        if os.path.isdir(completions):
            freed += _remove(completions)
    return {"removed_stages": removed, "freed_bytes": freed}
