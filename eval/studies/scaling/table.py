"""Points for ``maskscale sweep fit --points FILE.csv``: any table of IsoFLOP runs.

Why: a scaling fit should be checkable on other people's numbers (the paper's points, a study
run elsewhere) with the same code and the same report as our own sweeps. The table needs the
columns ``family,N,C,loss`` (family arm or mdm; N non-embedding parameters; C the nominal
budget that groups runs into an IsoFLOP line; loss the final validation loss in nats) and may
have ``name`` (default ``<family>-N<N>-C<C>``) and ``C_real`` (the compute the run actually
trained, 6 N D; default C). Other columns are ignored. Every row is checked: a bad value stops
with the file, line and column named and what to write instead.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline.configlib import ConfigError

REQUIRED = ("family", "N", "C", "loss")
OPTIONAL = ("name", "C_real")
WHAT = {
    "N": "the model's non-embedding parameter count, e.g. 8.5e7",
    "C": "the nominal FLOP budget of the run's IsoFLOP line, e.g. 6e18",
    "C_real": "the FLOPs the run actually trained (6 N D), e.g. 6.02e18, or leave it empty",
    "loss": "the final validation loss in nats, e.g. 3.12",
}


def _number(path: Path, line: int, key: str, text: str, positive: bool) -> float:
    where = f"{path}:{line}: column {key!r}"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number; write {WHAT[key]}") from None
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a positive finite number" if positive else "a finite number"
        raise ConfigError(f"{where}: {text!r} is not {need}; write {WHAT[key]}")
    return value


def _row(path: Path, line: int, row: dict) -> dict:
    family = (row.get("family") or "").strip().lower()
    if family not in ("arm", "mdm"):
        raise ConfigError(f"{path}:{line}: column 'family': {row.get('family')!r} is not arm "
                          "or mdm")  # fmt: skip
    n = _number(path, line, "N", (row["N"] or "").strip(), True)
    c = _number(path, line, "C", (row["C"] or "").strip(), True)
    loss = _number(path, line, "loss", (row["loss"] or "").strip(), False)
    real_text = (row.get("C_real") or "").strip()
    real = _number(path, line, "C_real", real_text, True) if real_text else None
    name = (row.get("name") or "").strip() or f"{family}-N{n:.4g}-C{c:.3g}"
    return {"name": name, "family": family, "size": "-", "N": int(n) if n.is_integer() else n,
            "C": c, "loss": loss, "status": "finished", "C_real": real or c,
            "C_source": "table" if real else "nominal"}  # fmt: skip


def read_points(path: str | Path) -> list[dict]:
    """The table's rows as fit points (each ``finished``), in file order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--points {path}: no such file; give a CSV with columns "
                          + ",".join(REQUIRED))  # fmt: skip
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [k for k in REQUIRED if k not in header]
        if missing:
            raise ConfigError(f"{path}:1: header {','.join(header) or '(empty)'} lacks column(s) "
                              f"{','.join(missing)}; the table needs {','.join(REQUIRED)} "
                              f"(optional: {','.join(OPTIONAL)})")  # fmt: skip
        reader.fieldnames = header
        points, seen = [], {}
        for row in reader:
            line = reader.line_num
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            p = _row(path, line, row)
            if p["name"] in seen:
                raise ConfigError(f"{path}:{line}: name {p['name']!r} repeats line "
                                  f"{seen[p['name']]}; names must be unique")  # fmt: skip
            seen[p["name"]] = line
            points.append(p)
    if not points:
        raise ConfigError(f"{path}: no rows under the header; one row per run: "
                          + ",".join(REQUIRED))  # fmt: skip
    return points
