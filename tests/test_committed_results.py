"""Committed results name no folder of the machine that made them.

``benchmarks/`` holds recorded studies (fit.json, report.md, JSONL of benchmark runs) that
others read and rerun from their own checkout; an absolute path there (``/work/exp/...``,
``/home/me/...``) is meaningless elsewhere and leaks where it ran. Data files are checked value
by value (any string that is an absolute POSIX path), markdown by the common home/work roots
(``/tmp/...`` in a markdown *example command* is fine: it is the reader's scratch folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks"
MACHINE_ROOTS = re.compile(r"(?<![\w.~])/(?:work|home|Users|root|mnt|scratch)/[^\s`'\")]+")


def strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def absolute_paths(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".md":
        return MACHINE_ROOTS.findall(text)
    if path.suffix == ".json":
        records = [json.loads(text)]
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [s for r in records for s in strings(r) if re.fullmatch(r"/[^\s/]+/\S*", s)]


def test_committed_results_hold_no_absolute_paths():
    found = {
        str(p.relative_to(ROOT)): hits
        for p in sorted(RESULTS.rglob("*"))
        if p.suffix in (".json", ".jsonl", ".md") and (hits := absolute_paths(p))
    }
    assert found == {}


def test_the_check_sees_absolute_paths(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": [{"run_dir": "/work/exp/r"}], "y": "C/s"}))
    (tmp_path / "b.jsonl").write_text('{"json": "/tmp/o.json"}\n{"json": "o.json"}\n')
    (tmp_path / "c.md").write_text("run at `/home/me/runs/mdm`; try `--out /tmp/x`; ./work/y\n")
    assert absolute_paths(tmp_path / "a.json") == ["/work/exp/r"]
    assert absolute_paths(tmp_path / "b.jsonl") == ["/tmp/o.json"]
    assert absolute_paths(tmp_path / "c.md") == ["/home/me/runs/mdm"]
