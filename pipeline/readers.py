"""Reading raw dumps, with every bad record counted by reason instead of crashing the build.

datatrove's stock readers assume well-formed input: a truncated ``.zst`` or a malformed line
either kills the task or disappears into a log. Web dumps are never clean, so this reader
validates each record, logs ``file:line: reason``, writes it to a per-task rejects file, and
counts it (``dropped/<reason>``) so the manifest's accounting closes exactly. ``strict`` turns
the first bad record into an error that names file and line.

Supported layouts: SlimPajama (``chunk*/…jsonl.zst`` with ``{"text", "meta":
{"redpajama_set_name", "date"}}``), FineWeb-style parquet (``text``, ``id``, ``date``,
``dump``) and plain JSONL (optionally gzip/zstd compressed).
"""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import zstandard
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

EXTENSIONS = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".json.zst", ".parquet")
DUMP_RE = re.compile(r"CC-MAIN-(\d{4})-(\d{2})")


class BadInputError(ValueError):
    """Raised in strict mode; the message names the file, the line and what to do."""


def discover_inputs(patterns: list[str]) -> list[str]:
    """Expand directories/globs/files into a sorted, de-duplicated list of input files."""
    files: set[str] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = [str(p) for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            matches = [str(path)]
        else:
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not matches:
                raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.update(os.path.abspath(m) for m in matches if m.endswith(EXTENSIONS))
    if not files:
        raise FileNotFoundError(
            f"no input files with extensions {', '.join(EXTENSIONS)} under {patterns}"
        )
    return sorted(files)


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


def parse_date(value, dump: str | None = None) -> dt.date | None:
    """Date of a record from an ISO date/datetime/year, or a CC-MAIN-YYYY-WW dump id.

    Returns None when there is no date; raises ValueError when one is present but unreadable.
    """
    if value not in (None, ""):
        text = str(value).strip()
        if re.fullmatch(r"\d{4}", text):
            return dt.date(int(text), 1, 1)
        try:
            return dt.date.fromisoformat(text[:10])
        except ValueError:
            raise ValueError(f"unreadable date {text!r}") from None
    if dump:
        m = DUMP_RE.search(str(dump))
        if not m:
            raise ValueError(f"unreadable dump id {dump!r}")
        year, week = int(m.group(1)), int(m.group(2))
        return dt.date.fromisocalendar(year, max(1, min(week, 52)), 1)
    return None


def _zstd_blocks(fh) -> Iterator[bytes]:
    """Decompressed blocks of a (multi-frame) zstd file; a truncated last frame raises."""
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    while chunk := fh.read(1 << 20):
        while chunk:
            yield dobj.decompress(chunk)
            in_frame = not dobj.eof
            chunk = dobj.unused_data if dobj.eof else b""
            if dobj.eof:
                dobj = dctx.decompressobj()
    if in_frame:
        raise zstandard.ZstdError("truncated zstd stream: the last frame is incomplete")


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def open_lines(path: str) -> Iterator[bytes]:
    """Raw lines of a (possibly compressed) JSONL file; damaged files raise part-way."""
    if path.endswith((".zst", ".zstd")):
        with open(path, "rb") as fh:
            yield from _split_lines(_zstd_blocks(fh))
    elif path.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            yield from fh
    else:
        with open(path, "rb") as fh:
            yield from fh


class RawDumpReader(PipelineStep):
    """Reads and validates raw records; yields one Document per valid record."""

    type = "📖 - READER"
    name = "maskscale raw dump reader"

    def __init__(
        self,
        files: list[str],
        rejects_folder: str,
        *,
        default_source: str = "web",
        exclude_sources: list[str] = (),
        max_chars: int = 2_000_000,
        strict: bool = False,
        drop_undated: bool = False,
        date_map: dict[str, str] | None = None,
    ):
        super().__init__()
        self.files = list(files)
        self.rejects_folder = rejects_folder
        self.default_source = default_source
        self.exclude_sources = set(exclude_sources)
        self.max_chars = max_chars
        self.strict = strict
        self.drop_undated = drop_undated
        self.date_map = date_map or {}
        self._rejects = None

    # -- bookkeeping ---------------------------------------------------------------------
    def _reject(self, path: str, line: int, reason: str, detail: str = "") -> None:
        where = f"{path}:{line}"
        if self.strict:
            raise BadInputError(
                f"{where}: {reason}{': ' + detail if detail else ''}. Fix or remove this record, "
                "or rebuild without --strict to count and skip bad records."
            )
        logger.warning(f"{where}: dropped ({reason}) {detail}")
        self.stat_update("read", f"dropped/{reason}")
        rec = {"file": path, "line": line, "reason": reason, "detail": detail[:500]}
        self._rejects.write(json.dumps(rec) + "\n")

    # -- record -> Document ----------------------------------------------------------------
    def _make_doc(self, rec, path: str, line: int) -> Document | None:
        if not isinstance(rec, dict):
            return self._reject(path, line, "malformed_json", "record is not a JSON object")
        if "text" not in rec or rec["text"] is None:
            return self._reject(path, line, "missing_text", "no 'text' field")
        text = rec["text"]
        if not isinstance(text, str):
            return self._reject(path, line, "non_string_text", f"text is {type(text).__name__}")
        if not text.strip():
            return self._reject(path, line, "empty_text")
        if len(text) > self.max_chars:
            return self._reject(
                path, line, "too_long", f"{len(text)} chars > records.max_chars={self.max_chars}"
            )
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        source = meta.get("redpajama_set_name") or rec.get("source") or self.default_source
        if source in self.exclude_sources:
            return self._reject(path, line, "excluded_source", str(source))
        raw_date = meta.get("date") or rec.get("date")
        if raw_date is None and not rec.get("dump") and rec.get("id") is not None:
            raw_date = self.date_map.get(str(rec["id"]))
        try:
            date = parse_date(raw_date, rec.get("dump"))
        except ValueError as e:
            return self._reject(path, line, "invalid_date", str(e))
        if date is None and self.drop_undated:
            return self._reject(path, line, "undated", "split.undated=drop")
        self.stat_update("read", "kept", f"source/{source}")
        doc_id = str(rec.get("id") or f"{os.path.basename(path)}:{line}")
        metadata = {"source": str(source), "date": date.isoformat() if date else None}
        metadata["origin"] = f"{path}:{line}"
        return Document(text=text, id=doc_id, metadata=metadata)

    def _read_jsonl(self, path: str) -> Iterator[Document]:
        line = 0
        try:
            for line, raw in enumerate(open_lines(path), start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._reject(path, line, "invalid_utf8", str(e))
                    continue
                if not raw.strip():
                    continue
                try:
                    rec = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    self._reject(path, line, "malformed_json", str(e))
                    continue
                doc = self._make_doc(rec, path, line)
                if doc is not None:
                    yield doc
        except (zstandard.ZstdError, EOFError, OSError, gzip.BadGzipFile) as e:
            self._reject(path, line + 1, "corrupt_file", f"{type(e).__name__}: {e}")

    def _read_parquet(self, path: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    row += 1
                    doc = self._make_doc(rec, path, row)
                    if doc is not None:
                        yield doc
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
            self._reject(path, row + 1, "corrupt_file", f"{type(e).__name__}: {e}")

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.makedirs(self.rejects_folder, exist_ok=True)
        rejects_path = os.path.join(self.rejects_folder, f"{rank:05d}.jsonl")
        with open(rejects_path, "w") as self._rejects:
            for path in self.files[rank::world_size]:
                reader = self._read_parquet if path.endswith(".parquet") else self._read_jsonl
                with self.track_time():
                    yield from reader(path)
                self.stat_update("files")
