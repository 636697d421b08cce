"""The real lm-evaluation-harness, offline, on maskscale runs; the mc and cloze commands.

The runs are built here: a tiny causal Transformer *trained* (100 CPU steps, ~1 s) on arithmetic
sequences of word tokens (``w3 w5 w7 ...``, the trainer fixtures' "ramp" rows), so a correct
pipeline must score ~100% on the local ramp tasks under tests/eval/assets/; and a random-weight
bidirectional MDM for the estimator / CFG plumbing. Each run directory looks like a trained one:
``export/`` in the format of trainer.checkpoint.export_checkpoint, ``config.yaml`` (corpus,
tracking) and an MLflow run in a real sqlite store. No mocks, no network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval.measure.likelihood import LikelihoodConfig, Scorer
from eval.measure.loading import EvalError, load_model
from eval.zeroshot.harness import (
    MaskscaleLM,
    PaperTasks,
    check_harness_version,
    flat_metrics,
    group_tasks,
    load_paper_tasks,
)
from eval.zeroshot.text import ModelArgs, TextScorer, likelihood_config
from tests.eval.runs import T, V, cloze_words, make_run
from tests.trainer.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[3]
ASSETS = "tests/eval/assets"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the asset YAMLs name their JSONL relative to the repo root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("harness")
    splits = {"train": 8, "validation": 24, "holdout_2001": 24, "holdout_1999": 16}
    corpus = make_corpus(base / "corpus", vocab_size=V, seq_len=T, splits=splits, kind="ramp")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    # the same ramps spelled in letter words, years and letters+digits: the cloze task's world
    words = cloze_words(V)
    letters = make_corpus(base / "letters", vocab_size=V, seq_len=T, splits=splits, kind="ramp",
                          words=words)  # fmt: skip
    return {
        "corpus": corpus,
        "uri": uri,
        "arm": make_run(base / "arm", "arm", 100, corpus, uri),
        "mdm": make_run(base / "mdm", "mdm", 0, corpus, uri),
        "arm_letters": make_run(base / "arm_letters", "arm", 100, letters, uri, words),
    }


def cli(*argv) -> int:
    """``maskscale eval ...`` in this process."""
    from pipeline.cli import main

    return main(["eval", *map(str, argv)])


def mlflow_metrics(run_dir: Path, uri: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics


# ----------------------------------------------------------------------------- the harness


def test_harness_runs_local_tasks_offline_end_to_end(world, capsys):
    arm = world["arm"]
    tasks = "ramp_mc,ramp_next,ramp_rolling"
    assert cli("harness", arm, "--include-path", ASSETS, "--tasks", tasks) == 0
    out = capsys.readouterr().out
    assert "|ramp_mc" in out and "acc_norm" in out and "word_perplexity" in out
    path = arm / "eval" / "harness-ramp_mc+ramp_next+ramp_rolling.json"
    results = json.loads(path.read_text())["results"]
    # the trained model continues every sequence correctly: multiple choice and greedy last word
    assert results["ramp_mc"]["acc,none"] == 1.0 and results["ramp_mc"]["acc_norm,none"] == 1.0
    assert results["ramp_next"]["acc,none"] == 1.0
    assert 1.0 <= results["ramp_next"]["perplexity,none"] < 1.5

    # loglikelihood_rolling: word perplexity = exp(-sum of log p / words), computed directly
    loaded = load_model(arm, device="cpu")
    text = TextScorer(loaded, ModelArgs())
    docs = [json.loads(x) for x in (ROOT / ASSETS / "ramp_next.jsonl").read_text().splitlines()]
    ll = sum(text.loglikelihood_rolling(d["context"]) for d in docs)
    words = sum(len(d["context"].split()) for d in docs)
    assert results["ramp_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-ll / words))

    metrics = mlflow_metrics(arm, world["uri"])
    assert metrics["eval/harness/ramp_mc/acc"] == 1.0
    assert "eval/harness/ramp_rolling/word_perplexity" in metrics

    # the direct multiple-choice runner splits pairs the same way: identical scores
    assert cli("mc", arm, f"{ASSETS}/ramp_mc.jsonl") == 0
    direct = json.loads((arm / "eval" / "mc-ramp_mc.json").read_text())
    assert (direct["acc"], direct["acc_norm"], direct["n"]) == (1.0, 1.0, 8)
    assert mlflow_metrics(arm, world["uri"])["eval/mc/ramp_mc/acc"] == 1.0


def test_mdm_model_by_registered_name_with_estimator_and_cfg(world):
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from eval.zeroshot.harness import task_manager

    mdm = world["mdm"]
    loaded = load_model(mdm, device="cpu")
    pairs = [("w3 w5 w7", " w9"), ("w4", " w5 w6"), ("", " w7 w8")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = {}
    for est, cfg in (("chain_rule", 0.0), ("chain_rule", 0.5), ("mc", 0.0)):
        lm = MaskscaleLM(loaded=loaded, estimator=est, cfg=cfg, mc_samples=16)
        got[est, cfg] = lm.loglikelihood(reqs)
        # same numbers as the Scorer called directly on the harness's token split
        args = ModelArgs(estimator=est, cfg=cfg, mc_samples=16)
        scorer = Scorer.from_loaded(loaded, likelihood_config(loaded, args))
        direct = scorer.loglikelihood(TextScorer(loaded, args).encode(pairs))
        assert got[est, cfg] == [(r.logprob, r.is_greedy) for r in direct]
    assert got["chain_rule", 0.0] != got["chain_rule", 0.5] != got["mc", 0.0]
    assert lm.loglikelihood(reqs) == got["mc", 0.0]  # seeded

    with pytest.raises(EvalError, match="MDM run"):
        get_model("maskscale-arm")(loaded=loaded)
    # the registered name through lm_eval itself (model args as the harness passes them)
    res = lm_eval.simple_evaluate(
        model="maskscale-mdm",
        model_args=f"path={mdm},estimator=chain_rule,cfg=0.5,device=cpu",
        tasks=["ramp_mc"],
        task_manager=task_manager(ASSETS, ["ramp_mc"]),
        limit=2,
        batch_size=4,
    )
    assert res["results"]["ramp_mc"]["sample_len"] == 2


def test_mc_weighting_model_arg_and_eps_from_the_run(world, tmp_path):
    """mc_weighting reaches the Scorer (fixed_count by default); the 1/t form's eps is the
    run's mdm.eps from its config.yaml; a bad value names the model arg."""
    import shutil

    import yaml

    run = shutil.copytree(world["mdm"], tmp_path / "mdm")
    conf = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**conf, "mdm": {"eps": 0.25}}))
    loaded = load_model(run, device="cpu")
    cfg = MaskscaleLM(loaded=loaded, mc_weighting="inverse_t", mc_samples=8).text.scorer.cfg
    assert (cfg.estimator, cfg.mc_weighting, cfg.eps) == ("mc", "inverse_t", 0.25)
    assert MaskscaleLM(loaded=loaded).text.scorer.cfg.mc_weighting == "fixed_count"
    with pytest.raises(EvalError, match="model arg mc_weighting='1/t'"):
        MaskscaleLM(loaded=loaded, mc_weighting="1/t")


