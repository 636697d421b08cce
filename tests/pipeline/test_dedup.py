"""Earliest-dated dedup pieces, stage keys under parallelism settings, and their config."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from pipeline.build import plan_stages
from pipeline.config import CorpusConfig
from pipeline.configlib import ConfigError, load_config
from pipeline.dedup import UNDATED_DAY, EarliestMinhashCluster, date_priority


def test_date_priority_orders_by_date():
    days = [dt.date(1200, 5, 1), dt.date(1949, 12, 31), dt.date(1950, 1, 1), dt.date(2023, 2, 28),
            dt.date(2023, 3, 1), dt.date(2024, 3, 4), dt.date(2126, 1, 1)]  # fmt: skip
    prios = [date_priority(d) for d in days]
    assert prios == sorted(prios, reverse=True) and len(set(prios)) == len(prios)
    assert all(2 <= p <= 65535 for p in prios) and date_priority(None) == 1
    assert date_priority(dt.date(1, 1, 1)) == 65535 and date_priority(dt.date(9999, 1, 1)) == 2


def _cluster(tmp_path, pairs_by_file: dict[str, list], days: dict[int, list]) -> dict[int, list]:
    buckets, sigs, out = tmp_path / "b", tmp_path / "s", tmp_path / "o"
    buckets.mkdir()
    (sigs / "days").mkdir(parents=True)
    for name, pairs in pairs_by_file.items():
        np.asarray(pairs, dtype="<u4").tofile(buckets / name)
    for rank, values in days.items():
        np.asarray(values, dtype="<i4").tofile(sigs / "days" / f"{rank:05d}.days")
    step = EarliestMinhashCluster(str(buckets), str(sigs), str(out))
    step.run()
    return {
        int(p.name.split(".")[0]): np.fromfile(p, dtype="<u4").tolist()
        for p in sorted(out.glob("*.remove"))
    }


def test_minhash_cluster_keeps_the_earliest_member_in_either_order(tmp_path):
    d2020, d2024 = dt.date(2020, 1, 1).toordinal(), dt.date(2024, 3, 4).toordinal()
    days = {0: [d2024, d2020, d2020, UNDATED_DAY, d2020], 1: [d2020, d2024, d2020, 0, d2020]}
    pairs = {
        # (0,0) dated 2024 first in the stream, its 2020 copy (1,0) later
        "00000_00.dups": [(0, 0, 1, 0)],
        # (1,1) 2024 vs (0,1) 2020, pair written the other way round
        "00001_00.dups": [(1, 1, 0, 1)],
        # a chain across two bucket files: undated (0,3) - (1,2) 2020 - (1,4) 2020 (tie: first)
        "00000_01.dups": [(0, 3, 1, 2)],
        "00001_01.dups": [(1, 4, 1, 2)],
    }
    removed = _cluster(tmp_path, pairs, days)
    assert removed == {0: [0, 3], 1: [1, 4]}


def test_minhash_cluster_prefers_the_source_bound_over_undated(tmp_path):
    removed = _cluster(tmp_path, {"00000_00.dups": [(0, 0, 0, 1)]}, {0: [UNDATED_DAY, 5]})
    assert removed == {0: [0]}


def _keys(dump, tmp_path, *overrides) -> dict[str, str]:
    base = [f"input=[{dump.root}]", f"output={tmp_path / 'c'}", "split.cutoff=2020-01-01"]
    cfg = load_config(CorpusConfig, None, base + list(overrides))
    # publish (keyed by the whole config, manifest included) is left out here
    return {s.name: s.folder.rsplit("-", 1)[1] for s in plan_stages(cfg) if s.name != "publish"}


def test_parallelism_and_resources_do_not_change_keys(dump, tmp_path):
    base = _keys(dump, tmp_path)
    same = _keys(dump, tmp_path, "executor.workers=7", "executor.kind=slurm",
                 "executor.slurm.stages.minhash-buckets.cpus_per_task=4",
                 "executor.slurm.stages.split.time=01:00:00")  # fmt: skip
    assert same == base
    wider = _keys(dump, tmp_path, "dedup.workers_per_bucket=3")
    assert {k for k in base if wider[k] != base[k]} == {"minhash-buckets"}
    # sharded exact finding changes its intermediate layout (and, for equally dated
    # identical copies, which one is kept): dedup and what follows are rebuilt
    sharded = _keys(dump, tmp_path, "dedup.exact_finder_workers=2")
    assert sharded["exact-find"] != base["exact-find"] and sharded["split"] != base["split"]
    # the tokenizer does not depend on the validation fraction; the split does
    other = _keys(dump, tmp_path, "split.validation_fraction=0.5")
    assert other["tokenizer"] == base["tokenizer"] and other["split"] != base["split"]
    assert _keys(dump, tmp_path, "split.cutoff=2021-01-01")["tokenizer"] != base["tokenizer"]


def test_config_errors(dump, tmp_path):
    ok = ["input=[x]", "output=o"]
    with pytest.raises(ConfigError, match="tokenizer.train_max_chars was renamed to "
                                          "tokenizer.train_sample_chars"):  # fmt: skip
        load_config(CorpusConfig, None, ok + ["tokenizer.train_max_chars=10"])
    with pytest.raises(ConfigError, match="source_dates.RedPajamaBook: 'soon' is not a YYYY"):
        load_config(CorpusConfig, None, ok + ["source_dates.RedPajamaBook=soon"])
    with pytest.raises(ConfigError, match="split.undated: 'keep' is not one of"):
        load_config(CorpusConfig, None, ok + ["split.undated=keep"])
    with pytest.raises(ConfigError, match="dedup.exact_finder_workers and"):
        load_config(CorpusConfig, None, ok + ["dedup.workers_per_bucket=0"])
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) minhash-bucket; stages are: "):
        _keys(dump, tmp_path, "executor.slurm.stages.minhash-bucket.cpus_per_task=2")


def _exact_kept(tmp_path, tasks: list[list[tuple[str, str]]]) -> list[str]:
    """Ids of the kept copies of the text "dup", through datatrove's three exact-dedup steps
    configured as the build does; ``tasks`` holds each task's (text, date) stream."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )

    from pipeline.dedup import DatePriority, doc_text

    cfg = ExactDedupConfig(content_getter=doc_text, document_priority=DatePriority({}))

    def stream(rank: int):
        return iter(Document(text, f"{rank}/{i}", metadata={"date": date})
                    for i, (text, date) in enumerate(tasks[rank]))  # fmt: skip

    for rank in range(len(tasks)):
        ExactDedupSignature(str(tmp_path / "sig"), cfg).run(stream(rank), rank, len(tasks))
    ExactFindDedups(str(tmp_path / "sig"), str(tmp_path / "dups"), cfg).run()
    kept = []
    for rank in range(len(tasks)):
        step = ExactDedupFilter(str(tmp_path / "dups"), cfg)
        kept += [d.id for d in step.run(stream(rank), rank, len(tasks)) if d.text == "dup"]
    return kept


@pytest.mark.parametrize("tasks,kept", [
    # the earliest date wins wherever it is
    ([[("dup", "2021-01-01")], [("a", "2020-01-01"), ("dup", "2020-01-01")]], ["1/1"]),
    # same day: the lowest index within its own task, not the first task
    ([[("a", "2020-01-01"), ("dup", "2020-01-01")], [("dup", "2020-01-01")]], ["1/0"]),
    ([[("dup", "2020-01-01"), ("a", "2020-01-01"), ("dup", "2020-01-01")]], ["0/0"]),
    # same day and same index in two tasks: the heap merge keeps task 1's
    ([[("dup", "2020-01-01")], [("dup", "2020-01-01")]], ["1/0"]),
])  # fmt: skip
def test_exact_dedup_ties_as_the_docstring_says(tmp_path, tasks, kept):
    assert _exact_kept(tmp_path, tasks) == kept
