"""``maskscale study reverse``: the metrics on hand examples, the data checks, and (slow) the
whole study on tiny runs: real pretraining, real ``train task=sft`` subprocesses, real
sampling, a real MLflow sqlite store; a rerun skips the finished fine-tunes.

The tiny runs use a word-level tokenizer whose words are exactly those of the generated data,
so prompts and answers round-trip through it like text through a BPE tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.studies.reversal.data import write_dataset
from eval.studies.reversal.score import (
    D2N,
    N2D,
    TEST_FILES,
    bleu,
    contained,
    markdown_table,
    metrics_of,
    score_file,
)
from eval.studies.reversal.study import read_tests
from pipeline.configlib import ConfigError
from tests.eval.conftest import run_cli
from tests.trainer.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[4]


# ----------------------------------------------------------------------------- metrics


def test_contained_normalises_case_whitespace_and_edge_punctuation():
    ref = ' the famed poet who wrote the saga "The Iron Reef".'
    assert contained(ref, 'The famed  poet who wrote the saga\n"the iron reef" and more')
    assert contained(" Ada Lovelace", "it was ada lovelace.")
    assert not contained(" Ada Lovelace", "it was ada")
    assert not contained(ref, "the famed poet who wrote the saga")
    assert not contained(" .", "anything")  # an empty reference never matches


def test_bleu_on_hand_examples():
    assert bleu("the cat sat on the mat.", "The cat  sat on the mat.") == pytest.approx(100)
    assert bleu("a b c d", "x y z") == 0
    partial = bleu("the famed poet who wrote the saga", "the famed poet who built a bridge")
    assert 0 < partial < 100
    # 4 of 7 unigrams, 3 of 6 bigrams, 2 of 5 trigrams, 1 of 4 4-grams, no brevity penalty
    assert partial == pytest.approx(100 * (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25, rel=1e-6)


def test_score_file_table_and_metrics():
    n2d = [
        {"completion": " the famed poet.", "answer": "the famed poet and more"},
        {"completion": " the daring pilot.", "answer": "someone else"},
    ]
    d2n = [{"completion": " Ada Lovelace", "answer": "Ada Lovelace"}]
    cells = [
        score_file("arm", "p2d_prompts_test", n2d),
        score_file("arm", "p2d_reverse_prompts_test", d2n),
        score_file("mdm", "p2d_reverse_prompts_test", d2n),
    ]
    assert cells[0].question == N2D and cells[0].direction == "trained"
    assert cells[0].contained == 0.5 and cells[0].n == 2 and 0 < cells[0].bleu < 100
    assert cells[1].question == D2N and cells[1].bleu is None and cells[1].contained == 1
    metrics = metrics_of(cells)
    assert metrics["arm/p2d_prompts_test/contained"] == 0.5
    assert "arm/p2d_reverse_prompts_test/bleu" not in metrics
    assert metrics["mdm/reverse/contained"] == 1
    table = markdown_table(cells)
    assert "| name→description (trained) | `p2d_prompts_test` | 2 | 50.0 |" in table
    assert (
        "| description→name (reverse) | `p2d_reverse_prompts_test` | 1 | 100.0 | - | 100.0 |"
        in (table)
    )


def test_test_files_are_checked_with_file_and_line(tmp_path):
    write_dataset(tmp_path, seed=1, people=2, train_templates=2, test_templates=2)
    tests = read_tests(tmp_path)
    assert set(tests) == set(TEST_FILES) and all(len(v) == 4 for v in tests.values())
    path = tmp_path / "d2p_prompts_test.jsonl"
    path.write_text(path.read_text() + '{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match=r"d2p_prompts_test.jsonl:5: field 'completion'"):
        read_tests(tmp_path)
    (tmp_path / "p2d_reverse_prompts_test.jsonl").unlink()
    with pytest.raises(ConfigError, match="missing p2d_reverse_prompts_test.jsonl"):
        read_tests(tmp_path)


# ----------------------------------------------------------------------------- end to end


def data_words(folder: Path) -> list[str]:
    words = set()
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            words.update(f"{rec['prompt']} {rec['completion']}".split())
    return sorted(words)


def pretrain(root: Path, data: Path) -> dict[str, Path]:
    from trainer.cli import load_train_config
    from trainer.loop import train

    words = data_words(data)
    corpus = make_corpus(root / "corpus", vocab_size=len(words) + 2, seq_len=48, words=words)
    runs = {}
    for obj in ("arm", "mdm"):
        overrides = [
            f"corpus={corpus}", f"objective={obj}", f"run_dir={root / obj}", "steps=2",
            "model=tiny-0.3M", "model_overrides.n_layer=2", "model_overrides.n_head=2",
            "model_overrides.d_model=32", "batch.global_batch=8", "batch.micro_batch=8",
            "tracking.enabled=false", "eval.max_rows=8", "eval.n_samples=2",
        ]  # fmt: skip
        train(load_train_config(str(ROOT / "configs/train/tiny-cpu.yaml"), overrides))
        runs[obj] = root / obj
    return runs


@pytest.mark.slow
def test_study_end_to_end_and_rerun_skips_finished_fine_tunes(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    sizes = ["--seed", "3", "--people", "2", "--train-templates", "2", "--test-templates", "2"]
    write_dataset(tmp_path / "words", 3, 2, 2, 2)  # the same data the study generates
    runs = pretrain(tmp_path / "pre", tmp_path / "words")
    out, uri = tmp_path / "study", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "study", "reverse", "--arm", runs["arm"], "--mdm", runs["mdm"], "--generate", *sizes,
        "--epochs", "2", "--out", out, "--config", ROOT / "configs/train/tiny-cpu.yaml",
        "--steps", "4", "--tracking-uri", uri, "--cfg", "0.5", "batch.global_batch=8",
        "batch.micro_batch=8",
        "checkpoint.every=0", "log.every=1", "optim.warmup_min=1",
    ]  # fmt: skip
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 0, stderr
    assert "| name→description (reverse) | `d2p_reverse_prompts_test` | 4 |" in stdout
    for name in ("table.md", "results.json", "answers.jsonl", "reverse.png", "choices.jsonl"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 12 and results["sampling"]["mdm"]["steps"] == 4
    assert results["sampling"]["mdm-cfg0.5"]["cfg_scale"] == 0.5  # --cfg: MDM with and without
    assert len(results["choices"]) == 12 and "Multiple choice" in stdout
    assert "MDM-CFG0.5 contained %" in stdout and "MDM-CFG0.5 choice %" in stdout
    ranked = [json.loads(x) for x in (out / "choices.jsonl").read_text().splitlines()]
    assert len(ranked) == 3 * 16 and all(1 <= r["rank"] <= r["n_candidates"] for r in ranked)
    assert {r["n_candidates"] for r in ranked} == {2}  # 2 people per group in each file
    assert all(r["width"] == results["choice_widths"][r["file"]] for r in ranked)
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 16
    assert {a["family"] for a in answers} == {"arm", "mdm", "mdm-cfg0.5"}
    sft = {f: json.loads((out / "runs" / f"{f}-sft/summary.json").read_text()) for f in runs}
    assert sft["arm"]["steps"] == sft["mdm"]["steps"] == 4  # ceil(2 epochs * 16 rows / 8)
    cfg = (out / "runs/mdm-sft/config.yaml").read_text()
    assert "target: all" in cfg and "task: sft" in cfg

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("study-reverse")
    by_name = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"arm-sft-reverse", "mdm-sft-reverse", "study-reverse"} <= set(by_name)
    study = by_name["study-reverse"]
    assert "mdm/reverse/contained" in study.data.metrics
    assert "arm/reverse/choice" in study.data.metrics
    assert "mdm-cfg0.5/reverse/choice" in study.data.metrics
    assert "arm/p2d_prompts_test/bleu" in study.data.metrics
    logged = {f.path for f in client.list_artifacts(study.info.run_id)}
    assert {"table.md", "results.json", "reverse.png", "answers.jsonl", "choices.jsonl"} <= logged

    stamps = {f: (out / "runs" / f"{f}-sft/summary.json").stat().st_mtime_ns for f in runs}
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 0, stderr
    assert stderr.count("fine-tune finished already") == 2
    assert stamps == {f: (out / "runs" / f"{f}-sft/summary.json").stat().st_mtime_ns for f in runs}
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == results["cells"]  # temperature 0: the same answers

    more = [x if x != "2" or argv[i - 1] != "--epochs" else "3" for i, x in enumerate(argv)]
    code, stdout, stderr = run_cli(capsys, *more)  # 3 epochs: both continue from their end
    assert code == 0, stderr
    assert stderr.count("extending to 3 epochs") == 2
    for f in runs:
        summary = json.loads((out / "runs" / f"{f}-sft/summary.json").read_text())
        assert summary["steps"] == 6 and len(summary["reschedules"]) == 1  # ceil(3 * 16 / 8)


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    code, _, stderr = run_cli(
        capsys, "study", "reverse", "--arm", tmp_path / "nope", "--mdm", tmp_path,
        "--generate", "--out", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "--arm" in stderr and "no such run directory" in stderr


def test_mdm_epochs_reach_the_mdm_fine_tune_only_and_the_report(tmp_path):
    from eval.studies.reversal.config import ReverseStudyConfig
    from eval.studies.reversal.finetune import sft_command

    (tmp_path / "a").mkdir(), (tmp_path / "m").mkdir()
    runs = {"arm": str(tmp_path / "a"), "mdm": str(tmp_path / "m")}
    cfg = ReverseStudyConfig(**runs, epochs=30, mdm_epochs=100)
    cfg.validate()
    arm = sft_command(cfg, "arm", tmp_path, tmp_path / "arm")
    mdm = sft_command(cfg, "mdm", tmp_path, tmp_path / "mdm")
    assert "sft.epochs=30" in arm and "sft.epochs=100" in mdm
    assert "sft.seq_len=auto" in arm and "sft.target=all" in mdm
    assert cfg.epochs_text() == "ARM 30 / MDM 100 epochs"
    assert ReverseStudyConfig(**runs, epochs=10).epochs_text() == "10 epochs"
    with pytest.raises(ConfigError, match="--mdm-epochs"):
        ReverseStudyConfig(**runs, mdm_epochs=0).validate()


def _finished_run(run_dir: Path, stamp: dict, epochs: float) -> None:
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export/config.json").write_text("{}")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "config.yaml").write_text(f"task: sft\nsft:\n  epochs: {epochs}\n")
    (run_dir / "study_run.json").write_text(json.dumps(stamp))


def test_rerun_plan_skips_extends_or_refuses(tmp_path):
    from eval.studies.reversal.finetune import plan_fine_tune

    stamp = {"train_sha256": "abc", "config": None, "overrides": ["optim.lr=1e-3"]}
    run = tmp_path / "mdm-sft"
    assert plan_fine_tune(run, stamp, 10) == "run"  # nothing there yet
    _finished_run(run, stamp, 10)
    assert plan_fine_tune(run, stamp, 10) == "skip"
    assert plan_fine_tune(run, stamp, 30) == "extend"
    with pytest.raises(ConfigError, match="fine-tuned for 10 epochs, more than 5"):
        plan_fine_tune(run, stamp, 5)
    with pytest.raises(ConfigError, match="another training file"):
        plan_fine_tune(run, {**stamp, "train_sha256": "def"}, 10)
    with pytest.raises(ConfigError, match=r"other settings \(overrides: .*optim.lr=1e-2"):
        plan_fine_tune(run, {**stamp, "overrides": ["optim.lr=1e-2"]}, 10)
    (run / "summary.json").unlink()  # stopped before its end: resumes
    assert plan_fine_tune(run, stamp, 10) == "run"
    (run / "study_run.json").unlink()
    (run / "study_data.sha256").write_text("abc\n")  # an earlier version's stamp
    assert plan_fine_tune(run, {**stamp, "overrides": ["x=1"]}, 20) == "extend"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"steps": 0}, "--steps: must be >= 1"),
        ({"people": 0}, "--people: must be >= 1"),
        ({"length": 0}, "--length: must be >= 1"),
        ({"overrides": ["optim.lr"]}, "key=value"),
        ({"block_length": 0}, "--block-length: must be >= 1"),
        ({"block_length": 6, "length": 36, "steps": 32}, "not a multiple of the blocks"),
        ({"cfg_scale": -0.5}, "--cfg: must be a finite number >= 0"),
        ({"cfg_scale": float("nan")}, "--cfg: must be a finite number >= 0"),
        ({"overrides": ["batch.global_batch=eight"]}, "batch.global_batch: must be an integer"),
    ],
)
def test_study_settings_are_checked_before_any_work(tmp_path, kw, message):
    from eval.studies.reversal.config import ReverseStudyConfig

    cfg = ReverseStudyConfig(arm=str(tmp_path), mdm=str(tmp_path), **kw)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    ReverseStudyConfig(
        arm=str(tmp_path), mdm=str(tmp_path), block_length=6, length=36, steps=36
    ).validate()


def test_fine_tunes_get_the_repository_root_on_their_path():
    from eval.studies.reversal.finetune import ROOT as FT_ROOT

    assert FT_ROOT == ROOT and (FT_ROOT / "pipeline" / "cli.py").is_file()


def test_fine_tunes_default_to_smdms_global_batch_and_an_override_wins(tmp_path):
    from eval.studies.reversal.config import ReverseStudyConfig
    from eval.studies.reversal.finetune import sft_command, study_stamp

    (tmp_path / "a").mkdir(), (tmp_path / "m").mkdir()
    runs = {"arm": str(tmp_path / "a"), "mdm": str(tmp_path / "m")}
    cfg = ReverseStudyConfig(**runs)
    for family in ("arm", "mdm"):
        assert "batch.global_batch=64" in sft_command(cfg, family, tmp_path, tmp_path / family)
    assert cfg.global_batch() == 64 and study_stamp(cfg, "abc")["global_batch"] == 64
    cfg = ReverseStudyConfig(**runs, overrides=["batch.global_batch=8", "optim.lr=1e-2"])
    cmd = sft_command(cfg, "mdm", tmp_path, tmp_path / "mdm")
    assert cmd.index("batch.global_batch=8") > cmd.index("batch.global_batch=64")  # last wins
    assert cfg.global_batch() == 8 and study_stamp(cfg, "abc")["global_batch"] == 8


def test_rerun_refuses_a_fine_tune_made_at_another_global_batch(tmp_path):
    from eval.studies.reversal.finetune import plan_fine_tune

    old = {"train_sha256": "abc", "config": None, "overrides": []}  # before the default of 64
    run = tmp_path / "arm-sft"
    _finished_run(run, old, 10)
    (run / "config.yaml").write_text("sft:\n  epochs: 10\nbatch:\n  global_batch: 16\n")
    asked = {**old, "global_batch": 64}
    with pytest.raises(ConfigError, match="batch.global_batch=16, the study asks for 64"):
        plan_fine_tune(run, asked, 10)
    keep = {**old, "overrides": ["batch.global_batch=16"], "global_batch": 16}
    assert plan_fine_tune(run, keep, 10) == "skip"  # asking for its batch keeps it
    with pytest.raises(ConfigError, match=r"other settings \(overrides"):
        plan_fine_tune(run, {**keep, "overrides": [*keep["overrides"], "optim.lr=1"]}, 10)
    (run / "config.yaml").unlink()  # no saved config yet: the stamp's batch decides
    (run / "study_run.json").write_text(json.dumps(keep))
    with pytest.raises(ConfigError, match="batch.global_batch=16, the study asks for 64"):
        plan_fine_tune(run, asked, 10)


def test_study_reports_the_mdm_with_and_without_guidance(tmp_path, monkeypatch):
    """The whole study with the fine-tunes, models, sampler and scorer stubbed: ``--cfg 0.8``
    samples and scores the MDM at w = 0 and w = 0.8, the ARM once, and reports all three."""
    from types import SimpleNamespace

    from eval.measure.likelihood import LLResult
    from eval.studies.reversal.config import ReverseStudyConfig
    from eval.studies.reversal.study import run_study

    class Words:
        def __init__(self):
            self.vocab: dict[str, int] = {}

        def encode(self, text, add_special_tokens=False):
            return SimpleNamespace(
                ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
            )

        def decode(self, ids):
            return ""

    calls = []

    def sampler(loaded, cfg):
        calls.append(("sample", loaded.family, cfg.cfg_scale))
        return SimpleNamespace(
            generate=lambda prompts, progress: [SimpleNamespace(tokens=[])] * len(prompts)
        )

    def scorer(loaded, cfg):
        calls.append(("score", loaded.family, cfg.cfg_scale))

        def score(pairs, progress):
            return [LLResult(-float(c[0]), False, 0.0, len(c)) for _, c in pairs]

        return SimpleNamespace(loglikelihood=score)

    runs = {f: tmp_path / f for f in ("arm", "mdm")}
    for path in runs.values():
        path.mkdir()
    monkeypatch.setattr("eval.studies.reversal.study.fine_tune", lambda cfg, fam, data: runs[fam])
    monkeypatch.setattr(
        "eval.measure.loading.load_model",
        lambda run, *a: SimpleNamespace(family=run.name, tokenizer=Words(), eos_id=10**6),
    )
    monkeypatch.setattr("eval.generation.sampling.Sampler.from_loaded", sampler)
    monkeypatch.setattr("eval.measure.likelihood.Scorer.from_loaded", scorer)
    cfg = ReverseStudyConfig(
        arm=str(runs["arm"]), mdm=str(runs["mdm"]), out=str(tmp_path / "out"), people=2,
        train_templates=2, test_templates=2, mlflow=False, cfg_scale=0.8,
    )  # fmt: skip
    results = run_study(cfg)
    assert calls == [
        ("sample", "arm", 0.0), ("score", "arm", 0.0), ("sample", "mdm", 0.0),
        ("score", "mdm", 0.0), ("sample", "mdm", 0.8), ("score", "mdm", 0.8),
    ]  # fmt: skip
    names = ["arm", "mdm", "mdm-cfg0.8"]
    assert list(results["sampling"]) == names
    assert results["sampling"]["mdm-cfg0.8"]["cfg_scale"] == 0.8
    assert [c["family"] for c in results["cells"][::4]] == names
    assert [c["family"] for c in results["choices"][::4]] == names
    for name in names:
        assert f"{name}/reverse/contained" in results["metrics"]
        assert f"{name}/reverse/choice" in results["metrics"]
    table = (tmp_path / "out/table.md").read_text()
    assert "| MDM contained % | MDM BLEU | MDM-CFG0.8 contained % |" in table
    assert "| MDM choice % | MDM mean rank | MDM p | MDM-CFG0.8 choice % |" in table
    assert "CFG w=0.8" in table and "guidance w = 0.8" in table
    assert set(results["choice_widths"]) == set(TEST_FILES)
    ranked = [json.loads(x) for x in (tmp_path / "out/choices.jsonl").read_text().splitlines()]
    assert {r["family"] for r in ranked} == set(names)
    calls.clear()
    run_study(ReverseStudyConfig(**{**cfg.__dict__, "cfg_scale": 0.0}))
    assert [c[2] for c in calls] == [0.0] * 4  # the default: each family once, unguided