def test_generate_until_task_through_the_samplers(world, tmp_path, capsys):
    """ramp_generate: 2 new tokens cut at the first space; the trained ARM gets them all."""
    out = tmp_path / "gen.json"
    args = ["--include-path", ASSETS, "--tasks", "ramp_generate", "--no-mlflow", "--out", out]
    assert cli("harness", world["arm"], *args) == 0
    assert json.loads(out.read_text())["results"]["ramp_generate"]["exact_match,none"] == 1.0
    assert cli("harness", world["mdm"], *args, "--model-args", "steps=1,strategy=random") == 0
    assert "ramp_generate" in json.loads(out.read_text())["results"]


def test_user_errors_exit_2_and_write_nothing(world, tmp_path, capsys):
    arm = world["arm"]
    before = set((arm / "eval").glob("*")) if (arm / "eval").exists() else set()
    assert cli("harness", arm, "--tasks", "ramp_mc", "--model-args", "temperature=1") == 2
    assert "unknown model arg" in capsys.readouterr().err
    # unknown task: refused before the (missing) model is even looked at
    assert cli("harness", tmp_path / "no-run", "--include-path", ASSETS, "--tasks", "nope") == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    # a hub dataset offline: says how to get it
    hub = tmp_path / "hub"
    hub.mkdir()
    text = (ROOT / ASSETS / "ramp_mc.yaml").read_text()
    text = text.replace("dataset_path: json", "dataset_path: maskscale-tests/not-cached")
    (hub / "hub.yaml").write_text(text.replace("task: ramp_mc", "task: hub_mc"))
    assert cli("harness", arm, "--include-path", hub, "--tasks", "hub_mc") == 2
    assert "not available offline" in capsys.readouterr().err
    # a bad multiple-choice line: file, line and field
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "w2", "choices": ["w3", "w4"], "label": 0}\n{"context": "w2"}\n')
    assert cli("mc", arm, bad) == 2
    assert f"{bad}:2: field 'choices' is missing" in capsys.readouterr().err
    after = set((arm / "eval").glob("*")) if (arm / "eval").exists() else set()
    assert after == before


