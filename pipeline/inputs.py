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
- **Bad data told apart from failures.** Every read goes through :class:`InputFile`, which turns
  any storage error into :class:`InputReadError` (the task fails and a rerun retries it);
  only errors of the decoders (a bad zstd/gzip frame, a truncated stream, an unreadable
  parquet page) are corruption, which the reader counts as ``corrupt_file``.
"""

from __future__ import annotations

import math
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

    def __str__(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.file.url
        what = "row groups" if self.file.codec == "parquet" else "bytes"
        return f"{self.file.url} [{what} {self.start}-{'' if self.stop is None else self.stop}]"


def _file_of(fs, path: str, info: dict) -> InputFile:
    url = fs._strip_protocol(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")
    return InputFile(url, int(info.get("size") or 0), version)


def _listing(pattern: str) -> list[InputFile]:
    fs, path = url_to_fs(pattern)
    if has_magic(path):
        found = fs.glob(path, detail=True)
        files = [_file_of(fs, p, i) for p, i in found.items() if i.get("type") != "directory"]
        if not files:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        return files
    if fs.isdir(path):
        folder = get_datafolder(pattern)
        found = folder.find("", detail=True)
        return [_file_of(fs, folder._join(p), i) for p, i in found.items()
                if i.get("type") != "directory"]  # fmt: skip
    if fs.isfile(path):
        return [_file_of(fs, path, fs.info(path))]
    raise FileNotFoundError(f"input {pattern!r} matches no file")


def discover_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand directories/globs/files (local or fsspec URLs) into sorted, unique input files."""
    files: dict[str, InputFile] = {}
    for pattern in patterns:
        for f in _listing(pattern):
            if f.url.endswith(EXTENSIONS):
                files[f.url] = f
    if not files:
        raise FileNotFoundError(
            f"no input files with extensions {', '.join(EXTENSIONS)} under {patterns}"
        )
    return [files[u] for u in sorted(files)]


# -- partition -------------------------------------------------------------------------------
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


def _units_of(f: InputFile, task_bytes: int, groups: list[int] | None) -> list[WorkUnit]:
    if f.codec == "plain" and f.size > task_bytes:
        n = math.ceil(f.size / task_bytes)
        bounds = [f.size * i // n for i in range(n + 1)]
        return [WorkUnit(f, a, None if i == n - 1 else b, b - a)
                for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]  # fmt: skip
    if groups is None or len(groups) < 2:
        return [WorkUnit(f, 0, None, f.size)]
    units, first, acc = [], 0, 0
    for g, size in enumerate(groups):
        if g > first and acc + size > task_bytes:
            units.append(WorkUnit(f, first, g, acc))
            first, acc = g, 0
        acc += size
    units.append(WorkUnit(f, first, None, acc))
    return units


def plan_tasks(files: list[InputFile], task_bytes: int, threads: int = 16) -> list[list[WorkUnit]]:
    """Work units of all inputs grouped, in order, into tasks of about ``task_bytes``.

    A unit larger than ``task_bytes`` (a big ``.zst``, one huge row group) is a task of its own.
    Only parquet files larger than ``task_bytes`` have their footers read here (in threads).
    """
    big_parquet = [f for f in files if f.codec == "parquet" and f.size > task_bytes]
    with ThreadPoolExecutor(max(1, min(threads, len(big_parquet)))) as pool:
        groups = dict(zip(big_parquet, pool.map(_row_group_bytes, big_parquet)))
    tasks: list[list[WorkUnit]] = []
    current, acc = [], 0
    for f in files:
        for unit in _units_of(f, task_bytes, groups.get(f)):
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


def _plain_blocks(fh, start: int) -> Iterator[tuple[bytes, int, int]]:
    if start:
        fh.seek(start)
    pos = start
    while chunk := fh.read(READ_BYTES):
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
    # a range starting mid-file begins after the first newline at or after start - 1
    begin = max(unit.start - 1, 0)
    lines = split_lines(_plain_blocks(fh, begin), base=begin)
    if unit.start > 0:
        next(lines, None)
    for line, offset, pos in lines:
        if unit.stop is not None and offset >= unit.stop:
            return
        yield line, offset, pos


def count_newlines(url: str, end: int) -> int:
    """Newlines in the first ``end`` bytes of a plain file (line numbers of a range unit)."""
    n = 0
    with open_input(url) as fh:
        left = end
        while left > 0 and (chunk := fh.read(min(READ_BYTES, left))):
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def open_lines(path: str) -> Iterator[bytes]:
    """Raw lines of a whole (possibly compressed) JSONL file; damaged files raise part-way."""
    unit = WorkUnit(InputFile(path, 0, ""))
    with open_input(path) as fh:
        for line, _, _ in unit_lines(fh, unit):
            yield line
