"""Reading raw dumps, with every bad record counted by reason instead of crashing the build.

datatrove's stock readers assume well-formed input: a truncated ``.zst`` or a malformed line
either kills the task or disappears into a log. Web dumps are never clean, so this reader
validates each record, writes every rejected one to a per-task rejects file, counts it
(``dropped/<reason>``) so the manifest's accounting closes exactly, and logs one summary line
per file and reason. ``strict`` turns the first bad record into an error naming file and line.

What is *not* bad data is not counted: an I/O error, a ``MemoryError`` or a bug fails the task
(rerunning the build retries it). Only damage the decoders see (a bad or truncated zstd/gzip
stream, an unreadable parquet file or row group) is ``corrupt_file``: the documents before the
damage are kept, and what was lost (compressed bytes, or row groups) is recorded per file for
the manifest's ``corrupt_files``.

Supported layouts: SlimPajama (``chunk*/…jsonl.zst`` with ``{"text", "meta":
{"redpajama_set_name", "date"}}``), FineWeb-style parquet (``text``, ``id``, ``date``,
``dump``; only the needed columns are read) and plain JSONL (optionally gzip/zstd compressed).
Inputs are divided into tasks by :mod:`pipeline.inputs`; field rules are in
:mod:`pipeline.records`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Iterator

import orjson
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from pipeline.inputs import (
    STREAM_CORRUPTION,
    InputReadError,
    TruncatedStream,
    WorkUnit,
    discover_inputs,
    open_input,
    open_lines,
    plan_tasks,
    unit_lines,
)
from pipeline.records import (
    MAX_DATE,
    MIN_DATE,
    InvalidMetadata,
    check_types,
    parse_date,
    resolve_date,
    split_text,
)

__all__ = ["BadInputError", "RawDumpReader", "discover_inputs", "load_date_map", "open_lines",
           "parse_date", "plan_tasks", "read_corrupt_files"]  # fmt: skip
PARQUET_COLUMNS = ("text", "id", "date", "dump", "source", "meta")


class BadInputError(ValueError):
    """Raised in strict mode; the message names the file, the line and what to do."""


def load_date_map(path: str | None) -> dict[str, str]:
    """id -> date from a JSON object file or a CSV file with ``id,date`` columns."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"date_map {path} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            return {str(k): str(v) for k, v in json.load(f).items()}
    import csv

    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        if not rows.fieldnames or not {"id", "date"} <= set(rows.fieldnames):
            raise ValueError(f"date_map {path}: expected a CSV header with columns id,date")
        return {row["id"]: row["date"] for row in rows}


def read_corrupt_files(folder: str) -> list[dict]:
    """Every damaged input recorded by the reading tasks, sorted by file and position."""
    out = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as f:
                out += [json.loads(line) for line in f if line.strip()]
    return sorted(out, key=lambda r: (r["file"], r.get("line", 0)))


def _is_parquet_damage(e: BaseException) -> bool:
    """pyarrow's own errors about the bytes (not storage errors, memory or missing codecs)."""
    import pyarrow as pa

    if isinstance(e, InputReadError | MemoryError | pa.ArrowNotImplementedError):
        return False
    return isinstance(e, OSError | pa.ArrowException)