def test_paper_tasks_file_and_grouping_by_model_args():
    paper = load_paper_tasks()
    by_task = {c.task: c for c in paper.tasks}
    chain = {t for t, c in by_task.items() if c.estimator == "chain_rule"}
    assert chain == {"lambada_standard", "openbookqa", "boolq", "piqa"}
    assert {t for t, c in by_task.items() if c.estimator == "mc"} == {
        "arc_easy", "social_iqa", "race", "hellaswag"
    }  # fmt: skip
    assert all(0.6 <= c.cfg <= 1.6 for c in paper.tasks) and paper.mc_samples == 1024
    groups = group_tasks(paper.tasks, "mdm", {}, paper.mc_samples)
    assert sorted(sorted(tasks) for tasks, _ in groups) == [
        ["arc_easy", "social_iqa"], ["boolq", "openbookqa"], ["hellaswag", "race"],
        ["lambada_standard"], ["piqa"],
    ]  # fmt: skip
    lambada = next(args for tasks, args in groups if tasks == ["lambada_standard"])
    assert lambada == {"estimator": "chain_rule", "cfg": 1.1, "mc_samples": 1024, "greedy": True}
    assert all(not a["greedy"] for tasks, a in groups if tasks != ["lambada_standard"])
    # --model-args win over the file; an ARM is exact, so one group
    quick = group_tasks(paper.tasks, "mdm", {"mc_samples": 128, "cfg": 0.0}, 1024)
    assert len(quick) == 3 and all(a["mc_samples"] == 128 and a["cfg"] == 0.0 for _, a in quick)
    assert group_tasks(paper.tasks, "arm", {}, 1024) == [([c.task for c in paper.tasks], {})]
    assert isinstance(paper, PaperTasks)


# ----------------------------------------------------------------------------- cloze


