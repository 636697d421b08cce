"""The raw reader run directly, as datatrove runs it: ``reader.run(None, rank, world_size)``."""

import datetime as dt
import errno
import gzip
import io
import json
import os
import random

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datatrove.utils.logging import logger
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.default_dump import write_default_dump
from pipeline.inputs import InputReadError, discover_inputs, plan_tasks
from pipeline.readers import BadInputError, RawDumpReader, load_date_map, read_corrupt_files
from pipeline.records import parse_date, resolve_date, split_text


def _reader(tmp_path, inputs, task_bytes=1 << 30, **kw) -> RawDumpReader:
    tasks = plan_tasks(discover_inputs([str(i) for i in inputs]), task_bytes)
    return RawDumpReader(tasks, str(tmp_path / "rej"), corrupt_folder=str(tmp_path / "bad"), **kw)


def _run(reader: RawDumpReader) -> list:
    """Every task of the reader in rank order, as an executor with one worker would."""
    n = len(reader.tasks)
    return [doc for rank in range(n) for doc in reader.run(None, rank=rank, world_size=n)]


def _rejects(tmp_path) -> list[dict]:
    return [json.loads(x) for f in sorted((tmp_path / "rej").glob("*.jsonl"))
            for x in f.read_text().splitlines()]  # fmt: skip


def _read(tmp_path, lines, **kw):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = _reader(tmp_path, [path], **kw)
    return _run(reader), reader


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["amber", "birch", "cedar", "dune", "elm"]) + str(rng.randint(0, 9999))
                    for _ in range(n))  # fmt: skip


# -- dates -------------------------------------------------------------------------------------
def test_parse_date_is_strict():
    assert parse_date("2024-03-05") == dt.date(2024, 3, 5)
    assert parse_date("2024-03-05T10:00:00Z") == dt.date(2024, 3, 5)
    assert parse_date("2019-12-31T23:30:00-05:00") == dt.date(2020, 1, 1)  # UTC day
    assert parse_date(dt.datetime(2021, 2, 3, 4, 5)) == dt.date(2021, 2, 3)  # parquet timestamp
    assert parse_date(None) is None and parse_date("") is None
    for bad in ["2019-05-18 garbage", "1999", "2019-05", "yesterday", "2019-02-30"]:
        with pytest.raises(ValueError, match="unreadable date"):
            parse_date(bad)
    for placeholder in ["0001-01-01", "9999-12-31"]:
        with pytest.raises(ValueError, match="outside"):
            parse_date(placeholder)


def test_dump_ids_and_fallback():
    assert parse_date(None, "CC-MAIN-2024-10") == dt.date.fromisocalendar(2024, 10, 1)
    assert parse_date(None, "CC-MAIN-2020-53") == dt.date(2020, 12, 28)  # 2020 has week 53
    with pytest.raises(ValueError, match="2019 has no ISO week 53"):
        parse_date(None, "CC-MAIN-2019-53")
    with pytest.raises(ValueError, match="unreadable dump id"):
        parse_date(None, "CC-MAIN-late")
    # an unusable date falls back to a valid dump id; both unusable: both reasons
    assert resolve_date("2019-05-18 garbage", "CC-MAIN-2024-10") == (dt.date(2024, 3, 4), "dump")
    with pytest.raises(ValueError, match="unreadable date .*; unreadable dump id"):
        resolve_date("garbage", "CC-MAIN-x")


def test_reader_dates_counted(tmp_path):
    lines = [
        {"text": "a", "date": "2019-05-18 garbage"},
        {"text": "b", "date": "0001-01-01", "dump": "CC-MAIN-2024-10"},
        {"text": "c", "date": None, "dump": "CC-MAIN-2020-53"},
        {"text": "d", "date": "1999"},
    ]
    docs, reader = _read(tmp_path, [json.dumps(x).encode() for x in lines])
    assert [(d.text, d.metadata["date"]) for d in docs] == [
        ("b", "2024-03-04"),
        ("c", "2020-12-28"),
    ]
    assert reader.stats["dropped/invalid_date"].total == 2
    assert reader.stats["date_from_dump"].total == 2
    assert reader.stats["date_invalid_used_dump"].total == 1