class RawDumpReader(PipelineStep):
    """Reads and validates raw records; yields one Document per valid record (or piece).

    The same input always gives the same stream, so several stages can each read the raw
    dump instead of a copy of it. ``rejects_folder=None``: this stage's reader records no
    rejects, damaged files or log lines (another stage's does); strict mode still raises.
    """

    type = "📖 - READER"
    name = "maskscale raw dump reader"

    def __init__(
        self,
        tasks: list[list[WorkUnit]],
        rejects_folder: str | None,
        *,
        corrupt_folder: str | None = None,
        default_source: str = "web",
        exclude_sources: list[str] = (),
        max_chars: int = 2_000_000,
        too_long: str = "split",
        strict: bool = False,
        drop_undated: bool = False,
        date_map: dict[str, str] | None = None,
        min_date: str | None = None,
        max_date: str | None = None,
        filters=None,
    ):
        super().__init__()
        self.tasks = tasks
        self.rejects_folder = rejects_folder
        if rejects_folder is not None and corrupt_folder is None:
            corrupt_folder = os.path.join(rejects_folder, "..", "corrupt")
        self.corrupt_folder = corrupt_folder
        self.default_source = default_source
        self.exclude_sources = set(exclude_sources)
        self.max_chars, self.too_long = max_chars, too_long
        self.strict = strict
        self.drop_undated = drop_undated
        self.date_map = date_map or {}
        self.bounds = (dt.date.fromisoformat(min_date) if min_date else MIN_DATE,
                       dt.date.fromisoformat(max_date) if max_date else MAX_DATE)  # fmt: skip
        self.filters = filters or None  # pipeline.filters.QualityFilters (only when enabled)
        self._rejects = self._corrupt = None
        self._counts: Counter[str] = Counter()

    # -- bookkeeping ---------------------------------------------------------------------
    def _reject(self, unit: WorkUnit, line: int, reason: str, detail: str = "", **extra) -> None:
        where = f"{unit.file.url}:{line}"
        if self.strict:
            raise BadInputError(
                f"{where}: {reason}{': ' + detail if detail else ''}. Fix or remove this record, "
                "or rebuild without --strict to count and skip bad records."
            )
        self.stat_update("read", f"dropped/{reason}")
        self._counts[reason] += 1
        rec = {"file": unit.file.url, "line": line, "reason": reason, "detail": detail[:500]}
        self._rejects.write(json.dumps({**rec, **extra}) + "\n")

    def _damaged(self, unit: WorkUnit, line: int, kind: str, e: BaseException, **lost) -> None:
        """Count a damaged region as one ``corrupt_file`` and record what was lost."""
        detail = f"{type(e).__name__}: {e}"
        self._reject(unit, line, "corrupt_file", detail, **lost)
        rec = {"file": unit.file.url, "line": line, "reason": kind, "detail": detail[:500]}
        self._corrupt.write(json.dumps({**rec, **lost}) + "\n")

    def _filtered(self, unit: WorkUnit, line: int, doc: Document, split: str, verdict) -> None:
        """A document a quality filter removed: not bad input (strict mode keeps going), but a
        rejection like one, counted per split and source and listed with file:line."""
        name, detail = verdict
        reason, source = f"filter:{name}", doc.metadata["source"]
        self.stat_update(f"dropped/{reason}", f"filter_removed/{split}/{name}/{source}")  # fmt: skip
        self._counts[reason] += 1
        rec = {"file": unit.file.url, "line": line, "reason": reason, "detail": detail[:500],
               "id": doc.id, "split": split, "source": source}  # fmt: skip
        self._rejects.write(json.dumps(rec) + "\n")

    def _passes(self, doc: Document, unit: WorkUnit, line: int) -> bool:
        split = self.filters.label(doc)  # before a filter edits the text it is hashed by
        self.stat_update(f"filter_checked/{split}/{doc.metadata['source']}")
        verdict = self.filters.check(doc)
        if verdict is not None:
            self._filtered(unit, line, doc, split, verdict)
        return verdict is None

    def _summarize(self, unit: WorkUnit) -> None:
        for reason, n in sorted(self._counts.items()) if self.rejects_folder else ():
            logger.warning(f"{unit}: {n} record(s) dropped ({reason}); listed in "
                           f"{self.rejects_folder}")  # fmt: skip
        self._counts.clear()

    # -- record -> Documents ---------------------------------------------------------------
    def _text_problem(self, rec) -> tuple[str, str] | None:
        if not isinstance(rec, dict):
            return "malformed_json", "record is not a JSON object"
        text = rec.get("text")
        if text is None:
            return "missing_text", "no 'text' field"
        if not isinstance(text, str):
            return "non_string_text", f"text is {type(text).__name__}"
        if not text.strip():
            return "empty_text", ""
        return None

    def _date_of(self, rec: dict, meta: dict) -> dt.date | None:
        raw = meta.get("date") or rec.get("date")
        dump = rec.get("dump")
        if raw in (None, "") and dump in (None, "") and rec.get("id") not in (None, ""):
            raw = self.date_map.get(str(rec["id"]))
        day, origin = resolve_date(raw, dump, *self.bounds)
        if origin == "dump":
            self.stat_update("date_from_dump")
            if raw not in (None, ""):
                self.stat_update("date_invalid_used_dump")
        return day

    def _pieces(self, text: str, unit: WorkUnit, line: int) -> list[str] | None:
        if len(text) <= self.max_chars:
            return [text]
        if self.too_long == "drop":
            detail = f"{len(text)} chars > records.max_chars={self.max_chars}"
            return self._reject(unit, line, "too_long", detail)
        pieces = split_text(text, self.max_chars)
        if self.too_long == "truncate":
            self.stat_update("long/truncated")
            self.stat_update("long/truncated_chars", value=len(text) - len(pieces[0]))
            return pieces[:1]
        self.stat_update("long/split")
        self.stat_update("long/pieces", value=len(pieces))
        return pieces

    def _make_docs(self, rec, unit: WorkUnit, line: int) -> list[Document]:
        problem = self._text_problem(rec)
        if problem:
            return self._reject(unit, line, *problem) or []
        meta = rec.get("meta")
        if meta is not None and not isinstance(meta, dict):
            detail = f"field 'meta' is a {type(meta).__name__}, expected an object"
            return self._reject(unit, line, "invalid_metadata", detail) or []
        meta = meta or {}
        try:
            check_types(rec, meta)
        except InvalidMetadata as e:
            return self._reject(unit, line, "invalid_metadata", str(e)) or []
        source = meta.get("redpajama_set_name") or rec.get("source") or self.default_source
        if source in self.exclude_sources:
            return self._reject(unit, line, "excluded_source", str(source)) or []
        try:
            date = self._date_of(rec, meta)
        except ValueError as e:
            return self._reject(unit, line, "invalid_date", str(e)) or []
        if date is None and self.drop_undated:
            return self._reject(unit, line, "undated", "split.undated=drop") or []
        pieces = self._pieces(rec["text"], unit, line)
        if not pieces:
            return []
        doc_id = rec.get("id")
        doc_id = str(doc_id) if doc_id not in (None, "") else f"{unit.file.name}:{line}"
        metadata = {"source": str(source), "date": date.isoformat() if date else None,
                    "origin": f"{unit.file.url}:{line}"}  # fmt: skip
        if len(pieces) == 1:
            docs = [Document(text=pieces[0], id=doc_id, metadata=metadata)]
        else:
            docs = [Document(text=p, id=f"{doc_id}#{k}", metadata=dict(metadata))
                    for k, p in enumerate(pieces)]  # fmt: skip
        if self.filters is not None:  # each piece is a document: filtered (and counted) alone
            docs = [d for d in docs if self._passes(d, unit, line)]
        # one record read; "kept" when any of its documents survived the filters
        self.stat_update("read", *(("kept", f"source/{source}") if docs else ()))
        return docs

    # -- files -----------------------------------------------------------------------------
    def _read_jsonl(self, unit: WorkUnit) -> Iterator[Document]:
        # lines_before: counted at planning, so a range never rereads the file's head
        line, good = unit.lines_before, 0
        with open_input(unit.file.url) as fh:
            try:
                for raw, _offset, pos in unit_lines(fh, unit):
                    line += 1
                    if raw.strip():
                        yield from self._parse_line(raw, unit, line)
                    good = pos
            except STREAM_CORRUPTION as e:
                lost = {"lost_bytes": max(unit.file.size - good, 0), "offset": good}
                kind = "truncated_stream" if isinstance(e, TruncatedStream) else "corrupt_stream"
                self._damaged(unit, line + 1, kind, e, **lost)

    def _parse_line(self, raw: bytes, unit: WorkUnit, line: int) -> list[Document]:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._reject(unit, line, "invalid_utf8", str(e)) or []
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return self._reject(unit, line, "malformed_json", str(e)) or []
        return self._make_docs(rec, unit, line)

    def _read_parquet(self, unit: WorkUnit) -> Iterator[Document]:
        import pyarrow.parquet as pq

        with open_input(unit.file.url) as fh:
            try:
                pf = pq.ParquetFile(fh)
            except Exception as e:
                if not _is_parquet_damage(e):
                    raise
                return self._damaged(unit, 1, "unreadable_parquet", e,
                                     lost_bytes=unit.file.size)  # fmt: skip
            md = pf.metadata
            columns = [c for c in PARQUET_COLUMNS if c in pf.schema_arrow.names]
            stop = md.num_row_groups if unit.stop is None else unit.stop
            row = sum(md.row_group(g).num_rows for g in range(unit.start))
            for group in range(unit.start, stop):
                yield from self._read_row_group(pf, group, columns, unit, row)
                row += md.row_group(group).num_rows

    def _read_row_group(self, pf, group: int, columns, unit: WorkUnit, row: int):
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
                for rec in batch.to_pylist():
                    done += 1
                    yield from self._make_docs(rec, unit, row + done)
        except Exception as e:
            if not _is_parquet_damage(e):
                raise
            lost_rows = pf.metadata.row_group(group).num_rows - done
            self._damaged(unit, row + done + 1, "corrupt_row_group", e,
                          lost_row_groups=[group], lost_rows=lost_rows)  # fmt: skip

    def _read_unit(self, unit: WorkUnit) -> Iterator[Document]:
        reader = self._read_parquet if unit.file.codec == "parquet" else self._read_jsonl
        try:
            yield from reader(unit)
        except (BadInputError, InputReadError):
            raise
        except Exception as e:  # a bug or MemoryError: fail the task, saying where
            e.add_note(f"while reading {unit}")
            raise

    @staticmethod
    def _record_file(folder: str | None, name: str):
        """A task's rejects (or damaged-files) file; nowhere when the stage does not record."""
        if folder is None:
            return open(os.devnull, "w")
        os.makedirs(folder, exist_ok=True)
        return open(os.path.join(folder, name), "w")

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != len(self.tasks):
            raise ValueError(f"the reader was planned for {len(self.tasks)} tasks, "
                             f"run with {world_size}")  # fmt: skip
        name = f"{rank:05d}.jsonl"
        with (
            self._record_file(self.rejects_folder, name) as self._rejects,
            self._record_file(self.corrupt_folder, name) as self._corrupt,
        ):
            for unit in self.tasks[rank]:
                with self.track_time():
                    yield from self._read_unit(unit)
                self._summarize(unit)
                self.stat_update("input_units")