def test_cloze_accuracy_per_period_direct_and_through_the_harness(world, capsys):
    arm, uri = world["arm_letters"], world["uri"]
    # perplexities of `maskscale eval ppl` in the same folder go next to accuracy in the plot
    ppl = {"validation": 1.5, "holdout_1999": 1.6, "holdout_2001": 1.7}
    (arm / "eval").mkdir(exist_ok=True)
    (arm / "eval" / "ppl.json").write_text(
        json.dumps({"splits": {s: {"ppl": v} for s, v in ppl.items()}})
    )
    argv = ["--n", 8, "--words", 5, "--min-target-chars", 2, "--numbers", "--bootstrap", 200]
    assert cli("cloze", arm, *argv) == 0
    report = json.loads((arm / "eval" / "cloze-results.json").read_text())
    splits, numbers = report["splits"], report["numbers"]
    assert report["ppl"] == ppl and report["bootstrap"] == 200 and report["guided"] is False
    assert list(splits) == list(numbers) == ["validation", "holdout_1999", "holdout_2001"]
    for split, r in splits.items():
        assert r["n"] == 8 and r["acc"] >= 0.75  # the model learned the ramps
        # intervals over documents: passages of one document are not independent draws
        assert 1 <= r["documents"] <= r["n"] and r["resampled"] == "documents"
        if r["documents"] >= 5:
            assert r["acc_ci_reason"] is None and r["acc_ci"][0] <= r["acc"] <= r["acc_ci"][1]
        else:
            assert r["acc_ci_reason"].startswith("too few documents")
        assert r["reference"] == "validation"
        assert (r["acc_delta"] is None) == (split == "validation")
        # counts: word passages and, apart, number passages of the same rows
        build = report["build"]["splits"][split]
        assert build["passages"] == 8 and numbers[split]["n"] == build["number_passages"] > 0
    docs = [json.loads(x) for x in (arm / "eval" / "cloze" / "temporal_cloze_validation.jsonl")
            .read_text().splitlines()]  # fmt: skip
    assert all(d["target"].isalpha() for d in docs)
    assert (arm / "eval" / "cloze.png").read_bytes()[:4] == b"\x89PNG"
    metrics = mlflow_metrics(arm, uri)
    assert metrics["eval/cloze/holdout_1999/acc"] == splits["holdout_1999"]["acc"]
    assert metrics["eval/cloze/holdout_1999/documents"] == splits["holdout_1999"]["documents"]
    for split in ("holdout_1999", "holdout_2001"):
        if splits[split]["acc_delta_ci_reason"] is None:
            lo = splits[split]["acc_delta_ci"][0]
            assert metrics[f"eval/cloze/{split}/acc_delta_lo"] == lo
        else:  # no interval: no bound logged (NaN is never sent)
            assert f"eval/cloze/{split}/acc_delta_lo" not in metrics
    assert "eval/cloze_numbers/validation/acc" in metrics
    out = capsys.readouterr().out
    assert "holdout_2001" in out and "--include-path" in out and "number targets" in out

    # the same task files through the real harness: the same accuracies
    task_dir = arm / "eval" / "cloze"
    assert cli("harness", arm, "--include-path", task_dir, "--tasks", "temporal_cloze") == 0
    harness = json.loads((arm / "eval" / "harness-temporal_cloze.json").read_text())["results"]
    assert set(harness) == {f"temporal_cloze_{s}" for s in splits}  # the numbers are apart
    for split, r in splits.items():
        assert harness[f"temporal_cloze_{split}"]["acc,none"] == pytest.approx(r["acc"])


# ----------------------------------------------------------------------------- data parallel