# -- inputs ------------------------------------------------------------------------------------
def test_discover_inputs_local_and_urls(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("{}\n")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    want = str(tmp_path / "a" / "x.jsonl")
    assert [f.url for f in discover_inputs([str(tmp_path)])] == [want]
    assert [f.url for f in discover_inputs([f"file://{tmp_path}"])] == [want]
    assert [f.url for f in discover_inputs([f"{tmp_path}/*/*.jsonl"])] == [want]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        discover_inputs([str(tmp_path / "nope*.jsonl")])
    fs = fsspec.filesystem("memory")
    fs.pipe("/urls/d/a.jsonl", b'{"text": "x"}\n')
    (f,) = discover_inputs(["memory://urls/d"])
    assert (f.url, f.size) == ("memory:///urls/d/a.jsonl", 14) and f.version
    before = f.version
    fs.pipe("/urls/d/a.jsonl", b'{"text": "x"}\n')  # rewritten in place: a new version
    assert discover_inputs(["memory://urls/d"])[0].version != before


def test_reads_fsspec_urls_and_only_needed_parquet_columns(tmp_path):
    """The unused ``url`` column is damaged: it must not even be read."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/cols/a.jsonl", b'{"text": "from memory", "date": "2020-01-02"}\n')
    n = 40
    table = pa.table({"text": [f"row {i}" for i in range(n)], "id": [str(i) for i in range(n)],
                      "url": [f"https://example.com/{i}/" + "u" * 300 for i in range(n)]})  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    data = bytearray(buf.getvalue())
    url_col = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(2)
    start = url_col.data_page_offset + 2  # inside the page header
    data[start : start + 20] = b"\xff" * 20
    fs.pipe("/cols/b.parquet", bytes(data))
    with pytest.raises(OSError):  # reading every column fails
        pq.read_table(io.BytesIO(bytes(data)))
    reader = _reader(tmp_path, ["memory://cols"])
    docs = _run(reader)
    assert [d.text for d in docs] == ["from memory"] + [f"row {i}" for i in range(n)]
    assert docs[0].metadata["origin"] == "memory:///cols/a.jsonl:1"
    assert read_corrupt_files(str(tmp_path / "bad")) == []


def test_plain_jsonl_is_split_into_byte_ranges_with_exact_lines(tmp_path):
    rng = random.Random(1)
    lines = [json.dumps({"text": f"doc{i} " + _words(rng, rng.randint(1, 40))}) for i in range(300)]
    lines[250] = "{broken"
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reader = _reader(tmp_path, [path], task_bytes=3000)
    assert len(reader.tasks) == -(-path.stat().st_size // 3000)
    docs = _run(reader)
    want = [i for i in range(300) if i != 250]
    assert [d.text.split()[0] for d in docs] == [f"doc{i}" for i in want]  # each line once
    assert [d.metadata["origin"] for d in docs] == [f"{path}:{i + 1}" for i in want]
    assert [(r["line"], r["reason"]) for r in _rejects(tmp_path)] == [(251, "malformed_json")]
    strict = _reader(tmp_path, [path], task_bytes=3000, strict=True)
    with pytest.raises(BadInputError, match=r"big\.jsonl:251: malformed_json"):
        _run(strict)


def test_partition_depends_on_data_and_task_bytes_only(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.jsonl.zst").write_bytes(zstandard.compress(b'{"text": "x"}\n' * 200))
    files = discover_inputs([str(tmp_path)])
    size = files[0].size
    assert len(plan_tasks(files, 1 << 30)) == 1  # small files share a task
    assert len(plan_tasks(files, 2 * size)) == 3  # 2 + 2 + 1 files
    assert len(plan_tasks(files, 1)) == 5  # a compressed file is never split


# -- metadata ----------------------------------------------------------------------------------
def test_malformed_metadata_is_counted_per_record_jsonl(tmp_path):
    bad = [
        ({"text": "a", "meta": {"redpajama_set_name": ["x"]}}, "meta.redpajama_set_name"),
        ({"text": "b", "date": {"y": 2001}}, "date"),
        ({"text": "c", "id": [1, 2]}, "id"),
        ({"text": "d", "source": {"name": "web"}}, "source"),
        ({"text": "e", "dump": ["CC-MAIN-2024-10"]}, "dump"),
        ({"text": "f", "meta": ["not", "an", "object"]}, "meta"),
    ]
    lines = [json.dumps({"text": "first"})] + [json.dumps(r) for r, _ in bad]
    lines.append(json.dumps({"text": "last", "id": 7}))
    docs, reader = _read(tmp_path, [x.encode() for x in lines])
    assert [(d.text, d.id) for d in docs] == [("first", "in.jsonl:1"), ("last", "7")]
    assert reader.stats["dropped/invalid_metadata"].total == len(bad)
    rejects = _rejects(tmp_path)
    assert [r["line"] for r in rejects] == list(range(2, 2 + len(bad)))
    for rec, (_, name) in zip(rejects, bad):
        assert rec["reason"] == "invalid_metadata" and f"'{name}'" in rec["detail"]


def test_malformed_metadata_is_counted_per_record_parquet(tmp_path):
    rows = [{"text": f"t{i}", "source": ["a", "b"] if i % 3 == 1 else None} for i in range(9)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("text", pa.string()),
                                                         ("source", pa.list_(pa.string()))]))  # fmt: skip
    pq.write_table(table, tmp_path / "m.parquet")
    reader = _reader(tmp_path, [tmp_path / "m.parquet"])
    docs = _run(reader)
    assert [d.text for d in docs] == [f"t{i}" for i in range(9) if i % 3 != 1]
    assert reader.stats["dropped/invalid_metadata"].total == 3
    assert "dropped/corrupt_file" not in reader.stats.stats
    assert [r["line"] for r in _rejects(tmp_path)] == [2, 5, 8]


# -- damage vs failure -------------------------------------------------------------------------
class FlakyFS(MemoryFileSystem):
    """In-memory files whose reads fail with an OS error after ``fail_after`` bytes."""

    protocol = ("flaky",)
    fail_after, code = 0, errno.EIO

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        return _Failing(super()._open(path, mode, **kwargs), self.fail_after, self.code)


class _Failing(io.RawIOBase):
    def __init__(self, inner, fail_after: int, code: int):
        self.inner, self.fail_after, self.code = inner, fail_after, code

    def read(self, n=-1):
        if self.inner.tell() + (n if n >= 0 else 1 << 40) > self.fail_after:
            raise OSError(self.code, os.strerror(self.code))
        return self.inner.read(n)

    def seek(self, *args):
        return self.inner.seek(*args)

    def tell(self):
        return self.inner.tell()

    def readable(self):
        return True


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


@pytest.mark.parametrize("name", ["a.jsonl.zst", "a.parquet"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
def test_io_errors_fail_the_task(tmp_path, monkeypatch, name, code):
    if name.endswith(".zst"):
        data = zstandard.compress(b'{"text": "x"}\n' * 100_000)
    else:
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": ["x"] * 100}), buf)
        data = buf.getvalue()
    FlakyFS().pipe(f"/flaky/{code}/{name}", data)
    monkeypatch.setattr(FlakyFS, "code", code)
    monkeypatch.setattr(FlakyFS, "fail_after", len(data) // 2)
    reader = _reader(tmp_path, [f"flaky://flaky/{code}/{name}"])
    with pytest.raises(InputReadError, match=rf"flaky:///flaky/{code}/{name}: reading failed"):
        _run(reader)
    assert "dropped/corrupt_file" not in reader.stats.stats  # not counted as bad data


def test_memory_error_and_bugs_are_not_bad_data(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    reader = _reader(tmp_path, [tmp_path / "a.jsonl"])
    reader.max_chars = None  # a bug: comparing with None raises TypeError
    with pytest.raises(TypeError) as info:
        _run(reader)
    assert any("a.jsonl" in note for note in info.value.__notes__)


def test_truncated_zstd_keeps_earlier_documents_and_reports_lost_bytes(tmp_path):
    rng = random.Random(2)
    lines = [json.dumps({"text": f"doc{i} " + _words(rng, 60)}).encode() for i in range(3000)]
    data = zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) * 6 // 10])
    reader = _reader(tmp_path, [path])
    docs = _run(reader)
    kept = len(docs)
    assert 1000 < kept < 3000
    assert [d.text.split()[0] for d in docs] == [f"doc{i}" for i in range(kept)]
    (bad,) = read_corrupt_files(str(tmp_path / "bad"))
    assert bad["file"] == str(path) and bad["reason"] == "truncated_stream"
    assert bad["line"] == kept + 1
    # what is lost: the compressed bytes after the last record recovered (to a decoder block)
    assert (
        0 < bad["lost_bytes"] < 2**17 and bad["offset"] + bad["lost_bytes"] == len(data) * 6 // 10
    )
    assert reader.stats["dropped/corrupt_file"].total == 1
    with pytest.raises(BadInputError, match=rf"cut\.jsonl\.zst:{kept + 1}: corrupt_file"):
        _run(_reader(tmp_path, [path], strict=True))


def test_bad_gzip_keeps_earlier_documents(tmp_path):
    rng = random.Random(4)
    lines = "".join(json.dumps({"text": f"doc{i} " + _words(rng, 20)}) + "\n" for i in range(20000))
    data = bytearray(gzip.compress(lines.encode()))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    (tmp_path / "g.jsonl.gz").write_bytes(bytes(data))
    reader = _reader(tmp_path, [tmp_path / "g.jsonl.gz"])
    docs = _run(reader)
    assert 0 < len(docs) < 20000 and docs[-1].text.split()[0] == f"doc{len(docs) - 1}"
    (bad,) = read_corrupt_files(str(tmp_path / "bad"))
    assert bad["reason"] == "corrupt_stream" and bad["lost_bytes"] > 0


def _damaged_parquet(path, groups: int = 3, rows: int = 50, bad_group: int = 1) -> None:
    table = pa.table({"text": [f"doc{i} " + "w" * 100 for i in range(groups * rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rows, compression="snappy")
    data = bytearray(buf.getvalue())
    col = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(bad_group).column(0)
    start = col.data_page_offset + 2  # inside the page header
    data[start : start + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("task_bytes", [1 << 30, 1])
def test_parquet_damaged_row_group_keeps_the_others(tmp_path, task_bytes):
    _damaged_parquet(tmp_path / "d.parquet")
    reader = _reader(tmp_path, [tmp_path / "d.parquet"], task_bytes=task_bytes)
    assert len(reader.tasks) == (3 if task_bytes == 1 else 1)  # one task per row group
    docs = _run(reader)
    assert [d.text.split()[0] for d in docs] == [f"doc{i}" for i in [*range(50), *range(100, 150)]]
    assert docs[-1].metadata["origin"].endswith("d.parquet:150")
    (bad,) = read_corrupt_files(str(tmp_path / "bad"))
    assert bad["reason"] == "corrupt_row_group" and bad["line"] == 51
    assert bad["lost_row_groups"] == [1] and bad["lost_rows"] == 50
    with pytest.raises(BadInputError, match=r"d\.parquet:51: corrupt_file"):
        _run(_reader(tmp_path, [tmp_path / "d.parquet"], strict=True))


def test_unreadable_parquet_is_one_corrupt_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not really parquet")
    reader = _reader(tmp_path, [tmp_path / "x.parquet"], task_bytes=1)
    assert _run(reader) == []
    (bad,) = read_corrupt_files(str(tmp_path / "bad"))
    assert bad["reason"] == "unreadable_parquet" and bad["lost_bytes"] == 31


# -- over-long documents -----------------------------------------------------------------------
def test_split_text_prefers_paragraphs_then_lines_then_spaces():
    paras = ["a" * 40, "b" * 40, "c" * 40]
    assert split_text("\n\n".join(paras), 50) == [p + "\n\n" for p in paras[:2]] + [paras[2]]
    assert split_text("x" * 30 + "\n" + "y" * 30, 40) == ["x" * 30 + "\n", "y" * 30]
    assert split_text("one two three four", 9) == ["one two ", "three ", "four"]
    assert split_text("z" * 25, 10) == ["z" * 10, "z" * 10, "z" * 5]
    rng = random.Random(3)
    text = "\n\n".join(_words(rng, rng.randint(1, 200)) for _ in range(50))
    pieces = split_text(text, 500)
    assert "".join(pieces) == text and all(len(p) <= 500 for p in pieces)


@pytest.mark.parametrize("mode", ["split", "truncate", "drop"])
def test_too_long_modes(tmp_path, mode):
    book = "\n\n".join(f"chapter {k} " + "word " * 30 for k in range(4))  # 4 x ~160 chars
    lines = [json.dumps({"text": book, "id": "bk"}).encode(), b'{"text": "short"}']
    docs, reader = _read(tmp_path, lines, max_chars=400, too_long=mode)
    texts = [d.text for d in docs]
    stats = reader.stats
    if mode == "split":
        assert "".join(texts[:-1]) == book and all(len(t) <= 400 for t in texts)
        assert [d.id for d in docs[:-1]] == ["bk#0", "bk#1"]
        assert stats["long/split"].total == 1 and stats["long/pieces"].total == 2
    elif mode == "truncate":
        assert texts[0] == book[: len(texts[0])] and len(texts[0]) <= 400 and len(texts) == 2
        assert stats["long/truncated"].total == 1
    else:
        assert texts == ["short"] and stats["dropped/too_long"].total == 1
    assert stats["read"].total == 2


# -- logging and misc --------------------------------------------------------------------------
def test_one_log_line_per_file_and_reason(tmp_path):
    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        lines = [b"{bad"] * 50 + [b'{"text": 1}'] * 20 + [b'{"text": "ok"}']
        docs, _ = _read(tmp_path, lines)
    finally:
        logger.remove(sink)
    assert len(docs) == 1 and len(_rejects(tmp_path)) == 70
    assert len(messages) == 2, messages
    assert "50 record(s) dropped (malformed_json)" in messages[0]
    assert "20 record(s) dropped (non_string_text)" in messages[1]


def test_reader_metadata_and_exclusion(tmp_path):
    lines = [
        json.dumps({"text": "a", "meta": {"redpajama_set_name": "Wiki", "date": "2001-02-03"}}),
        json.dumps({"text": "b", "meta": {"redpajama_set_name": "RedPajamaGithub"}}),
        json.dumps({"text": "c", "dump": "CC-MAIN-2023-50", "id": "u1"}),
    ]
    docs, reader = _read(tmp_path, [x.encode() for x in lines], exclude_sources=["RedPajamaGithub"])
    assert [(d.text, d.metadata["source"], d.metadata["date"]) for d in docs] == [
        ("a", "Wiki", "2001-02-03"), ("c", "web", "2023-12-11")]  # fmt: skip
    assert docs[1].id == "u1" and docs[0].id.endswith("in.jsonl:1")
    assert reader.stats["dropped/excluded_source"].total == 1


def test_strict_reader_raises_with_location(tmp_path):
    with pytest.raises(BadInputError, match=r"in\.jsonl:2: malformed_json"):
        _read(tmp_path, [b'{"text": "ok"}', b"{oops"], strict=True)


def test_undated_drop_policy(tmp_path):
    docs, reader = _read(tmp_path, [b'{"text": "x"}'], drop_undated=True)
    assert docs == [] and reader.stats["dropped/undated"].total == 1


def test_default_dump_is_slimpajama_layout(tmp_path):
    paths = write_default_dump(str(tmp_path))
    assert all("/chunk1/example_train_" in p and p.endswith(".jsonl.zst") for p in paths)
    recs = []
    for p in paths:
        with open(p, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        recs += [json.loads(x) for x in data.decode().splitlines()]
    assert len(recs) == 249
    assert all(r["meta"]["redpajama_set_name"] == "StateOfTheUnion" for r in recs)
    years = sorted(int(r["meta"]["date"][:4]) for r in recs)
    assert years[0] == 1790 and years[-1] >= 2025


def test_date_side_mapping(tmp_path):
    mapping = tmp_path / "dates.csv"
    mapping.write_text("id,date\nu1,2021-05-01\nu3,2021\n")
    docs, reader = _read(tmp_path, [b'{"text": "x", "id": "u1"}', b'{"text": "y", "id": "u2"}',
                                    b'{"text": "z", "id": "u3"}'],
                         date_map=load_date_map(str(mapping)))  # fmt: skip
    assert [d.metadata["date"] for d in docs] == ["2021-05-01", None]
    assert reader.stats["dropped/invalid_date"].total == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("key,when\n")
    with pytest.raises(ValueError, match="expected a CSV header with columns id,date"):
        load_date_map(str(bad))
