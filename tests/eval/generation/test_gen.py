"""``maskscale eval gen``: quality vs speed per MDM step count, judged by an ARM run.

Runs: the harness tests' tiny Transformers trained on ramps (``w3 w5 w7 ...``): an ARM (the
judge, and an ARM run to evaluate) and an MDM, in the export format with a real MLflow sqlite
store. The command runs in this process through ``maskscale``'s own parser; no mocks.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from eval.generation.gen import GenConfig, distinct_n, judge_scores, read_prompts
from eval.generation.sampling import Sample
from eval.measure.likelihood import Scorer
from eval.measure.loading import EvalError, load_model
from tests.eval.conftest import run_cli
from tests.eval.runs import make_run
from tests.trainer.conftest import make_corpus

QUESTIONS = [
    {"question_id": 81, "category": "ramps", "turns": ["w3 w5 w7", "a second turn"]},
    {"question_id": 82, "category": "ramps", "turns": ["w10 w11 w12"]},
    {"question_id": 83, "category": "ramps", "turns": ["w2 w5 w8 w11"]},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    corpus = make_corpus(base / "corpus", vocab_size=32, seq_len=16, splits={"train": 8})
    uri = f"sqlite:///{base / 'mlflow.db'}"
    return {
        "arm": make_run(base / "arm", "arm", 100, corpus, uri),
        "mdm": make_run(base / "mdm", "mdm", 200, corpus, uri),
        "uri": uri,
    }


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_distinct_n_on_a_hand_example():
    answers = [["a", "b", "a"], ["a", "b"], []]
    assert distinct_n(answers, 1) == pytest.approx(2 / 5)  # {a, b} of a b a a b
    assert distinct_n(answers, 2) == pytest.approx(2 / 3)  # {ab, ba} of ab ba ab
    assert distinct_n([["x", "y"], ["z"]], 2) == 1.0  # n-grams never span two answers
    assert math.isnan(distinct_n([["x"]], 2))


def test_prompt_layouts_and_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "w3 w4"}, QUESTIONS[0], {"prompt": "", "question_id": "q"}])
    got = read_prompts(path)
    assert [(p.question_id, p.text, p.category) for p in got] == [
        (1, "w3 w4", None),
        (81, "w3 w5 w7", "ramps"),  # MT-Bench layout: the first turn
        ("q", "", None),
    ]
    cases = [  # (file text, line named, message)
        ('{"prompt": "w3"}\n\n{"prompt": 3}\n', 3, "field 'prompt' must be a string"),
        ('{"prompt": "w3"}\n{"text": "w4"}\n', 2, "no 'prompt' field and no 'turns'"),
        ('{"question_id": 1, "turns": []}\n', 1, "field 'turns' must be a non-empty list"),
        ('{"turns": ["w3"]}\n', 1, "MT-Bench question without 'question_id'"),
        ("{oops\n", 1, "not valid JSON"),
        ('{"prompt": "a", "question_id": 7}\n{"prompt": "b", "question_id": 7}\n', 2,
         "question_id 7 repeats line 1"),
    ]  # fmt: skip
    for text, line, message in cases:
        path.write_text(text)
        with pytest.raises(EvalError) as e:
            read_prompts(path)
        assert str(e.value).startswith(f"{path}:{line}: {message}")
    assert GenConfig(length=64).step_counts() == [8, 16, 32, 64]
    assert GenConfig(steps=[32, 8, 8]).step_counts() == [8, 32]


def test_mdm_steps_table_judge_ppl_mtbench_files_and_mlflow(runs, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "eval", "gen", runs["mdm"], "--prompts", prompts, "--steps", "4,2",
        "--length", 6, "--batch-size", 2, "--judge", runs["arm"], "--device", "cpu",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "| steps | s/answer" in stdout and "gen" in err  # table; progress bar on stderr
    report = json.loads((out / "gen.json").read_text())
    points = report["points"]
    assert [p["steps"] for p in points] == [2, 4] and report["judge"] == "arm"
    for p in points:
        assert p["answers"] == 3 and p["batches_timed"] == 2 and p["sec_per_answer"] > 0
        assert math.isfinite(p["judge_ppl"]) and p["judge_ppl"] > 1
        assert 0 < p["distinct_1"] <= 1 and 0 < p["distinct_2"] <= 1
    md = (out / "gen.md").read_text()
    assert md.count("\n| 2 |") == 1 and md.count("\n| 4 |") == 1
    assert (out / "gen.png").stat().st_size > 1000

    # judge ppl = exp(-sum log p / tokens), each log p the ARM's exact likelihood
    mdm, arm = load_model(runs["mdm"], device="cpu"), load_model(runs["arm"], device="cpu")
    p = points[0]
    prompt = mdm.tokenizer.encode(QUESTIONS[0]["turns"][0], add_special_tokens=False).ids
    answer = mdm.tokenizer.encode(p["answer_texts"][0], add_special_tokens=False).ids
    direct = Scorer.from_loaded(arm).loglikelihood([(prompt, answer)])[0]
    assert len(answer) == p["answer_tokens"][0] > 0
    assert p["judge_logprob"][0] == pytest.approx(direct.logprob, rel=1e-5)
    nll = -sum(p["judge_logprob"]) / sum(p["answer_tokens"])
    assert p["judge_ppl"] == pytest.approx(math.exp(nll))

    # MT-Bench answer files, one per step count, in FastChat's layout
    files = sorted((out / "model_answer").glob("*.jsonl"))
    assert [f.name for f in files] == ["mdm-steps2.jsonl", "mdm-steps4.jsonl"]
    for f, point in zip(files, points, strict=True):
        records = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["question_id"] for r in records] == [81, 82, 83]
        for r, text in zip(records, point["answer_texts"], strict=True):
            assert set(r) >= {"question_id", "answer_id", "model_id", "choices", "tstamp"}
            assert r["model_id"] == f.stem and r["category"] == "ramps"
            assert r["choices"] == [{"index": 0, "turns": [text]}]
            assert isinstance(r["tstamp"], float) and r["answer_id"]

    from mlflow.tracking import MlflowClient

    run_id = (runs["mdm"] / "mlflow_run_id").read_text().strip()
    run = MlflowClient(tracking_uri=runs["uri"]).get_run(run_id)
    assert run.data.metrics["eval/gen/s2/judge_ppl"] == pytest.approx(points[0]["judge_ppl"])
    assert "eval/gen/s4/distinct_2" in run.data.metrics
    artifacts = {
        a.path for a in MlflowClient(tracking_uri=runs["uri"]).list_artifacts(run_id, "eval")
    }
    assert {"eval/gen.png", "eval/gen.md", "eval/mdm-steps2.jsonl"} <= artifacts


def test_arm_run_is_one_kv_cache_pass(runs, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w3 w5 w7"}, {"prompt": "w20"}])
    code, stdout, err = run_cli(
        capsys, "eval", "gen", runs["arm"], "--prompts", prompts, "--steps", "2,4",
        "--length", 4, "--device", "cpu", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, err
    assert "ARM run: --steps does not apply" in err
    report = json.loads((tmp_path / "out" / "gen.json").read_text())
    [point] = report["points"]
    assert point["steps"] is None and point["model_id"] == "arm" and point["judge_ppl"] is None
    assert point["answer_texts"][0] == "w9 w11 w13 w15"  # the ARM continues the ramp
    assert "one KV-cache pass" in stdout and "| ARM |" in stdout
    records = (tmp_path / "out" / "model_answer" / "arm.jsonl").read_text().splitlines()
    assert [json.loads(r)["question_id"] for r in records] == [1, 2]


def test_user_errors_exit_2_before_sampling(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w3"}\n{"turns": "w4", "question_id": 2}\n')
    code, _, err = run_cli(capsys, "eval", "gen", runs["mdm"], "--prompts", bad)
    assert code == 2 and f"{bad}:2: field 'turns' must be a non-empty list" in err
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "w3"}])
    args = ("eval", "gen", runs["mdm"], "--prompts", good, "--device", "cpu", "--length", 4)
    code, _, err = run_cli(capsys, *args, "--judge", runs["mdm"])
    assert code == 2 and "the judge must be an ARM run" in err
    code, _, err = run_cli(capsys, *args, "--steps", "4,x")
    assert code == 2 and "comma-separated integers" in err
    code, _, err = run_cli(capsys, "eval", "gen", runs["mdm"], "--prompts", good, "--length", 40)
    assert code == 2 and "at most 31 new tokens" in err
    assert not (runs["mdm"] / "eval" / "gen").exists()


def test_judge_retokenises_text_when_tokenizers_differ(runs):
    mdm, arm = load_model(runs["mdm"], device="cpu"), load_model(runs["arm"], device="cpu")
    samples = [Sample([9, 11], False, 0), Sample([], True, 0)]
    prompts = [[3, 5, 7], [4]]
    texts = [("w3 w5 w7", "w9 w11"), ("w4", "")]
    same = judge_scores(arm, mdm, prompts, samples, texts)
    other = dataclasses.replace(arm, tokenizer_sha256="another tokenizer")
    assert judge_scores(other, mdm, prompts, samples, texts) == same
    assert same[1] == [2, 0] and same[0][1] == 0.0 and same[0][0] < 0