@pytest.mark.slow
def test_harness_under_torchrun_matches_one_process(world, tmp_path):
    """2 CPU processes (gloo): requests sharded by rank, gathered on rank 0, same results."""
    import os
    import subprocess
    import sys

    arm = world["arm"]
    tasks = ["--include-path", ASSETS, "--tasks", "ramp_mc,ramp_next,ramp_rolling", "--no-mlflow"]
    assert cli("harness", arm, *tasks, "--out", tmp_path / "one.json") == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "pipeline.cli", "eval", "harness", str(arm), *tasks, "--out", str(tmp_path / "two.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1  # only rank 0 reports
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    for task, metrics in one.items():
        assert two[task]["sample_len"] == metrics["sample_len"] == 8
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:  # bootstrap stderrs resample
                assert two[task][key] == pytest.approx(value, rel=1e-6), (task, key)


# ----------------------------------------------------------------------------- like the harness


def test_lm_eval_pin_is_the_first_release_without_lm_accelerator(world):
    """0.4.11 and older call lm.accelerator under data parallelism: pinned out and refused."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "lm-eval"]
    assert "0.4.11" not in spec and "0.4.12" in spec and "0.5.0" not in spec
    assert version("lm_eval") in spec
    check_harness_version(version("lm_eval"))
    with pytest.raises(EvalError, match=r"lm-eval 0.4.8 is older than 0.4.12.*pip install"):
        check_harness_version("0.4.8")
    lm = MaskscaleLM(loaded=load_model(world["arm"], device="cpu"))
    assert lm.device == lm.loaded.device and (lm.rank, lm.world_size) == (0, 1)


def test_batch_size_string_of_the_lm_eval_command_line_is_honoured(world):
    loaded = load_model(world["arm"], device="cpu")
    path = f"path={world['arm']},device=cpu"
    extra = {"max_batch_size": None, "device": None}
    lm = MaskscaleLM.create_from_arg_string(path, {"batch_size": "8", **extra})
    assert lm.args.batch_size == 8 and lm.text.scorer.cfg.token_budget == 8 * loaded.seq_len
    for auto in ("auto", "auto:4"):  # the token budget rules
        lm = MaskscaleLM.create_from_arg_string(path, {"batch_size": auto, **extra})
        assert lm.args.batch_size is None
        assert (
            lm.text.scorer.cfg.token_budget == likelihood_config(loaded, ModelArgs()).token_budget
        )
    with pytest.raises(EvalError, match="batch_size='eight'"):
        MaskscaleLM.create_from_arg_string(path, {"batch_size": "eight", **extra})


def test_generate_until_with_block_length_and_an_eos_before_the_prompt(world):
    from lm_eval.api.instance import Instance

    from eval.generation.sampling import Sampler, SamplingConfig

    loaded = load_model(world["mdm"], device="cpu")
    reqs = [("w3 w5 w7", {"max_gen_toks": 6}), ("w4", {"max_gen_toks": 5})]
    instances = [Instance("generate_until", {}, r, i) for i, r in enumerate(reqs)]
    lm = MaskscaleLM(loaded=loaded, block_length=2, strategy="random", seed=3)
    out = lm.generate_until(instances)
    # the same as the sampler in blocks of 2, on the prompt after the EOS (id 0); without
    # steps, L rounded up to a multiple of the block count (5 slots: 3 blocks, 6 steps)
    for (prompt, length, steps), got in zip(([[0, 3, 5, 7], 6, 6], [[0, 4], 5, 6]), out):
        cfg = SamplingConfig(length=length, steps=steps, strategy="random", seed=3, block_length=2)
        direct = Sampler.from_loaded(loaded, cfg).generate([prompt])[0]
        assert got == loaded.tokenizer.decode(direct.tokens)
    plain = MaskscaleLM(loaded=loaded, strategy="random", seed=3).generate_until(instances)
    assert plain != out
    with pytest.raises(EvalError, match="block_length"):
        MaskscaleLM(loaded=loaded, block_length=0)
    with pytest.raises(EvalError, match="steps / block_length.*multiple"):
        MaskscaleLM(loaded=loaded, block_length=2, steps=4).generate_until(instances[:1])


def test_every_context_follows_an_eos_and_an_empty_continuation_is_scored(world):
    from lm_eval.api.instance import Instance

    for family in ("arm", "mdm"):
        loaded = load_model(world[family], device="cpu")
        args = ModelArgs(estimator="chain_rule")
        scorer = Scorer.from_loaded(loaded, likelihood_config(loaded, args))
        lm = MaskscaleLM(loaded=loaded, estimator="chain_rule")
        pairs = [("w3 w5 w7", " w9"), ("w3 w5 w7", ""), ("<|endoftext|> w4", " w5"), ("", "w6")]
        got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
        # an empty continuation scores the context's last token, like any other request
        ids = [([0, 3, 5, 7], [9]), ([0, 3, 5], [7]), ([0, 4], [5]), ([0], [6])]
        assert got == [(r.logprob, r.is_greedy) for r in scorer.loglikelihood(ids)]

        # whole texts: after the document's EOS, each token scored once
        n = loaded.seq_len
        tokens = [(3 * i) % V for i in range(1, 2 * n + 4)]
        text = " ".join(loaded.tokenizer.id_to_token(t) for t in tokens)
        rolling = TextScorer(loaded, ModelArgs(mc_samples=8)).loglikelihood_rolling(text)
        if family == "arm":
            assert rolling == pytest.approx(scorer.loglikelihood_rolling(tokens).logprob)
            first = scorer.loglikelihood([([0], tokens[:n])])[0].logprob
            assert first == pytest.approx(scorer.loglikelihood_rolling(tokens[:n]).logprob)
        else:  # the first window has the EOS as context, the others none
            mc = Scorer.from_loaded(
                loaded, LikelihoodConfig(mc_samples=8, greedy=False, mc_weighting="inverse_t")
            )
            windows = [([0], tokens[: n - 1]), ([], tokens[n - 1 : 2 * n - 1])]
            windows.append(([], tokens[2 * n - 1 :]))
            assert rolling == pytest.approx(sum(r.logprob for r in mc.loglikelihood(windows)))
        assert TextScorer(loaded, args).loglikelihood_rolling("") == 0.0  # like the harness


def test_no_perplexity_passes_for_the_model_s_under_cfg(world, tmp_path):
    from lm_eval.api.instance import Instance

    mdm = world["mdm"]
    loaded = load_model(mdm, device="cpu")
    lm = MaskscaleLM(loaded=loaded, cfg=0.5)
    with pytest.raises(EvalError, match="cfg=0.5.*perplexity"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("w3 w5",), 0)])
    # the harness's perplexity of guided log-likelihoods is relabelled cfg_perplexity
    out = tmp_path / "r.json"
    base = ["--include-path", ASSETS, "--tasks", "ramp_next", "--limit", 2, "--no-mlflow"]
    margs = "estimator=chain_rule,greedy=false"
    assert cli("harness", mdm, *base, "--out", out, "--model-args", margs + ",cfg=0.5") == 0
    res = json.loads(out.read_text())
    assert "perplexity,none" not in res["results"]["ramp_next"]
    assert "cfg_perplexity,none" in res["results"]["ramp_next"]
    assert res["higher_is_better"]["ramp_next"]["cfg_perplexity"] is False
    assert res["maskscale"]["groups"][0]["cfg_metrics"] == ["ramp_next/perplexity"]
    assert flat_metrics(res).keys() >= {"eval/harness/ramp_next/cfg_perplexity"}
    assert cli("harness", mdm, *base, "--out", out, "--model-args", margs) == 0
    assert "perplexity,none" in json.loads(out.read_text())["results"]["ramp_next"]
    # rolling tasks under CFG: refused, exit 2
    rolling = ["--include-path", ASSETS, "--tasks", "ramp_rolling", "--limit", 1, "--no-mlflow"]
    assert cli("harness", mdm, *rolling, "--out", out, "--model-args", "cfg=0.5") == 2


def test_mc_and_cloze_commands_take_the_mc_weighting(world, tmp_path):
    """``--mc-weighting`` reaches the scorer of ``eval mc`` (and ``eval cloze``, which shares
    the options): recorded in the results, and the 1/t form gives other MDM scores."""
    mdm = world["mdm"]
    got = {}
    for weighting in ("fixed_count", "inverse_t"):
        out = tmp_path / f"{weighting}.json"
        argv = ["--estimator", "mc", "--mc-samples", 8, "--mc-weighting", weighting]
        assert cli("mc", mdm, f"{ASSETS}/ramp_mc.jsonl", *argv, "--out", out, "--no-mlflow") == 0
        got[weighting] = json.loads(out.read_text())
        assert got[weighting]["model_args"]["mc_weighting"] == weighting
    assert got["fixed_count"]["acc"] is not None
    lls = [[d["ll"] for d in got[w]["docs"]] for w in ("fixed_count", "inverse_t")]
    assert len(lls[0]) == 8 and lls[0] != lls[1]


def test_an_export_alone_carries_the_run_s_mdm_eps(world, tmp_path):
    """config.json of an export records mdm.eps (tests/trainer/test_train.py checks the
    trainer writes it), so an export copied without its run scores the 1/t ELBO with the floor
    it was trained with."""
    import shutil

    run = world["mdm"]
    info = json.loads((run / "export" / "config.json").read_text())
    alone = shutil.copytree(run / "export", tmp_path / "export")
    (alone / "config.json").write_text(json.dumps({**info, "mdm_eps": 0.3}))
    assert load_model(alone, device="cpu", weights=False).mdm_eps == 0.3
