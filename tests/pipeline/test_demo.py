"""The demo's corpus half on the real embedded default corpus (training is covered in trainer/)."""

import json

from pipeline.cli import main
from pipeline.demo import comparison_table
from pipeline.shards import read_manifest


def test_demo_builds_the_default_corpus(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--skip-train"]) == 0
    m = read_manifest(tmp_path / "corpus")
    assert m["documents"]["read"] == 249
    assert m["documents"]["kept"] + m["duplicates"]["near"] + m["duplicates"]["exact"] == 249
    assert set(m["splits"]) == {"train", "validation", "holdout_1990s", "holdout_2000s",
                                "holdout_2010s", "holdout_2020s"}  # fmt: skip
    assert m["sources"].keys() == {"StateOfTheUnion"}
    assert "holdout_2020s" in capsys.readouterr().out  # the summary table was printed


def test_comparison_table_lists_every_split():
    results = {o: {"val": {"val/validation/loss": v, "val/holdout_2020s/loss": v + 1}}
               for o, v in (("arm", 5.0), ("mdm", 6.0))}  # fmt: skip
    table = comparison_table(results)
    assert "holdout_2020s" in table and "6.000" in table and "7.000" in table
    json.dumps(results)
