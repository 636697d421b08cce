"""The samplers (``sampling``), ``maskscale sample`` and the harness's ``generate_until``.

Models: the harness tests' tiny Transformers trained on ramps (``w3 w5 w7 ...``, vocab 32 with
id 0 = EOS, so a ramp that wraps past w31 continues with EOS): an ARM (100 steps, continues
ramps exactly) and an MDM (1000 steps, new masks each step). Run directories in the export format, no
mocks.
"""

from __future__ import annotations

import json

import pytest
import torch

from eval.generation.kv_cache import OutputHead
from eval.generation.sampling import Sampler, SamplingConfig, log_confidence, pick_tokens
from eval.measure.loading import load_model
from eval.zeroshot.harness import MaskscaleLM
from pipeline.configlib import ConfigError
from tests.eval.runs import make_run
from tests.trainer.conftest import make_corpus

V, MASK, EOS = 32, 32, 0
PROMPTS = [[3, 5, 7, 9], [10, 11, 12], [], [2, 5, 8, 11, 14, 17, 20], [28, 29, 30]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories (export format) of the two trained models."""
    base = tmp_path_factory.mktemp("sample")
    corpus = make_corpus(base / "corpus", vocab_size=V, seq_len=16, splits={"train": 8})
    uri = f"sqlite:///{base / 'mlflow.db'}"
    return {
        "arm": make_run(base / "arm", "arm", 100, corpus, uri),
        "mdm": make_run(base / "mdm", "mdm", 1000, corpus, uri),
    }


@pytest.fixture(scope="module")
def models(runs):
    return {family: load_model(runs[family], device="cpu").model for family in runs}


def sampler(model, **kw) -> Sampler:
    return Sampler(model, causal=model.causal, mask_id=MASK, eos_id=EOS, cfg=SamplingConfig(**kw))


def one_by_one(model, prompts, **kw):
    return [sampler(model, **kw).generate([p])[0] for p in prompts]


def test_gumbel_max_samples_the_softmax_and_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(pick_tokens(logits * 2, 2.0, 1.0, g), minlength=4) / 20000
    assert torch.allclose(freq, probs, atol=0.015)  # temperature 2 on 2 x logits: the softmax
    nucleus = torch.bincount(pick_tokens(logits, 1.0, 0.7, g), minlength=4) / 20000
    assert nucleus[2:].sum() == 0 and torch.allclose(
        nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.015
    )
    assert pick_tokens(logits[:3], 1.0, 0.1, g).tolist() == [0, 0, 0]
    assert pick_tokens(torch.tensor([[0.0, 3.0, 3.0]]), 0.0, 1.0, None).tolist() == [1]


def test_log_confidence_is_the_log_softmax_of_the_chosen_token():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    want = logits.log_softmax(dim=-1)
    greedy = logits.argmax(dim=-1)
    got = log_confidence(logits.clone(), greedy, greedy=True)
    assert torch.allclose(got, want.gather(1, greedy[:, None])[:, 0], atol=1e-6)
    other = torch.tensor([0, 5, 7, 9, 11, 49])  # not the argmax: needs the row maximum
    got = log_confidence(logits.clone(), other, greedy=False)
    assert torch.allclose(got, want.gather(1, other[:, None])[:, 0], atol=1e-6)


def test_output_head_follows_the_weight_and_matches_the_model_head(models):
    model = models["arm"]
    head, x = OutputHead(model), torch.randn(5, model.cfg.d_model)
    for rows in (1, 2, 5):  # one-row products take the transposed copy on a CPU
        assert torch.allclose(head(x[:rows]), model.head(x[:rows]), atol=1e-5)
    assert head._weight_t is not None
    saved = model.head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.head.weight.mul_(-2.0)  # in place: the copy must follow
        assert torch.allclose(head(x[:1]), model.head(x[:1]), atol=1e-5)
        model.load_state_dict({**model.state_dict(), "head.weight": saved})
        assert torch.allclose(head(x[:1]), model.head(x[:1]), atol=1e-5)
    finally:
        with torch.no_grad():
            model.head.weight.copy_(saved)
    with torch.inference_mode():  # no version counter: the plain head, still right
        holder = torch.nn.Module()
        holder.head = torch.nn.Linear(model.cfg.d_model, 7, bias=False)
        plain = OutputHead(holder)
        assert torch.equal(plain(x), holder.head(x)) and plain._weight_t is None


# ----------------------------------------------------------------------------- MDM


@pytest.mark.parametrize(
    "kw",
    [
        {"strategy": "low-confidence"},
        {"strategy": "random", "steps": 3},
        {"strategy": "low-confidence", "steps": 4, "cfg_scale": 1.0},
        {"strategy": "random", "temperature": 1.0, "top_p": 0.9},
    ],
)
def test_mdm_deterministic_and_independent_of_batch(models, kw):
    mdm = models["mdm"]
    kw = {"length": 6, "stop_at_eos": False, **kw}
    batch = sampler(mdm, **kw).generate(PROMPTS)
    assert sampler(mdm, **kw).generate(PROMPTS) == batch  # seeded: same again
    assert sampler(mdm, batch_size=2, **kw).generate(PROMPTS) == batch
    assert one_by_one(mdm, PROMPTS, **kw) == batch  # no padding, no batch neighbours
    # padding (mask ids past a shorter row) never becomes a slot or an answer token
    assert all(len(s.tokens) == 6 and MASK not in s.tokens for s in batch)
    other = sampler(mdm, **{**kw, "seed": 1}).generate(PROMPTS)
    if kw.get("temperature", 0) > 0:
        assert other != batch
    elif kw["strategy"] == "low-confidence":
        assert other == batch  # nothing random left


def test_mdm_trained_model_continues_ramps(models):
    got = sampler(models["mdm"], length=4).generate([[3, 5, 7, 9], [2, 5, 8, 11, 14]])
    assert [s.tokens[:2] for s in got] == [[11, 13], [17, 20]]


@pytest.mark.parametrize("strategy", ["low-confidence", "random"])
def test_reveals_are_monotone_and_steps_equal_length_reveal_one_each(models, strategy):
    length, trace = 8, []
    s = sampler(models["mdm"], length=length, strategy=strategy, temperature=1.0)
    s.cfg.batch_size = len(PROMPTS)  # one batch, so one trace

    def on_step(step, rows, masked, answer):  # rows come longest prompt first
        order = torch.tensor(rows).argsort()
        trace.append((step, masked[order], answer[order]))

    samples = s.generate(PROMPTS, on_step=on_step)
    assert [t[0] for t in trace] == list(range(length))
    masked_before = torch.ones(len(PROMPTS), length, dtype=torch.bool)
    answer_before = None
    for step, masked, answer in trace:
        assert not (masked & ~masked_before).any(), f"step {step} re-masked a token"
        assert ((answer == MASK) == masked).all()
        if answer_before is not None:  # a revealed token keeps its value
            kept = ~masked_before
            assert torch.equal(answer[kept], answer_before[kept])
        if strategy == "low-confidence":
            assert (masked_before.sum(1) - masked.sum(1)).tolist() == [1] * len(PROMPTS)
        masked_before, answer_before = masked, answer
    assert not masked_before.any()  # the last step reveals what is left
    # EOS handling: the answer is the final canvas up to its first EOS
    for sample, row in zip(samples, answer_before.tolist(), strict=True):
        expected = row[: row.index(EOS)] if EOS in row else row
        assert sample.tokens == expected and sample.eos == (EOS in row)


@pytest.mark.parametrize("strategy", ["low-confidence", "random"])
def test_blocks_fill_left_to_right_each_with_its_share_of_steps(models, strategy):
    length, block, trace = 8, 3, []  # blocks of 3, 3 and 2 slots; 2 steps each
    s = sampler(models["mdm"], length=length, steps=6, block_length=block, strategy=strategy)
    s.cfg.batch_size = len(PROMPTS)
    s.generate(PROMPTS, on_step=lambda step, rows, masked, answer: trace.append(masked))
    assert len(trace) == 6
    for step, masked in enumerate(trace):
        done = (step // 2 + 1) * block  # slots of finished blocks and of the current one
        if step % 2 == 1:  # a block's last step reveals all of it
            assert not masked[:, :done].any()
        assert masked[:, done:].all(), f"step {step} revealed a slot of a later block"
    assert not trace[-1].any()
    with pytest.raises(ConfigError, match="not a multiple of the 3 blocks"):
        sampler(models["mdm"], length=length, steps=4, block_length=block)
    with pytest.raises(ConfigError, match="block_length"):
        sampler(models["mdm"], length=length, block_length=0)


def test_blocks_continue_ramps(models):
    got = sampler(models["mdm"], length=6, block_length=2).generate([[3, 5, 7, 9]])
    assert got[0].tokens[:2] == [11, 13]


# ----------------------------------------------------------------------------- ARM


@pytest.mark.parametrize("kw", [{}, {"temperature": 1.0, "top_p": 0.8}, {"temperature": 2.0}])
def test_arm_kv_cache_equals_full_recomputation(models, kw):
    arm = models["arm"]
    kw = {"length": 10, "batch_size": 3, **kw}
    cached = sampler(arm, **kw).generate(PROMPTS)
    assert sampler(arm, cache=False, **kw).generate(PROMPTS) == cached
    # left padding of the cached batch changes nothing either
    assert one_by_one(arm, PROMPTS, **kw) == cached


def test_arm_greedy_continues_ramps_and_stops_at_eos(models):
    got = sampler(models["arm"], length=5).generate([[3, 5, 7, 9], [26, 28, 30], [28, 29, 30]])
    assert got[0].tokens == [11, 13, 15, 17, 19] and not got[0].eos
    assert (got[1].tokens, got[1].eos) == ([], True)  # 30 + 2 = 32 = 0 mod 32: EOS
    assert (got[2].tokens, got[2].eos) == ([31], True)  # w31, then EOS
    stop = sampler(models["arm"], length=5).generate([[3, 5, 7]], stop=lambda i, ids: 13 in ids)
    assert stop[0].tokens == [9, 11, 13]


def test_prompts_are_cut_from_the_left_and_settings_checked(models):
    arm = models["arm"]
    long = list(range(2, 32)) * 2  # 60 tokens > seq_len 32
    got = sampler(arm, length=4, stop_at_eos=False).generate([long])[0]
    assert got.prompt_cut == 60 - (32 - 4) and len(got.tokens) == 4
    from pipeline.configlib import ConfigError

    with pytest.raises(ConfigError, match="classifier-free guidance"):
        sampler(arm, length=4, cfg_scale=1.0)
    with pytest.raises(ConfigError, match="at most 31 new tokens"):
        sampler(arm, length=32)
    with pytest.raises(ConfigError, match="strategy"):
        sampler(models["mdm"], length=4, strategy="greedy")


# ----------------------------------------------------------------------------- CLI + harness


def cli(capsys, *argv) -> tuple[int, str, str]:
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["sample", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_cli_one_prompt_and_jsonl_batch(runs, tmp_path, capsys):
    code, out, err = cli(capsys, runs["arm"], "--prompt", "w3 w5 w7", "--length", 4)
    assert code == 0 and out == "w9 w11 w13 w15\n"
    assert "ARM" in err and "tokens/s" in err
    code, out, err = cli(capsys, runs["mdm"], "--prompt", "w2 w5 w8 w11", "--length", 3,
                         "--steps", 3, "--cfg", 0.5, "--temperature", 0.5)  # fmt: skip
    assert code == 0 and len(out.split()) <= 3 and "3 steps low-confidence, CFG w=0.5" in err

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "w3 w5 w7", "id": "a"}, {"prompt": "w10 w11", "seed": 3}, {"prompt": ""}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    answers = tmp_path / "out" / "answers.jsonl"
    code, out, err = cli(capsys, runs["mdm"], "--input", prompts, "--output", answers,
                         "--length", 4, "--batch-size", 2)  # fmt: skip
    assert code == 0 and out == "" and "sampling" in err  # progress bar on stderr
    got = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [x["prompt"] for x in lines] and got[0]["id"] == "a"
    assert all(set(g) >= {"answer", "n_tokens", "eos", "prompt_cut"} for g in got)
    # the same answers as the sampler itself (seeds from the file)
    loaded = load_model(runs["mdm"], device="cpu")
    direct = Sampler.from_loaded(loaded, SamplingConfig(length=4)).generate(
        [loaded.tokenizer.encode(x["prompt"]).ids for x in lines], seeds=[0, 3, 0]
    )
    assert [g["answer"] for g in got] == [loaded.tokenizer.decode(s.tokens) for s in direct]


def test_sample_cli_user_errors_exit_2(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w3"}\n{"text": "w4"}\n')
    code, _, err = cli(capsys, runs["arm"], "--input", bad)
    assert code == 2 and f"{bad}:2: field 'prompt' is missing" in err
    code, _, err = cli(capsys, runs["arm"], "--prompt", "w3", "--steps", 4)
    assert code == 2 and "--steps: MDM settings" in err
    code, _, err = cli(capsys, runs["mdm"], "--prompt", "w3", "--length", 40)
    assert code == 2 and "at most 31 new tokens" in err


def test_harness_generate_until_uses_the_samplers(runs):
    from lm_eval.api.instance import Instance

    reqs = [
        ("w3 w5 w7", {"until": [" w13"], "max_gen_toks": 6}),
        ("w20 w22", {"until": "\n", "max_gen_toks": 3, "do_sample": False}),
        ("w4 w8", {"max_gen_toks": 2, "temperature": 1.0, "top_p": 0.9}),
    ]
    instances = [Instance("generate_until", {}, r, i) for i, r in enumerate(reqs)]
    arm = MaskscaleLM(loaded=load_model(runs["arm"], device="cpu"))
    out = arm.generate_until(instances)
    assert out[:2] == ["w9 w11", "w24 w26 w28"] and len(out[2].split()) == 2
    loaded = load_model(runs["mdm"], device="cpu")
    mdm = MaskscaleLM(loaded=loaded, steps=2, strategy="random", cfg=0.5, seed=7)
    out = mdm.generate_until(instances)
    cfg = SamplingConfig(length=6, steps=2, strategy="random", cfg_scale=0.5, seed=7)
    direct = Sampler.from_loaded(loaded, cfg).generate([[0, 3, 5, 7]])[0]  # EOS first
    assert out[0] == loaded.tokenizer.decode(direct.tokens).split(" w13")[0]
    assert len(out[1].split()) <= 3 and mdm.generate_until(instances) == out
