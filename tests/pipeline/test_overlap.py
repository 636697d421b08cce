"""Contamination: ``maskscale corpus overlap`` and ``decontaminate:`` on a corpus built for real
(CLI, datatrove executors) from a dump with planted overlaps whose counts are known."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.ngrams import TaskNgrams, hash_range, load_tasks, text_hashes, words
from pipeline.shards import read_manifest

from .conftest import ROOT, WORDS, run_build

N = 13


def _words(rng: random.Random, k: int) -> list[str]:
    return [rng.choice(WORDS[:-3]) for _ in range(k)]  # no stop words: no chance 13-grams


class Planted:
    """Train documents, holdout documents quoting some of them, and task items."""

    def __init__(self, root: Path):
        rng = random.Random(7)
        self.train = [_words(rng, 60) for _ in range(30)]
        holdout = [_words(rng, 60) for _ in range(20)]
        # h0..h3 quote 13 words of t0..t3; h4 shares only 12 words (not an n-gram); h5 quotes
        # t5 in capitals with punctuation (the same words once normalised)
        for i in range(4):
            holdout[i][20:20] = self.train[i][10:23]
        holdout[4][20:20] = self.train[4][10:22]
        holdout[5][30:30] = [w.upper() + "," for w in self.train[5][30:43]]
        self.holdout_overlapping, self.holdout_words_overlapping = 5, 5 * N
        # task: items 0-1 copy 15 words of t10, item 2 of t11 (context + gold choice); item 3's
        # *wrong* choice would complete a quote of t12; 4-7 are clean; 8 is too short to check
        items = []
        for doc, start in ((10, 0), (10, 30), (11, 5)):
            ws = self.train[doc][start : start + 15]
            items.append({"context": " ".join(ws[:10]), "choices": ["zzz", " ".join(ws[10:])],
                          "label": 1})  # fmt: skip
        ws = self.train[12][0:15]
        items.append({"context": " ".join(ws[:12]), "choices": [" ".join(ws[12:]), "qqq"],
                      "label": 1})  # fmt: skip
        for _ in range(4):
            items.append({"context": " ".join(_words(rng, 12)), "choices": ["a b", "c d"],
                          "label": 0})  # fmt: skip
        items.append({"context": "What is", "choices": ["two", "three"], "label": 0})
        self.task = root / "quiz.jsonl"
        self.task.write_text("".join(json.dumps(i) + "\n" for i in items))
        # a second task: one item from t11 (also in quiz) and one from t13
        other = [{"text": " ".join(self.train[d][:14])} for d in (11, 13)]
        self.other = root / "other.jsonl"
        self.other.write_text("".join(json.dumps(i) + "\n" for i in other))
        self.third = root / "third.jsonl"  # t13 (also in other) and t14
        third = [{"text": " ".join(self.train[d][20:40])} for d in (13, 14)]
        self.third.write_text("".join(json.dumps(i) + "\n" for i in third))
        self.dump = root / "dump"
        self.dump.mkdir()
        lines = [{"text": " ".join(w), "date": "2015-05-01", "id": f"t{i}"}
                 for i, w in enumerate(self.train)]  # fmt: skip
        lines += [{"text": " ".join(w), "date": "2021-05-01", "id": f"h{i}"}
                  for i, w in enumerate(holdout)]  # fmt: skip
        random.Random(1).shuffle(lines)
        (self.dump / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


BUILD = ("split.validation_fraction=0.0", "dedup.near=false", "records.task_bytes=12000")


def overlap(corpus: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "corpus", "overlap", str(corpus), "--quiet",
           *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    return Planted(tmp_path_factory.mktemp("planted"))


def test_ngrams_are_over_normalised_words_and_slices_cover_the_range():
    assert words("Hello, WORLD!  it's\nfine") == ["hello", "world", "it", "s", "fine"]
    a = text_hashes("One two three four five", 3)
    assert len(a) == 3 and np.array_equal(a, text_hashes("one, TWO three... four five!", 3))
    assert not np.array_equal(a, text_hashes("one two three five four", 3))
    assert text_hashes("one two", 3).size == 0
    # datatrove's exact-dedup slices: (i*per, (i+1)*per], per = (2^64-1) // workers
    edges = np.array([0, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    assert hash_range(edges, 2).tolist() == [0, 0, 1, 1]
    assert hash_range(edges, 1).tolist() == [0, 0, 0, 0]
    assert hash_range(np.array([2**64 - 2], dtype=np.uint64), 3).tolist() == [2]


def test_task_ngrams_name_every_task_a_text_contains(planted):
    tn = TaskNgrams(load_tasks([str(planted.task), str(planted.other), str(planted.third)]), N)
    assert tn.tasks_in(" ".join(planted.train[11])) == ["quiz", "other"]
    assert tn.tasks_in(" ".join(planted.train[10])) == ["quiz"]
    assert tn.tasks_in(" ".join(planted.train[12])) == []  # only a wrong choice quotes it
    assert tn.tasks_in(" ".join(planted.train[13])) == ["other", "third"]
    assert tn.tasks_in(" ".join(planted.train[9])) == []


@pytest.mark.slow
def test_decontaminated_build_and_its_overlap_report_count_what_was_planted(planted, tmp_path):
    corpus = tmp_path / "c"
    run_build(planted.dump, corpus, *BUILD,
              f"decontaminate.tasks=[{planted.other},{planted.third}]")  # fmt: skip
    m = read_manifest(corpus)
    # other: t11, t13; third: t13, t14. Three documents dropped, counted per task they held
    assert m["dropped"] == {"decontaminated": 3}
    assert m["decontaminated"] == {"other": 2, "third": 2}
    assert m["splits"]["train"]["documents"] == 30 - 3
    assert m["splits"]["holdout_2021"]["documents"] == 20  # holdouts are never dropped

    # quiz through a local file and through the lm-evaluation-harness (a local YAML, offline)
    yaml_dir = tmp_path / "yaml"
    yaml_dir.mkdir()
    (yaml_dir / "quiz_h.yaml").write_text(
        f"task: quiz_h\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{planted.task}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    proc = overlap(corpus, "--tasks", str(planted.task), "quiz_h", str(planted.other),
                   "--include-path", str(yaml_dir), "--finder-workers", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((corpus / "overlap" / "overlap.json").read_text())
    assert set(report["splits"]) == {"holdout_2021"}  # train itself is not a query
    h = report["splits"]["holdout_2021"]
    assert (h["documents"], h["documents_overlapping"]) == (20, planted.holdout_overlapping)
    assert h["overlap_fraction"] == pytest.approx(5 / 20)
    assert h["words_overlapping"] == planted.holdout_words_overlapping
    assert h["words"] == 20 * 60 + 5 * 13 + 12
    assert {g["documents"] for g in h["top_ngrams"]} == {1}
    assert " ".join(planted.train[5][30:43]) in [g["ngram"] for g in h["top_ngrams"]]
    for name in ("quiz", "quiz_h"):
        t = report["tasks"][name]
        # items 0-1 quote t10 (kept); item 2 quoted t11, which decontamination dropped
        assert (t["items"], t["items_contaminated"], t["items_too_short"]) == (9, 2, 1), name
        assert t["contaminated_fraction"] == pytest.approx(2 / 9)
    assert report["tasks"]["other"]["items_contaminated"] == 0
    assert "| holdout_2021 | 20 | 5 | 25.00% |" in (corpus / "overlap" / "overlap.md").read_text()

    # a cleaned corpus has no documents left to read: the command says what to do
    shutil.rmtree(corpus / m["stages"]["split"] / "data")
    proc = overlap(corpus)
    assert proc.returncode == 2 and "without --clean-work" in proc.stderr


@pytest.mark.slow
def test_fractions_go_to_the_run_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.overlap import log_overlap_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    run_dir = tmp_path / "run"  # a training run's folder, as the trainer's tracker leaves it
    run_dir.mkdir()
    (run_dir / "mlflow_run_id").write_text(run_id)
    (run_dir / "mlflow_tracking_uri").write_text(uri)
    report = {"splits": {"holdout_2021": {"overlap_fraction": 0.25, "word_overlap_fraction": 0.05}},
              "tasks": {"quiz": {"contaminated_fraction": 1 / 3}}}  # fmt: skip
    (tmp_path / "overlap.json").write_text(json.dumps(report))
    assert log_overlap_mlflow(report, str(run_dir), None, [tmp_path / "overlap.json"]) == run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"overlap/holdout_2021/overlap_fraction": 0.25,
                       "overlap/holdout_2021/word_overlap_fraction": 0.05,
                       "overlap/task/quiz/contaminated_fraction": pytest.approx(1 / 3)}  # fmt: skip
    assert [a.path for a in client.list_artifacts(run_id, "overlap")] == ["overlap/overlap.json"]
