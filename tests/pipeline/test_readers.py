import datetime as dt
import json

import pytest
import zstandard

from pipeline.default_dump import write_default_dump
from pipeline.readers import BadInputError, RawDumpReader, discover_inputs, parse_date


def test_parse_date_forms():
    assert parse_date("2024-03-05T10:00:00Z") == dt.date(2024, 3, 5)
    assert parse_date("1999") == dt.date(1999, 1, 1)
    assert parse_date(None, "CC-MAIN-2024-10") == dt.date.fromisocalendar(2024, 10, 1)
    assert parse_date(None) is None
    with pytest.raises(ValueError, match="unreadable date"):
        parse_date("yesterday")
    with pytest.raises(ValueError, match="unreadable dump id"):
        parse_date(None, "CC-MAIN-late")


def test_discover_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("{}\n")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    assert discover_inputs([str(tmp_path)]) == [str(tmp_path / "a" / "x.jsonl")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        discover_inputs([str(tmp_path / "nope*.jsonl")])


def _read(tmp_path, lines, **kw):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = RawDumpReader([str(path)], str(tmp_path / "rej"), **kw)
    return list(reader.run()), reader


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
    mapping.write_text("id,date\nu1,2021-05-01\n")
    from pipeline.readers import load_date_map

    docs, _ = _read(tmp_path, [b'{"text": "x", "id": "u1"}', b'{"text": "y", "id": "u2"}'],
                    date_map=load_date_map(str(mapping)))  # fmt: skip
    assert [d.metadata["date"] for d in docs] == ["2021-05-01", None]
    bad = tmp_path / "bad.csv"
    bad.write_text("key,when\n")
    with pytest.raises(ValueError, match="expected a CSV header with columns id,date"):
        load_date_map(str(bad))
