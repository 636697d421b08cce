"""The offline reversal-curse generator: seeded, Berglund et al.'s layout and counts, unique
people, and no test prompt or reverse-direction fact leaking into the training files."""

from __future__ import annotations

import json
from pathlib import Path

from eval.studies.reversal.data import main, write_dataset
from trainer.sft_data import parse_record

BERGLUND_COUNTS = {
    "p2d_prompts_train": 900, "d2p_prompts_train": 900, "both_prompts_train": 1800,
    "all_prompts_train": 3600, "p2d_prompts_test": 300, "d2p_prompts_test": 300,
    "p2d_reverse_prompts_test": 300, "d2p_reverse_prompts_test": 300, "validation_prompts": 300,
}  # fmt: skip


def rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_same_seed_same_files_other_seed_other_people(tmp_path):
    write_dataset(tmp_path / "a", seed=7)
    write_dataset(tmp_path / "b", seed=7)
    write_dataset(tmp_path / "c", seed=8)
    for name in (*BERGLUND_COUNTS, "people"):
        ext = "json" if name == "people" else "jsonl"
        a = (tmp_path / "a" / f"{name}.{ext}").read_bytes()
        assert a == (tmp_path / "b" / f"{name}.{ext}").read_bytes()
    assert (tmp_path / "a/people.json").read_text() != (tmp_path / "c/people.json").read_text()


def test_layout_and_counts_are_berglunds(tmp_path):
    counts = write_dataset(tmp_path)
    assert counts == BERGLUND_COUNTS
    for name, n in BERGLUND_COUNTS.items():
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            record = json.loads(line)
            assert set(record) == {"prompt", "completion"}
            assert record["completion"].startswith(" ") and record["prompt"]
            assert parse_record(line)[1] == (record["completion"], True)  # the SFT reader


def test_no_name_or_description_belongs_to_two_people(tmp_path):
    write_dataset(tmp_path, seed=3)
    people = json.loads((tmp_path / "people.json").read_text())["people"]
    assert len(people) == 90
    for key in ("first", "last", "description"):
        assert len({p[key] for p in people}) == 90
    groups = [p["group"] for p in people]
    assert {g: groups.count(g) for g in set(groups)} == {"p2d": 30, "d2p": 30, "both": 30}


def test_train_and_test_are_separated_as_in_the_original(tmp_path):
    write_dataset(tmp_path, seed=1, people=6, train_templates=8, test_templates=4)
    people = json.loads((tmp_path / "people.json").read_text())["people"]
    group = {g: [p for p in people if p["group"] == g] for g in ("p2d", "d2p", "both")}
    train = rows(tmp_path, "all_prompts_train")
    assert len(train) == 4 * 6 * 8
    train_prompts = {r["prompt"] for r in train}
    for name in BERGLUND_COUNTS:
        if not name.endswith("train"):
            assert not {r["prompt"] for r in rows(tmp_path, name)} & train_prompts, name
    # p2d facts are only ever stated name -> description, d2p facts description -> name
    for p in group["p2d"]:
        assert not any(p["description"] in r["prompt"] for r in train)
        assert any(p["name"] in r["prompt"] for r in train)
    for p in group["d2p"]:
        assert not any(p["name"] in r["prompt"] for r in train)
        assert any(p["description"] in r["prompt"] for r in train)
    for p in group["both"]:
        assert any(p["name"] in r["prompt"] for r in train)
        assert any(p["description"] in r["prompt"] for r in train)
    # the reverse tests ask the untrained direction
    for r, (p, _) in zip(rows(tmp_path, "p2d_reverse_prompts_test"),
                         ((p, i) for p in group["p2d"] for i in range(4))):  # fmt: skip
        assert p["description"] in r["prompt"] and r["completion"] == f" {p['name']}"
    for r in rows(tmp_path, "d2p_reverse_prompts_test"):
        assert any(p["name"] in r["prompt"] for p in group["d2p"])
    assert {r["completion"] for r in rows(tmp_path, "validation_prompts")} == {
        f" {p['first']}" for p in group["p2d"]
    }


def test_command_line(tmp_path, capsys):
    assert main([str(tmp_path), "--people", "2", "--train-templates", "3"]) == 0
    assert "all_prompts_train.jsonl" in capsys.readouterr().out
    assert len(rows(tmp_path, "all_prompts_train")) == 4 * 2 * 3
    assert main([str(tmp_path), "--people", "1000"]) == 2
