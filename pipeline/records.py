"""What a raw record's fields mean: strict dates, metadata types, over-long texts.

These decide which split a document lands in, so they accept only what is unambiguous:

- a date is a full ISO date (``YYYY-MM-DD``) or ISO datetime (optional time zone, ``Z``; it is
  converted to UTC) within ``[min_date, max_date]``. Bare years (``"2019"``) and year-months
  are rejected: "2019" cannot say whether a document precedes a mid-2019 cutoff. Placeholder
  years (``0001-01-01``, ``9999-12-31``) fall outside the bounds. Trailing text
  (``"2019-05-18 garbage"``) is rejected, not cut off;
- a FineWeb dump id ``CC-MAIN-YYYY-WW`` dates a record at the Monday of that ISO week, and a
  week the year does not have (``CC-MAIN-2019-53``) is invalid;
- metadata that should be a string but is a list, dict or number is ``invalid_metadata``;
- texts over the length limit are split at paragraph boundaries (blank lines, then newlines,
  then whitespace, then anywhere) so that books stay data.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

DUMP_RE = re.compile(r"CC-MAIN-(\d{4})-(\d{2})")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?"
)
MIN_DATE = dt.date(1000, 1, 1)
MAX_DATE = dt.date(2099, 12, 31)
# fields that must be strings when present (ids may also be integers, dates date objects)
RECORD_STRING_FIELDS = ("source", "dump", "id", "date")
META_STRING_FIELDS = ("redpajama_set_name", "date")


class InvalidMetadata(ValueError):
    """A metadata field has the wrong type; the message names the field."""


def _check_type(name: str, value) -> None:
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return
    if name.endswith("date") and isinstance(value, dt.date):  # parquet date/timestamp
        return
    if not isinstance(value, str):
        raise InvalidMetadata(f"field {name!r} is a {type(value).__name__}, expected a string")


def check_types(rec: dict, meta: dict) -> None:
    """Raise :class:`InvalidMetadata` for the first string field that holds something else."""
    for key in META_STRING_FIELDS:
        value = meta.get(key)
        if value is not None and value.__class__ is not str:
            _check_type(f"meta.{key}", value)
    for key in RECORD_STRING_FIELDS:
        value = rec.get(key)
        if value is not None and value.__class__ is not str:
            _check_type(key, value)


def _in_bounds(day: dt.date, lo: dt.date, hi: dt.date, what: str) -> dt.date:
    if not lo <= day <= hi:
        raise ValueError(
            f"{what} {day.isoformat()} is outside [{lo.isoformat()}, {hi.isoformat()}] "
            "(a placeholder? see records.min_date/max_date)"
        )
    return day


def parse_iso_date(value, lo: dt.date = MIN_DATE, hi: dt.date = MAX_DATE) -> dt.date:
    """A full ISO date or datetime (UTC day) within [lo, hi]; anything else raises ValueError."""
    if isinstance(value, dt.datetime):
        day = (value.astimezone(dt.UTC) if value.tzinfo else value).date()
        return _in_bounds(day, lo, hi, "date")
    if isinstance(value, dt.date):
        return _in_bounds(value, lo, hi, "date")
    text = str(value).strip()
    try:
        if _DATE_RE.fullmatch(text):
            day = dt.date.fromisoformat(text)
        elif _DATETIME_RE.fullmatch(text):
            moment = dt.datetime.fromisoformat(text)
            day = (moment.astimezone(dt.UTC) if moment.tzinfo else moment).date()
        else:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"unreadable date {text!r} (expected YYYY-MM-DD or an ISO datetime)"
        ) from None
    return _in_bounds(day, lo, hi, "date")


def parse_dump(dump, lo: dt.date = MIN_DATE, hi: dt.date = MAX_DATE) -> dt.date:
    """Monday of the ISO week of a ``CC-MAIN-YYYY-WW`` dump id; raises ValueError otherwise."""
    m = DUMP_RE.fullmatch(str(dump).strip())
    if not m:
        raise ValueError(f"unreadable dump id {dump!r} (expected CC-MAIN-YYYY-WW)")
    year, week = int(m.group(1)), int(m.group(2))
    try:
        day = dt.date.fromisocalendar(year, week, 1)
    except ValueError:
        raise ValueError(f"dump id {dump!r}: {year} has no ISO week {week}") from None
    return _in_bounds(day, lo, hi, f"dump {dump}")


def resolve_date(value, dump=None, lo: dt.date = MIN_DATE, hi: dt.date = MAX_DATE):
    """(date or None, where it came from: ``date``, ``dump`` or ``none``).

    An unusable ``value`` falls back to a valid dump id; ValueError when a date or dump is
    present but neither is usable.
    """
    error = None
    if value not in (None, ""):
        try:
            return parse_iso_date(value, lo, hi), "date"
        except ValueError as e:
            error = e
    if dump not in (None, ""):
        try:
            return parse_dump(dump, lo, hi), "dump"
        except ValueError as e:
            raise ValueError(f"{error}; {e}" if error else str(e)) from None
    if error is not None:
        raise error
    return None, "none"


def parse_date(value, dump=None, lo: dt.date = MIN_DATE, hi: dt.date = MAX_DATE):
    """Date of a record from its date, else its dump id; None when it has neither."""
    return resolve_date(value, dump, lo, hi)[0]


# -- over-long texts -------------------------------------------------------------------------
_BREAKS = (re.compile(r"\n[ \t\r]*\n\s*"), re.compile(r"\n\s*"), re.compile(r"\s+"))


def _pieces(text: str, limit: int, level: int) -> Iterator[str]:
    if len(text) <= limit:
        yield text
        return
    if level == len(_BREAKS):
        yield from (text[i : i + limit] for i in range(0, len(text), limit))
        return
    cuts = [m.end() for m in _BREAKS[level].finditer(text) if m.end() < len(text)]
    units = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    buf: list[str] = []
    size = 0
    for unit in units:
        if len(unit) > limit:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield from _pieces(unit, limit, level + 1)
            continue
        if size + len(unit) > limit:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(unit)
        size += len(unit)
    if buf:
        yield "".join(buf)


def split_text(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters, cut after paragraph breaks where possible (then
    line breaks, then whitespace, then anywhere). Joined they give back ``text``, except for
    whitespace-only pieces, which are left out."""
    return [p for p in _pieces(text, limit, 0) if p.strip()]
