"""Where raw input lives, how it is cut into tasks, and how its bytes are read.

Three things a web-scale ingest needs that a per-file reader does not give:

- **Any storage.** Inputs are fsspec URLs (local paths, ``s3://``, ``file://``, ...), listed
  through datatrove's ``DataFolder``; a file's fingerprint (size + mtime/etag) comes from the
  filesystem's ``info()``, so a rewritten input invalidates what was built from it anywhere.
- **Parallelism set by the data.** Inputs are divided into work units (byte ranges of plain
  JSONL cut at line boundaries, runs of parquet row groups, whole compressed files, which
  cannot be split) and the units are grouped in order into tasks of about
  ``records.task_bytes``. The partition depends only on the inputs and that setting, never on
  the executor, so changing workers never rebuilds anything.
- **Every byte read about once.** A range of a plain file must number its lines (records are
  named ``file:line``); counting from byte 0 in each range would read a file of n ranges n/2
  times in every stage that reads. Planning counts the newlines once, each unit carries the
  count of lines before it, and a range reads only its own bytes plus the end of its last line.
  What planning read (newline counts, parquet footers) is kept in ``OUTPUT/.work`` per input
  url, size and version, so a resume or a Slurm resubmit lists the inputs (the only way to see
  added or rewritten files; one request per ~1000 objects on S3) but reads none of them.
- **Inputs, not outputs.** Files under the build's own output folder (its ``.work/`` holds
  JSONL) are never inputs, and every input pattern must match an input file.
- **Bad data told apart from failures.** Every read goes through :class:`InputFile`, which turns
  any storage error into :class:`InputReadError` (the task fails and a rerun retries it);
  only errors of the decoders (a bad zstd/gzip frame, a truncated stream, an unreadable
  parquet page) are corruption, which the reader counts as ``corrupt_file``.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from glob import has_magic

import zstandard
from datatrove.io import get_datafolder
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

EXTENSIONS = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".json.zst", ".parquet")
READ_BYTES = 1 << 20
# compressed bytes fed to a decoder at a time: how precisely a lost region can be reported
FEED_BYTES = 1 << 16
# first read past the end of a plain range (finishing its last line); doubles up to READ_BYTES
TAIL_BYTES = 1 << 10
# fsspec info() keys that change when a file is rewritten (local, s3, gcs, azure, memory)
_VERSION_KEYS = ("mtime", "LastModified", "last_modified", "ETag", "etag", "generation",
                 "md5", "created", "updated")  # fmt: skip


class InputReadError(OSError):
    """Reading an input failed (I/O error, vanished file, ...): not bad data, so the task fails
    and rerunning the build retries it."""


class TruncatedStream(ValueError):
    """A compressed stream ended inside a frame/member."""


# errors of the decoders themselves: the bytes are damaged, rereading will not help
STREAM_CORRUPTION = (zstandard.ZstdError, zlib.error, TruncatedStream)


@dataclass(frozen=True)
class InputFile:
    url: str
    """A local path or an fsspec URL."""
    size: int
    version: str
    """Modification time or etag: changes when the file is rewritten in place."""

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def codec(self) -> str:
        """``parquet``, ``zstd``, ``gzip`` or ``plain`` (uncompressed JSONL)."""
        if self.url.endswith(".parquet"):
            return "parquet"
        if self.url.endswith((".zst", ".zstd")):
            return "zstd"
        return "gzip" if self.url.endswith(".gz") else "plain"


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one input file read by one task."""

    file: InputFile
    start: int = 0
    """First byte (plain JSONL: lines that *start* in [start, stop)) or first row group."""
    stop: int | None = None
    """End byte / row group (exclusive); None: to the end of the file."""
    weight: int = 0
    """Bytes on storage this unit covers (for grouping units into tasks)."""
    lines_before: int = 0
    """Plain JSONL: lines of the file before this unit's first line, counted once at planning
    so that a unit never rereads the file's head to number its lines."""

    def __str__(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.file.url
        what = "row groups" if self.file.codec == "parquet" else "bytes"
        return f"{self.file.url} [{what} {self.start}-{'' if self.stop is None else self.stop}]"


def _file_of(fs, path: str, info: dict) -> InputFile:
    url = fs._strip_protocol(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")
    return InputFile(url, int(info.get("size") or 0), version)


class NoInputError(FileNotFoundError):
    """An input pattern matches no input file: a usage error, not a failure of the build."""


def _listing(pattern: str) -> list[InputFile]:
    fs, path = url_to_fs(pattern)
    if has_magic(path):
        found = fs.glob(path, detail=True)
        return [_file_of(fs, p, i) for p, i in found.items() if i.get("type") != "directory"]
    if fs.isdir(path):
        folder = get_datafolder(pattern)
        found = folder.find("", detail=True)
        return [_file_of(fs, folder._join(p), i) for p, i in found.items()
                if i.get("type") != "directory"]  # fmt: skip
    if fs.isfile(path):
        return [_file_of(fs, path, fs.info(path))]
    return []


def _under(url: str, folder: str | None) -> bool:
    """Whether ``url`` is a local file inside ``folder`` (a build's own output)."""
    if not folder or "://" in url:
        return False
    return os.path.commonpath([os.path.abspath(url), folder]) == folder


def discover_inputs(patterns: list[str], exclude: str | None = None) -> list[InputFile]:
    """Expand directories/globs/files (local or fsspec URLs) into sorted, unique input files.

    Files under ``exclude`` (the build's output folder, whose ``.work/`` holds JSONL of its
    own) are never inputs. Every pattern must match at least one input file: a mistyped one
    among several would otherwise silently leave its data out (:class:`NoInputError`).
    """
    folder = os.path.abspath(exclude) if exclude and "://" not in exclude else None
    files: dict[str, InputFile] = {}
    for pattern in patterns:
        found = _listing(pattern)
        usable = [f for f in found if f.url.endswith(EXTENSIONS) and not _under(f.url, folder)]
        if not usable:
            what = "no file" if not found else f"no file with extension {', '.join(EXTENSIONS)}"
            if found and all(_under(f.url, folder) for f in found):
                what = f"only files under the output folder {exclude} (never read as input)"
            raise NoInputError(f"input {pattern!r} matches {what}; check --input / input")
        files.update((f.url, f) for f in usable)
    return [files[u] for u in sorted(files)]


# -- partition -------------------------------------------------------------------------------
PLAN_CACHE = "input-plan.json"
"""File under ``OUTPUT/.work`` that keeps what planning had to read (see :func:`plan_tasks`)."""
_PLAN_FORMAT = 1


def _row_group_bytes(f: InputFile) -> list[int] | None:
    """Compressed bytes of each row group, or None when the footer is unreadable (the reader
    then reports the file as corrupt)."""
    import pyarrow.parquet as pq

    with open_input(f.url) as fh:
        try:
            md = pq.ParquetFile(fh).metadata
        except InputReadError:
            raise
        except Exception:
            return None
        return [
            sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
            for g in range(md.num_row_groups)
        ]


def _bounds(f: InputFile, task_bytes: int) -> list[int]:
    """Byte bounds of the ranges a plain file larger than ``task_bytes`` is cut into."""
    n = math.ceil(f.size / task_bytes)
    return [f.size * i // n for i in range(n + 1)]


def _lines_before(f: InputFile, bounds: list[int]) -> list[int]:
    """Lines before the first line of each range, in one sequential read of the file.

    A range starting at ``b > 0`` begins after the first newline at or after ``b - 1``
    (see :func:`unit_lines`), so the lines before it are one per newline in ``[0, b - 1)``
    plus the line that newline ends.
    """
    out, newlines, pos = [0], 0, 0
    with open_input(f.url) as fh:
        for b in bounds[1:-1]:
            while pos < b - 1 and (chunk := fh.read(min(READ_BYTES, b - 1 - pos))):
                newlines += chunk.count(b"\n")
                pos += len(chunk)
            out.append(newlines + 1)
    return out


def _needs_read(f: InputFile, task_bytes: int) -> bool:
    """Whether cutting ``f`` into units needs its bytes (a parquet footer, newline counts)."""
    return f.size > task_bytes and f.codec in ("plain", "parquet")


def _fact_key(f: InputFile, task_bytes: int) -> str:
    # row groups do not depend on task_bytes; the ranges of a plain file do
    return "row_groups" if f.codec == "parquet" else f"lines_before@{task_bytes}"


def _read_fact(f: InputFile, task_bytes: int) -> list[int] | None:
    if f.codec == "parquet":
        return _row_group_bytes(f)
    return _lines_before(f, _bounds(f, task_bytes))


def _units_of(f: InputFile, task_bytes: int, fact: list[int] | None) -> list[WorkUnit]:
    if f.codec == "plain" and f.size > task_bytes:
        bounds = _bounds(f, task_bytes)
        n = len(bounds) - 1
        return [WorkUnit(f, a, None if i == n - 1 else b, b - a, fact[i])
                for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]  # fmt: skip
    if f.codec != "parquet" or fact is None or len(fact) < 2:
        return [WorkUnit(f, 0, None, f.size)]
    units, first, acc = [], 0, 0
    for g, size in enumerate(fact):
        if g > first and acc + size > task_bytes:
            units.append(WorkUnit(f, first, g, acc))
            first, acc = g, 0
        acc += size
    units.append(WorkUnit(f, first, None, acc))
    return units


class _PlanCache:
    """What planning read from each input, keyed by url, size and version (and task_bytes for
    the newline counts), in one JSON file; a missing or unreadable file is an empty cache."""

    def __init__(self, path: str | None):
        self.path, self.entries, self.dirty = path, {}, False
        if path and os.path.isfile(path):
            try:
                with open(path) as fh:
                    data = json.load(fh)
                if data.get("format") == _PLAN_FORMAT and isinstance(data.get("files"), dict):
                    self.entries = data["files"]
            except (OSError, ValueError, AttributeError):
                pass  # rebuilt from the inputs

    def _entry(self, f: InputFile) -> dict | None:
        entry = self.entries.get(f.url)
        if not isinstance(entry, dict) or not isinstance(entry.get("facts"), dict):
            return None
        return entry if (entry.get("size"), entry.get("version")) == (f.size, f.version) else None

    def get(self, f: InputFile, task_bytes: int) -> tuple[bool, list[int] | None]:
        fact = (self._entry(f) or {}).get("facts", {}).get(_fact_key(f, task_bytes), False)
        if f.codec == "plain":  # one count per range
            ok = isinstance(fact, list) and len(fact) == len(_bounds(f, task_bytes)) - 1
        else:  # bytes per row group, or None: an unreadable footer
            ok = fact is None or isinstance(fact, list)
        return (True, fact) if ok else (False, None)

    def put(self, f: InputFile, task_bytes: int, fact: list[int] | None) -> None:
        entry = self._entry(f)
        if entry is None:
            entry = self.entries[f.url] = {"size": f.size, "version": f.version, "facts": {}}
        entry["facts"][_fact_key(f, task_bytes)] = fact
        self.dirty = True

    def save(self) -> None:
        if not self.path or not self.dirty:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"format": _PLAN_FORMAT, "files": self.entries}, fh, sort_keys=True)
        os.replace(tmp, self.path)  # concurrent planners never see half a file


def plan_tasks(files: list[InputFile], task_bytes: int, threads: int = 16,
               cache: str | None = None) -> list[list[WorkUnit]]:  # fmt: skip
    """Work units of all inputs grouped, in order, into tasks of about ``task_bytes``.

    A unit larger than ``task_bytes`` (a big ``.zst``, one huge row group) is a task of its own.
    Only files larger than ``task_bytes`` are read here (in threads): parquet footers, and the
    newlines of plain JSONL, counted once so that each range knows its first line's number
    (each range counting from byte 0 would read a file of n ranges n/2 times per stage).
    ``cache``: a JSON file keeping what was read, per input url, size and version, so that a
    resume or a Slurm resubmit reads nothing again, and a rewritten input is read anew.
    """
    store = _PlanCache(cache)
    facts, missing = {}, []
    for f in files:
        if _needs_read(f, task_bytes):
            hit, facts[f] = store.get(f, task_bytes)
            if not hit:
                missing.append(f)
    with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
        for f, fact in zip(missing, pool.map(lambda f: _read_fact(f, task_bytes), missing)):
            facts[f] = fact
            store.put(f, task_bytes, fact)
    store.save()
    tasks: list[list[WorkUnit]] = []
    current, acc = [], 0
    for f in files:
        for unit in _units_of(f, task_bytes, facts.get(f)):
            if current and acc + unit.weight > task_bytes:
                tasks.append(current)
                current, acc = [], 0
            current.append(unit)
            acc += unit.weight
    if current:
        tasks.append(current)
    return tasks


# -- reading ---------------------------------------------------------------------------------
class _Guarded:
    """A binary file whose every storage error becomes :class:`InputReadError` naming the file.

    pyarrow re-raises a Python file object's own exception, so this also separates I/O
    failures from parquet corruption.
    """

    def __init__(self, url: str):
        self.url = url
        try:
            fs, path = url_to_fs(url)
            self._fh = fs.open(path, "rb")
        except Exception as e:
            raise self._error(e) from e

    def _error(self, e: Exception) -> InputReadError:
        return InputReadError(
            f"{self.url}: reading failed ({type(e).__name__}: {e}). This is not bad data; the "
            "task failed and rerunning the build retries it."
        )

    def _call(self, name: str, *args):
        try:
            return getattr(self._fh, name)(*args)
        except MemoryError:
            raise
        except Exception as e:
            raise self._error(e) from e

    def read(self, n: int = -1) -> bytes:
        return self._call("read", n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call("seek", offset, whence)

    def tell(self) -> int:
        return self._call("tell")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_input(url: str) -> _Guarded:
    """Open an input for binary reading; storage errors raise :class:`InputReadError`."""
    return _Guarded(url)


def _feed(fh, decode) -> Iterator[tuple[bytes, int, int]]:
    """(decoded bytes, source position before and after the piece that gave them), feeding
    ``decode`` small pieces."""
    pos = 0
    while chunk := fh.read(READ_BYTES):
        for i in range(0, len(chunk), FEED_BYTES):
            piece = chunk[i : i + FEED_BYTES]
            for out in decode(piece):
                yield out, pos + i, pos + i + len(piece)
        pos += len(chunk)


def _frame_blocks(fh, new_decoder, what: str, skip_padding: bool = False):
    """Decoded blocks of a stream of concatenated frames (zstd frames, gzip members), each
    decoded by a fresh ``new_decoder()``; damage raises, and so does a truncated last frame.
    ``skip_padding``: zero bytes between frames are ignored (as gzip tolerates)."""
    state = {"obj": new_decoder(), "open": False}

    def decode(piece: bytes) -> Iterator[bytes]:
        while piece:
            obj = state["obj"]
            if skip_padding and not state["open"] and not piece.strip(b"\x00"):
                return
            out = obj.decompress(piece)
            if out:
                yield out
            state["open"] = not obj.eof
            piece = obj.unused_data if obj.eof else b""
            if obj.eof:
                state["obj"] = new_decoder()

    yield from _feed(fh, decode)
    if state["open"]:
        raise TruncatedStream(f"truncated {what} stream: the last frame is incomplete")


def _zstd_blocks(fh) -> Iterator[tuple[bytes, int, int]]:
    """Decoded blocks of a (multi-frame) zstd stream; damage or truncation raises."""
    return _frame_blocks(fh, zstandard.ZstdDecompressor().decompressobj, "zstd")


def _gzip_blocks(fh) -> Iterator[tuple[bytes, int, int]]:
    """Decoded blocks of a (multi-member) gzip stream; damage or truncation raises."""
    return _frame_blocks(fh, lambda: zlib.decompressobj(wbits=31), "gzip", skip_padding=True)


def _plain_blocks(fh, start: int, stop: int | None) -> Iterator[tuple[bytes, int, int]]:
    """Blocks of a plain file from ``start``: up to ``stop`` in pieces of at most READ_BYTES,
    then in pieces growing from TAIL_BYTES (enough to finish the line that crosses ``stop``),
    so that a range reads about its own bytes, not READ_BYTES past its end."""
    if start:
        fh.seek(start)
    pos, tail = start, TAIL_BYTES
    while True:
        if stop is None or pos < stop:
            n = READ_BYTES if stop is None else min(READ_BYTES, stop - pos)
        else:
            n, tail = tail, min(2 * tail, READ_BYTES)
        if not (chunk := fh.read(n)):
            return
        yield chunk, pos, pos + len(chunk)
        pos += len(chunk)


def split_lines(blocks, base: int = 0) -> Iterator[tuple[bytes, int, int]]:
    """(line without its newline, offset of its first byte, source position of its end).

    For compressed input the source position is interpolated within the piece of compressed
    bytes that produced the line's end: exact for plain files, to within a decoder block else.
    """
    pending: list[bytes] = []
    offset, end_pos = base, 0
    for block, p0, p1 in blocks:
        if b"\n" not in block:
            pending.append(block)
            continue
        head = sum(map(len, pending))
        data = b"".join([*pending, block]) if pending else block
        lines = data.split(b"\n")
        tail = lines.pop()
        end = 0
        for line in lines:
            end += len(line) + 1
            end_pos = p0 + (p1 - p0) * (end - head) // len(block) if end > head else p0
            yield line, offset, end_pos
            offset += len(line) + 1
        pending = [tail] if tail else []
    if pending:
        yield b"".join(pending), offset, end_pos


def unit_lines(fh, unit: WorkUnit) -> Iterator[tuple[bytes, int, int]]:
    """Lines of a JSONL unit: of a whole (compressed) file, or those that start in a range."""
    codec = unit.file.codec
    if codec == "zstd":
        yield from split_lines(_zstd_blocks(fh))
        return
    if codec == "gzip":
        yield from split_lines(_gzip_blocks(fh))
        return
    # a range starting mid-file begins after the first newline at or after start - 1 and ends
    # with the line holding byte stop - 1 (the next range skips through that line's newline)
    begin, stop = max(unit.start - 1, 0), unit.stop
    lines = split_lines(_plain_blocks(fh, begin, stop), base=begin)
    if unit.start > 0:
        next(lines, None)
    for line, offset, pos in lines:
        if stop is not None and offset >= stop:
            return
        yield line, offset, pos
        if stop is not None and offset + len(line) >= stop - 1:
            return


def open_lines(path: str) -> Iterator[bytes]:
    """Raw lines of a whole (possibly compressed) JSONL file; damaged files raise part-way."""
    unit = WorkUnit(InputFile(path, 0, ""))
    with open_input(path) as fh:
        for line, _, _ in unit_lines(fh, unit):
            yield line
