"""``maskscale demo``: its settings, its summary table, the corpus half and (slow) the whole
flow in its ``--quick`` variant on the real embedded corpus, trainer, evaluation and MLflow."""

import json
import math
import sys

import pytest

from eval.demo.config import load_demo_config
from eval.demo.run import sample_texts
from eval.demo.summary import format_summary, summary_rows
from pipeline.cli import main
from pipeline.configdir import config_path
from pipeline.configlib import ConfigError
from pipeline.shards import read_manifest

SPLITS = ["validation", "holdout_1990s", "holdout_2000s", "holdout_2010s", "holdout_2020s"]


def test_demo_builds_the_default_corpus(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--skip-train"]) == 0
    m = read_manifest(tmp_path / "corpus")
    assert m["documents"]["read"] == 249
    assert m["documents"]["kept"] + m["duplicates"]["near"] + m["duplicates"]["exact"] == 249
    assert set(m["splits"]) == {"train", *SPLITS}
    assert m["sources"].keys() == {"StateOfTheUnion"}
    assert "holdout_2020s" in capsys.readouterr().out  # the summary table was printed


def test_demo_settings_quick_and_overrides():
    path = str(config_path("demo.yaml"))
    full = load_demo_config(path)
    quick = load_demo_config(path, quick=True, overrides=["train.mdm={optim.lr: 0.002}"])
    assert quick.train.flops < full.train.flops and quick.eval.rows < full.eval.rows
    assert quick.train.recipe == full.train.recipe  # untouched by quick:
    assert "optim.lr=0.002" in quick.train.overrides("mdm")
    assert "optim.lr=0.002" not in quick.train.overrides("arm")
    assert "model=tiny-0.3M" in quick.train.overrides("arm")
    with pytest.raises(ConfigError, match="eval.samples"):
        load_demo_config(path, overrides=["eval.samples=9"])
    with pytest.raises(ConfigError, match="train.flop"):
        load_demo_config(path, overrides=["train.flop=1"])


def test_summary_table_and_verdict():
    ppl = {
        f: {
            "splits": {
                s: {"loss": v + i, "rows": 64, "documents": 9 + i} for i, s in enumerate(SPLITS[:2])
            }
        }  # fmt: skip
        for f, v in (("arm", 5.0), ("mdm", 6.0))
    }
    unigram = {"validation": 6.5, "holdout_1990s": 6.6}
    cloze = {"arm": {"validation": {"acc": 0.25}}}
    rows = summary_rows(ppl, unigram, cloze)
    assert [r["split"] for r in rows] == SPLITS[:2]
    assert rows[1]["mdm"] == 7.0 and math.isnan(rows[1]["arm_cloze"])
    table = format_summary(rows)
    assert "6.500" in table and "7.000" in table and "0.250" in table
    assert rows[1]["documents"] == 10 and "bootstrap over documents" in table
    assert table.splitlines()[3].split()[:3] == ["holdout_1990s", "64", "10"]  # rows, docs
    assert "ARM below the unigram on 2/2 splits; MDM below the unigram on 1/2" in table
    assert "train.flops" in table  # says what to change when the MDM does not beat it


def test_sampling_missing_is_a_clear_line_not_a_crash(monkeypatch, capsys):
    monkeypatch.setitem(
        sys.modules, "eval.generation.sampling", None
    )  # as if the module were absent
    assert sample_texts({"arm": "unused"}, None) is None
    assert "sampling not available" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    assert main(["demo", "--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["split"] for r in summary["splits"]] == SPLITS
    for row in summary["splits"]:
        assert all(math.isfinite(row[k]) for k in ("unigram", "arm", "mdm"))
        assert row["rows"] == 4
    assert "unigram" in out and f"sqlite:///{tmp_path / 'mlflow.db'}" in out
    assert "mlflow ui --backend-store-uri" in out
    assert (tmp_path / "temporal" / "temporal.md").is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("maskscale-demo").experiment_id])
    assert sorted(r.data.params["objective"] for r in runs) == ["arm", "mdm"]
    for run in runs:
        metrics = run.data.metrics
        assert "eval/validation/loss" in metrics and "eval/holdout_2020s/unigram_loss" in metrics
        assert "eval/cloze/validation/acc" in metrics
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
        assert {"eval/summary.md", "eval/samples.md", "eval/temporal.md"} <= logged
