"""The temporal split, and what it does with documents that carry no date.

A temporal study is only as good as its cutoff: a single post-cutoff document in train leaks
the "future" the holdouts are meant to measure. SlimPajama records carry no date at all, so
each source gets a bound instead (``source_dates``: the latest date its documents can have,
e.g. the Wikipedia dump date). An undated document whose bound is before the cutoff is safely
pre-cutoff. One whose bound is on or after the cutoff, or whose source has no bound, might be
post-cutoff; ``split.undated`` decides: ``error`` (the default) stops the build after the split
stage, before anything is tokenized, naming sources and counts; ``drop`` drops them (counted);
``train`` keeps them, with a warning.

The split stage counts what it saw; the check reads those counts, so it works the same on the
local executor (checked in-process right after the split) and on Slurm (checked by the first
step of the tokenizer stage, whose job then fails and stops the dependent chain).
"""

from __future__ import annotations

import datetime as dt
import os

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from pipeline.readers import BadInputError
from pipeline.steps import PRE_CUTOFF_CHARS, load_stats, text_hash01

AFTER = "undated_after_cutoff/"
UNDATED = "undated"  # period of an undated document that may be post-cutoff


class UndatedAfterCutoffError(BadInputError):
    """Undated documents may date from on or after the cutoff; the message says what to do."""


def parse_bounds(source_dates: dict[str, str]) -> dict[str, dt.date]:
    return {src: dt.date.fromisoformat(day) for src, day in source_dates.items()}


def doc_day(doc: Document, bounds: dict[str, dt.date]) -> dt.date | None:
    """A document's date, or else its source's bound (the latest date it can have)."""
    date = doc.metadata.get("date")
    if date:
        return dt.date.fromisoformat(date)
    return bounds.get(doc.metadata.get("source"))


class TemporalSplitter(PipelineStep):
    """Assigns ``metadata["split"]``: train / validation before the cutoff, holdouts after.

    Counts ``chars/pre_cutoff`` (train + validation text, for the BPE sample) and, per source,
    undated documents kept (``undated/<source>``) and those that may be post-cutoff
    (``undated_after_cutoff/<source>``), which ``check_undated`` turns into an error or warning.
    """

    type = "🔀 - SPLIT"
    name = "maskscale temporal split"

    def __init__(
        self,
        cutoff: str | None,
        validation_fraction: float,
        seed: int,
        holdout_ranges: dict[str, list[str]] | None = None,
        source_dates: dict[str, str] | None = None,
        undated: str = "error",
        decontaminate=None,
    ):
        super().__init__()
        self.decontaminate = decontaminate  # pipeline.ngrams.TaskNgrams: drops train documents
        self.cutoff = dt.date.fromisoformat(cutoff) if cutoff else None
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.ranges = [
            (name, dt.date.fromisoformat(a), dt.date.fromisoformat(b))
            for name, (a, b) in (holdout_ranges or {}).items()
        ]
        self.bounds = parse_bounds(source_dates or {})
        self.undated = undated

    def pre_cutoff_split(self, doc: Document) -> str:
        if text_hash01(doc.text, self.seed) < self.validation_fraction:
            return "validation"
        return "train"

    def period_of(self, doc: Document) -> str:
        """The split a document's date (or its source's bound) puts it in, counting nothing:
        ``undated`` when it has no date and may be post-cutoff (``split.undated`` not train).
        Quality filters label the documents they remove with it, before the split runs."""
        date = doc.metadata.get("date")
        if date:
            day = dt.date.fromisoformat(date)
            if self.cutoff is not None and day >= self.cutoff:
                for name, start, end in self.ranges:
                    if start <= day <= end:
                        return name
                return f"holdout_{day.year}"
            return self.pre_cutoff_split(doc)
        if not self._may_be_post_cutoff(doc) or self.undated == "train":
            return self.pre_cutoff_split(doc)
        return UNDATED

    def _may_be_post_cutoff(self, doc: Document) -> bool:
        """An undated document whose source bound is not before the cutoff (or has none)."""
        bound = self.bounds.get(doc.metadata["source"])
        return self.cutoff is not None and (bound is None or bound >= self.cutoff)

    def split_of(self, doc: Document) -> str | None:
        """The split of a document, or None when it is dropped (counted by the caller)."""
        split = self.period_of(doc)
        if doc.metadata.get("date"):
            return split
        source = doc.metadata["source"]
        if self._may_be_post_cutoff(doc):
            self.stat_update(f"{AFTER}{source}")
        if split != UNDATED:
            self.stat_update("undated_kept", f"undated/{source}")
            return split
        # error (the build stops after this stage) or drop: never yielded, so never in train
        bound = self.bounds.get(source)
        self.stat_update("dropped/undated_after_cutoff" if bound else "dropped/undated")
        return None

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            split = self.split_of(doc)
            if split is None:
                continue
            if split == "train" and self.decontaminate is not None:
                found = self.decontaminate.tasks_in(doc.text)
                if found:  # counted once as dropped, and once per task it contains
                    self.stat_update(
                        "dropped/decontaminated", *(f"decontaminated/{t}" for t in found)
                    )
                    continue
            doc.metadata["split"] = split
            self.stat_update(f"split/{split}", f"split_source/{split}/{doc.metadata['source']}")
            if split in ("train", "validation"):
                self.stat_update(PRE_CUTOFF_CHARS, value=len(doc.text))
            yield doc


def undated_after_cutoff(split_logs: str) -> dict[str, int]:
    """{source: n} of undated documents the split stage found possibly post-cutoff."""
    out: dict[str, int] = {}
    for key, n in load_stats(split_logs).items():
        label = key.split("|", 1)[1]
        if label.startswith(AFTER):
            out[label[len(AFTER) :]] = out.get(label[len(AFTER) :], 0) + int(n)
    return dict(sorted(out.items()))


def check_undated(split_logs: str, cutoff: str | None, source_dates: dict[str, str],
                  policy: str) -> str | None:  # fmt: skip
    """Raise (policy ``error``) or return a warning (``train``) about possibly post-cutoff
    undated documents; None when there are none or they were dropped."""
    found = undated_after_cutoff(split_logs)
    if not found or policy == "drop":
        return None
    parts = []
    for source, n in found.items():
        why = f"bound {source_dates[source]}" if source in source_dates else "no source_dates entry"
        parts.append(f"{source} ({why}): {n}")
    what = (
        f"{sum(found.values())} undated documents may date from on or after the cutoff {cutoff}: "
        + "; ".join(parts)
    )
    if policy == "train":
        return f"warning: {what}. They were put in train/validation because split.undated=train."
    raise UndatedAfterCutoffError(
        f"{what}. Nothing was tokenized. Give each source the latest date its documents can "
        "have (source_dates: {SOURCE: YYYY-MM-DD}, see configs/corpus/slimpajama.yaml) or give "
        "the documents dates (date_map), or rerun with split.undated=drop to drop them "
        "(counted) or split.undated=train to keep them in train anyway."
    )


class UndatedGuard(PipelineStep):
    """First step of the tokenizer stage: on Slurm the check runs here, failing the job."""

    type = "🔀 - SPLIT"
    name = "maskscale undated check"

    def __init__(self, split_folder: str, cutoff, source_dates, policy: str):
        super().__init__()
        self.split_logs = os.path.join(split_folder, "logs")
        self.cutoff, self.source_dates, self.policy = cutoff, dict(source_dates), policy

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.utils.logging import logger

        warning = check_undated(self.split_logs, self.cutoff, self.source_dates, self.policy)
        if warning:
            logger.warning(warning)
        return data
