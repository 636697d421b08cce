"""The likelihood API pinned on tiny random Transformers: each estimator against a direct
computation with the model, both Monte Carlo forms against the exact expectation over every
mask, CFG, greedy unmasking, rolling windows, truncation, seeding, the run's eps, and
invariance to how requests are packed into forward passes."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from types import SimpleNamespace

import pytest
import torch

from eval.measure.likelihood import (
    LikelihoodConfig,
    LikelihoodError,
    LLResult,
    Scorer,
    request_key,
)
from eval.measure.packing import RowBlock, plan_batches
from eval.measure.plans import fixed_count_masks
from pipeline.configlib import ConfigError
from tests.eval.runs import tiny_model
from trainer.config import MDMConfig
from trainer.model import ModelConfig, Transformer
from trainer.objectives import row_generator

torch.set_num_threads(1)

VOCAB, SEQ = 50, 24
MASK = VOCAB
TINY = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=VOCAB, seq_len=SEQ)


def _model(causal: bool, seed: int = 0) -> Transformer:
    """A tiny seeded model whose head is scaled up so predictions are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(TINY, causal=causal).eval()
    with torch.no_grad():
        model.head.weight.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def mdm() -> Transformer:
    return _model(causal=False)


@pytest.fixture(scope="module")
def arm() -> Transformer:
    return _model(causal=True, seed=1)


def _scorer(model: Transformer, prefix_id: int | None = None, **cfg) -> Scorer:
    return Scorer(
        model,
        causal=model.causal,
        mask_id=MASK,
        seq_len=SEQ,
        cfg=LikelihoodConfig(**cfg),
        prefix_id=prefix_id,
    )


def _requests(n: int, seed: int = 0, max_ctx: int = 12, max_cont: int = 5):
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_ctx))],
            [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_cont))],
        )
        for _ in range(n)
    ]


@torch.no_grad()
def _logp(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log-softmax [T, V] of one row."""
    return torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]


def _close(a: list[LLResult], b: list[LLResult], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, rel=tol, abs=tol)
        assert x.stderr == pytest.approx(y.stderr, rel=tol, abs=tol, nan_ok=True)
        assert (x.is_greedy, x.n_tokens) == (y.is_greedy, y.n_tokens)


# ----------------------------------------------------------------------------- ARM exact


def test_arm_exact_equals_direct_log_softmax(arm):
    requests = _requests(6)
    results = _scorer(arm).loglikelihood(requests)
    for (ctx, cont), res in zip(requests, results, strict=True):
        logp = _logp(arm, ctx + cont)
        m = len(ctx)
        expected = sum(float(logp[m - 1 + j, tok]) for j, tok in enumerate(cont))
        greedy = all(int(logp[m - 1 + j].argmax()) == tok for j, tok in enumerate(cont))
        assert res.logprob == pytest.approx(expected, abs=1e-5)
        assert (res.is_greedy, res.stderr, res.n_tokens) == (greedy, 0.0, len(cont))


def test_arm_is_greedy_for_its_own_greedy_decode(arm):
    ctx, cont = [3, 14, 15], []
    for _ in range(4):  # greedy decoding, one token at a time
        cont.append(int(_logp(arm, ctx + cont)[-1].argmax()))
    wrong = cont[:-1] + [(cont[-1] + 1) % VOCAB]
    good, bad = _scorer(arm).loglikelihood([(ctx, cont), (ctx, wrong)])
    assert good.is_greedy and not bad.is_greedy


def test_causal_chain_rule_rows_equal_arm_exact(arm):
    """Chain-rule row i shows context + y_<i; read causally, it is the ARM's prediction of y_i,
    so the chain-rule code path on a causal model must reproduce the exact ARM value."""
    requests = _requests(5, seed=3, max_cont=6)
    scorer = _scorer(arm)
    chain = scorer._score(requests, "chain_rule", 0.0, False, False)
    _close(chain, scorer.loglikelihood(requests))


def test_arm_rejects_cfg_and_empty_context_without_prefix(arm):
    with pytest.raises(ConfigError, match="masked diffusion models only"):
        _scorer(arm, cfg_scale=1.0)
    with pytest.raises(LikelihoodError, match="request 0: .*at least one context token"):
        _scorer(arm).loglikelihood([([], [1, 2])])
    with_prefix = _scorer(arm, prefix_id=7).loglikelihood([([], [1, 2])])
    _close(with_prefix, _scorer(arm).loglikelihood([([7], [1, 2])]))


# ----------------------------------------------------------------------------- MDM estimators


def test_chain_rule_one_token_equals_conditional_ce(mdm):
    ctx, tok = [4, 8, 15, 16], 23
    res = _scorer(mdm, estimator="chain_rule").loglikelihood([(ctx, [tok])])[0]
    assert res.logprob == pytest.approx(float(_logp(mdm, ctx + [MASK])[len(ctx), tok]), abs=1e-5)
    assert res.stderr == 0.0


def test_chain_rule_masks_the_tokens_after_the_scored_one(mdm):
    ctx, cont = [1, 2, 3], [10, 20, 30, 40]
    m = len(ctx)
    expected = sum(
        float(_logp(mdm, ctx + cont[:i] + [MASK] * (len(cont) - i))[m + i, cont[i]])
        for i in range(len(cont))
    )
    res = _scorer(mdm, estimator="chain_rule").loglikelihood([(ctx, cont)])[0]
    assert res.logprob == pytest.approx(expected, abs=1e-5)


def test_inverse_t_estimate_equals_its_definition(mdm):
    """Reproduce the draws from the request key and score every sample row directly."""
    ctx, cont, n, eps = [5, 6, 7], [8, 9, 10], 16, 1e-3
    scorer = _scorer(mdm, mc_samples=n, seed=11, mc_weighting="inverse_t")
    res = scorer.loglikelihood([(ctx, cont)])[0]
    g = row_generator(request_key(11, ctx, cont))
    t = (
        torch.rand(1, generator=g, dtype=torch.float64) + torch.arange(n, dtype=torch.float64) / n
    ) % 1.0
    p = (1 - eps) * t + eps
    masks = torch.rand(n, len(cont), generator=g) < p[:, None]
    scores = []
    for i in range(n):
        noisy = [MASK if masks[i, j] else tok for j, tok in enumerate(cont)]
        logp = _logp(mdm, ctx + noisy)
        hit = [j for j in range(len(cont)) if masks[i, j]]
        scores.append(sum(float(logp[len(ctx) + j, cont[j]]) for j in hit) / float(p[i]))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    assert res.logprob == pytest.approx(float(scores_t.mean()), rel=1e-5)
    assert res.stderr == pytest.approx(float(scores_t.std() / math.sqrt(n)), rel=1e-5)


def test_fixed_count_estimate_equals_its_definition(mdm):
    """Sample i masks the k_i positions drawn from the request key; score l/k_i times its sum."""
    ctx, cont, n = [5, 6, 7], [8, 9, 10, 11], 16
    res = _scorer(mdm, mc_samples=n, seed=11).loglikelihood([(ctx, cont)])[0]
    masks = fixed_count_masks(request_key(11, ctx, cont), n, len(cont))
    scores = []
    for mask in masks.tolist():
        logp = _logp(mdm, ctx + [MASK if hit else tok for hit, tok in zip(mask, cont)])
        hit = [j for j in range(len(cont)) if mask[j]]
        scores.append(len(cont) / len(hit) * sum(float(logp[len(ctx) + j, cont[j]]) for j in hit))
    scores_t = torch.tensor(scores, dtype=torch.float64)
    assert res.logprob == pytest.approx(float(scores_t.mean()), rel=1e-5)
    assert res.stderr == pytest.approx(float(scores_t.std() / math.sqrt(n)), rel=1e-5)


def test_fixed_count_masks_exactly_k_of_uniform_sets_with_stratified_k():
    n, length = 6000, 3
    masks = fixed_count_masks(123, n, length)
    k = masks.sum(dim=1)
    for size in range(1, length + 1):  # stratified: every count n / l times (+-1 at a boundary)
        assert abs(int((k == size).sum()) - n // length) <= 1
        sets = list(itertools.combinations(range(length), size))
        expected = n / length / len(sets)  # each set of that size equally likely
        sd = math.sqrt(n / length * (1 / len(sets)) * (1 - 1 / len(sets)))
        for subset in sets:
            row = torch.zeros(length, dtype=torch.bool)
            row[list(subset)] = True
            assert abs(int((masks == row).all(dim=1).sum()) - expected) <= 5 * sd + 1
    # fewer samples than tokens: one count per stratum of l / n counts
    few = fixed_count_masks(7, 4, 16).sum(dim=1)
    assert sorted((few - 1) // 4) == [0, 1, 2, 3]


def test_one_token_fixed_count_is_exact_and_never_zero(mdm):
    """l = 1: every fixed-count sample is the one row log p(y | x, [MASK]), so even one sample is
    exact; the 1/t form scores 0 whenever its only sample masks nothing."""
    ctx = [4, 8, 15, 16]
    exact = _logp(mdm, ctx + [MASK])[len(ctx)]
    requests = [(ctx, [tok]) for tok in range(VOCAB)]
    for n in (1, 16):
        results = _scorer(mdm, mc_samples=n, greedy=False).loglikelihood(requests)
        for tok, res in enumerate(results):
            assert res.logprob == pytest.approx(float(exact[tok]), abs=1e-5)
            assert res.stderr == 0.0 if n > 1 else math.isnan(res.stderr)
    one = _scorer(mdm, mc_samples=1, greedy=False, mc_weighting="inverse_t")
    zeros = sum(r.logprob == 0.0 for r in one.loglikelihood(requests))
    assert 0.3 * VOCAB < zeros < 0.7 * VOCAB  # the bug this form cannot have


def test_inverse_t_one_token_converges_to_conditional_ce(mdm):
    ctx, tok = [4, 8, 15, 16], 23
    exact = float(_logp(mdm, ctx + [MASK])[len(ctx), tok])
    scorer = _scorer(mdm, mc_samples=4096, greedy=False, mc_weighting="inverse_t")
    res = scorer.loglikelihood([(ctx, [tok])])[0]
    assert 0 < res.stderr < 0.1 * abs(exact)
    assert abs(res.logprob - exact) < 4 * res.stderr


@pytest.fixture(scope="module")
def ramp_mdm() -> Transformer:
    """An MDM trained 100 steps on ramps (~2 s): its predictions depend strongly on how much of
    the continuation is masked, which is where the two MC forms' targets differ."""
    return tiny_model("mdm", 100)[0]


def _every_mask(model, ctx, cont, mask: int) -> dict[tuple[int, ...], float]:
    """g(M) = sum over j in M of log p(y_j | x, y with M masked), for every non-empty M."""
    table = {}
    for size in range(1, len(cont) + 1):
        for subset in itertools.combinations(range(len(cont)), size):
            logp = _logp(model, ctx + [mask if j in subset else t for j, t in enumerate(cont)])
            table[subset] = sum(float(logp[len(ctx) + j, cont[j]]) for j in subset)
    return table


def _fixed_count_expectation(table, length: int) -> float:
    """sum over k of P(k) = 1/l, over the C(l, k) sets of size k equally likely, of l/k g(M)."""
    total = 0.0
    for k in range(1, length + 1):
        sets = [g for subset, g in table.items() if len(subset) == k]
        total += (1 / length) * statistics.fmean(length / k * g for g in sets)
    return total


def _inverse_t_expectation(table, length: int, eps: float) -> float:
    """integral over t of sum over M of P(M | t) g(M) / p, p = (1 - eps) t + eps, exactly:
    P(M | t) / p = p^(|M|-1) (1-p)^(l-|M|), integrated over p in [eps, 1] (dt = dp / (1-eps))
    by expanding (1 - p)^(l - |M|)."""
    total = 0.0
    for subset, g in table.items():
        k, rest = len(subset), length - len(subset)
        integral = sum(
            math.comb(rest, r) * (-1) ** r * (1 - eps ** (k + r)) / (k + r) for r in range(rest + 1)
        )
        total += g * integral / (1 - eps)
    return total


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_both_mc_forms_unbiased_against_every_mask(ramp_mdm, length):
    """Each form's mean over many samples hits its own expectation, computed by enumerating
    every mask set (plans' docstring): fixed_count the eps = 0 ELBO, inverse_t the eps-ELBO;
    the two agree at eps -> 0 and at l = 1, and differ (by > 10 standard errors) at a large
    eps, so the check can tell one target from the other."""
    ctx, cont, eps, n = [3, 5, 7, 9], [11, 13, 15, 17][:length], 0.5, 20000
    mask = ramp_mdm.cfg.mask_id
    table = _every_mask(ramp_mdm, ctx, cont, mask)
    fixed = _fixed_count_expectation(table, length)
    inverse_t = _inverse_t_expectation(table, length, eps)
    assert _inverse_t_expectation(table, length, 1e-12) == pytest.approx(fixed, abs=1e-9)
    for weighting, target, other in (
        ("fixed_count", fixed, inverse_t),
        ("inverse_t", inverse_t, fixed),
    ):
        cfg = LikelihoodConfig(mc_samples=n, eps=eps, mc_weighting=weighting, greedy=False)
        scorer = Scorer(ramp_mdm, causal=False, mask_id=mask, seq_len=ramp_mdm.cfg.seq_len, cfg=cfg)
        res = scorer.loglikelihood([(ctx, cont)])[0]
        assert abs(res.logprob - target) <= 4 * res.stderr + 1e-5, weighting
        if length == 1:
            assert target == pytest.approx(other, abs=1e-9)
        else:
            assert abs(res.logprob - other) > 10 * res.stderr, weighting


def test_stderr_positive_for_mc_zero_for_exact(mdm, arm):
    requests = [(ctx, cont + [1]) for ctx, cont in _requests(4, seed=5)]  # l >= 2
    for weighting in ("fixed_count", "inverse_t"):
        scorer = _scorer(mdm, mc_samples=32, mc_weighting=weighting)
        assert all(r.stderr > 0 for r in scorer.loglikelihood(requests))
        assert math.isnan(_scorer(mdm, mc_samples=1).loglikelihood(requests[:1])[0].stderr)
    assert all(r.stderr == 0 for r in _scorer(mdm, estimator="chain_rule").loglikelihood(requests))
    assert all(r.stderr == 0 for r in _scorer(arm).loglikelihood(requests))


def test_eps_comes_from_the_run_unless_set(mdm):
    """from_loaded: an unset eps is the run's mdm.eps; an explicit one wins; a bare Scorer takes
    the trainer's default; the caller's config is not changed."""
    loaded = SimpleNamespace(
        model=mdm, causal=False, mask_id=MASK, seq_len=SEQ, device=torch.device("cpu"),
        eos_id=7, mdm_eps=0.3,
    )  # fmt: skip
    cfg = LikelihoodConfig(mc_weighting="inverse_t", mc_samples=8, greedy=False)
    from_run = Scorer.from_loaded(loaded, cfg)
    assert (from_run.cfg.eps, cfg.eps) == (0.3, None)
    assert Scorer.from_loaded(loaded).cfg.eps == 0.3
    explicit = Scorer.from_loaded(loaded, LikelihoodConfig(eps=0.05))
    assert explicit.cfg.eps == 0.05
    assert _scorer(mdm).cfg.eps == MDMConfig.eps
    requests = _requests(4, seed=14)
    same = _scorer(mdm, mc_weighting="inverse_t", mc_samples=8, greedy=False, eps=0.3)
    _close(from_run.loglikelihood(requests), same.loglikelihood(requests))
    default = _scorer(mdm, mc_weighting="inverse_t", mc_samples=8, greedy=False)
    assert from_run.loglikelihood(requests) != default.loglikelihood(requests)


def test_seeded_reproducible_and_order_free(mdm):
    requests = _requests(5, seed=6)
    first = _scorer(mdm, mc_samples=16, seed=3).loglikelihood(requests)
    again = _scorer(mdm, mc_samples=16, seed=3).loglikelihood(requests + requests[:2])
    assert first == again[:5] and again[5:] == first[:2]  # bitwise, duplicates included
    other = _scorer(mdm, mc_samples=16, seed=4).loglikelihood(requests)
    assert [r.logprob for r in other] != [r.logprob for r in first]


# ----------------------------------------------------------------------------- CFG


def test_cfg_zero_equals_no_cfg_and_changes_scores_otherwise(mdm):
    requests = _requests(4, seed=7)
    for estimator in ("mc", "chain_rule"):
        plain = _scorer(mdm, estimator=estimator, mc_samples=16).loglikelihood(requests)
        zero = _scorer(mdm, estimator=estimator, mc_samples=16, cfg_scale=0.0)
        _close(zero.loglikelihood(requests), plain)
        guided = _scorer(mdm, estimator=estimator, mc_samples=16, cfg_scale=1.0)
        assert all(
            abs(a.logprob - b.logprob) > 1e-3
            for a, b in zip(guided.loglikelihood(requests), plain, strict=True)
        )


def test_cfg_combines_logits_of_masked_context_row(mdm):
    ctx, tok, w = [4, 8, 15, 16], 23, 1.5
    with torch.no_grad():
        cond = mdm(torch.tensor([ctx + [MASK]]))[0, -1]
        uncond = mdm(torch.tensor([[MASK] * len(ctx) + [MASK]]))[0, -1]
    expected = torch.log_softmax(uncond + (w + 1) * (cond - uncond), -1)[tok]
    scorer = _scorer(mdm, estimator="chain_rule", cfg_scale=w)
    assert scorer.loglikelihood([(ctx, [tok])])[0].logprob == pytest.approx(
        float(expected), abs=1e-5
    )


# ----------------------------------------------------------------------------- greedy


def _reference_unmask(model, ctx, cont, w=0.0):
    """Naive greedy unmasking, one model call per step (CFG on logits when w != 0)."""
    m, ids = len(ctx), ctx + [MASK] * len(cont)
    while MASK in ids[m:]:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0].float()
            if w:
                logits_u = model(torch.tensor([[MASK] * m + ids[m:]]))[0].float()
                logits = logits_u + (w + 1) * (logits - logits_u)
        logp = torch.log_softmax(logits, -1)
        masked = [j for j in range(len(cont)) if ids[m + j] == MASK]
        conf = torch.stack([logp[m + j].max() for j in masked])
        j = masked[int(conf.argmax())]
        ids[m + j] = int(logp[m + j].argmax())
    return ids[m:] == cont, ids[m:]


def test_greedy_unmasking_one_token_agrees_with_argmax(mdm):
    ctx = [9, 8, 7, 6]
    best = int(_logp(mdm, ctx + [MASK])[len(ctx)].argmax())
    for estimator in ("mc", "chain_rule"):
        scorer = _scorer(mdm, estimator=estimator, mc_samples=8)
        good, bad = scorer.loglikelihood([(ctx, [best]), (ctx, [(best + 1) % VOCAB])])
        assert good.is_greedy and not bad.is_greedy


@pytest.mark.parametrize("w", [0.0, 0.8])
def test_greedy_unmasking_matches_reference(mdm, w):
    requests = []
    for ctx, cont in _requests(6, seed=8, max_cont=4):
        _, decoded = _reference_unmask(mdm, ctx, cont, w)
        requests += [(ctx, decoded), (ctx, cont)]  # the greedy result and a random target
    results = _scorer(mdm, estimator="chain_rule", cfg_scale=w).loglikelihood(requests)
    expected = [_reference_unmask(mdm, ctx, cont, w)[0] for ctx, cont in requests]
    assert [r.is_greedy for r in results] == expected
    assert any(expected) and not all(expected)


def test_greedy_off_chain_rule_is_left_to_right_greedy(mdm):
    ctx, cont, n = [2, 4, 6], [], 3
    for i in range(n):  # left-to-right greedy decode with the remaining positions masked
        cont.append(int(_logp(mdm, ctx + cont + [MASK] * (n - i))[len(ctx) + i].argmax()))
    scorer = _scorer(mdm, estimator="chain_rule", greedy=False)
    good, bad = scorer.loglikelihood([(ctx, cont), (ctx, cont[:2] + [(cont[2] + 1) % VOCAB])])
    assert good.is_greedy and not bad.is_greedy


# ----------------------------------------------------------------------------- packing, lengths


@pytest.mark.parametrize(
    "family,estimator,w",
    [
        ("arm", "mc", 0.0), ("mdm", "mc", 0.0), ("mdm", "mc", 1.0), ("mdm", "inverse_t", 1.0),
        ("mdm", "chain_rule", 1.0),
    ],
)  # fmt: skip
def test_packing_order_and_budget_do_not_change_results(mdm, arm, family, estimator, w):
    model = arm if family == "arm" else mdm
    requests = _requests(8, seed=9)
    kw = {"estimator": estimator, "mc_samples": 8, "cfg_scale": w}
    if estimator == "inverse_t":
        kw.update(estimator="mc", mc_weighting="inverse_t")
    reference = _scorer(model, token_budget=4096, **kw).loglikelihood(requests)
    one_row = _scorer(model, token_budget=1, **kw).loglikelihood(requests)
    _close(one_row, reference)
    perm = list(range(len(requests)))
    random.Random(1).shuffle(perm)
    shuffled = _scorer(model, token_budget=60, **kw).loglikelihood([requests[i] for i in perm])
    _close([shuffled[perm.index(i)] for i in range(len(requests))], reference)
    alone = [_scorer(model, **kw).loglikelihood([r])[0] for r in requests[:3]]
    _close(alone, reference[:3])


def test_plan_batches_respects_budget_and_covers_every_row():
    blocks = [
        RowBlock(
            torch.zeros(k, length, dtype=torch.long), 0, *(torch.zeros(0, dtype=torch.long),) * 3
        )
        for k, length in [(5, 3), (2, 10), (7, 4), (1, 12)]
    ]
    for budget, twins in [(1, 1), (24, 1), (24, 2), (1000, 2)]:
        batches = plan_batches(blocks, budget, twins)
        seen = sorted((s.block, r) for b in batches for s in b for r in range(s.start, s.stop))
        assert seen == sorted((i, r) for i, blk in enumerate(blocks) for r in range(len(blk.ids)))
        for batch in batches:
            width = max(blocks[s.block].length for s in batch)
            rows = sum(s.stop - s.start for s in batch)
            assert rows == 1 or rows * width * twins <= budget
        first = [blocks[b[0].block].length for b in batches]
        assert first == sorted(first, reverse=True)  # longest rows first


def test_long_contexts_are_cut_from_the_left(mdm, arm):
    rng = random.Random(10)
    ctx = [rng.randrange(VOCAB) for _ in range(3 * SEQ)]
    cont = [1, 2, 3]
    for model, keep in ((mdm, SEQ - 3), (arm, SEQ + 1 - 3)):
        scorer = _scorer(model, mc_samples=8)
        long, short = scorer.loglikelihood([(ctx, cont), (ctx[-keep:], cont)])
        assert long == short
        with pytest.raises(LikelihoodError, match=r"request 1: continuation of 25 tokens"):
            scorer.loglikelihood([(ctx, cont), ([1], [0] * (SEQ + 1))])


def test_bad_requests_name_the_request(mdm):
    scorer = _scorer(mdm)
    with pytest.raises(LikelihoodError, match=r"request 1: continuation: token id 50 outside"):
        scorer.loglikelihood([([1], [2]), ([1], [VOCAB])])
    with pytest.raises(LikelihoodError, match="request 0: empty continuation"):
        scorer.loglikelihood([([1], [])])
    with pytest.raises(ConfigError, match="likelihood.estimator"):
        _scorer(mdm, estimator="exact")
    with pytest.raises(ConfigError, match="likelihood.mc_samples"):
        _scorer(mdm, mc_samples=0)
    with pytest.raises(ConfigError, match="likelihood.mc_weighting: 'one_over_t' is not one of"):
        _scorer(mdm, mc_weighting="one_over_t")
    for bad in (0.0, 1.5, "0.1", True):
        with pytest.raises(ConfigError, match="likelihood.eps"):
            _scorer(mdm, eps=bad)


# ----------------------------------------------------------------------------- rolling


def test_arm_rolling_short_text_is_one_exact_pass(arm):
    tokens = [5, 4, 3, 2, 1, 0, 9]
    res = _scorer(arm, prefix_id=7).loglikelihood_rolling(tokens)
    logp = _logp(arm, [7] + tokens)
    expected = sum(float(logp[j, tok]) for j, tok in enumerate(tokens))
    assert res.logprob == pytest.approx(expected, abs=1e-5)
    assert res.n_tokens == len(tokens)
    no_prefix = _scorer(arm).loglikelihood_rolling(tokens)
    assert no_prefix.n_tokens == len(tokens) - 1


def test_arm_rolling_windows_predict_each_token_once_with_left_context(arm):
    rng = random.Random(12)
    tokens = [rng.randrange(VOCAB) for _ in range(2 * SEQ + 5)]
    scorer = _scorer(arm, prefix_id=7)
    windows = [  # lm-evaluation-harness's scheme, spelled out
        ([7], tokens[:SEQ]),
        (tokens[SEQ - 1 : SEQ], tokens[SEQ : 2 * SEQ]),
        (tokens[SEQ + 5 - 1 : 2 * SEQ], tokens[2 * SEQ :]),  # last: context fills the window
    ]
    res = scorer.loglikelihood_rolling(tokens)
    parts = scorer.loglikelihood(windows)
    assert res.n_tokens == len(tokens) == sum(p.n_tokens for p in parts)
    assert res.logprob == pytest.approx(sum(p.logprob for p in parts), abs=1e-4)


def test_mdm_rolling_is_mc_elbo_over_disjoint_windows(mdm):
    """The validation ELBO's 1/t form over windows, whatever mc_weighting says."""
    rng = random.Random(13)
    tokens = [rng.randrange(VOCAB) for _ in range(2 * SEQ + 7)]
    scorer = _scorer(mdm, mc_samples=8, greedy=False, mc_weighting="inverse_t")
    res = scorer.loglikelihood_rolling(tokens)
    assert _scorer(mdm, mc_samples=8, greedy=False).loglikelihood_rolling(tokens) == res
    parts = scorer.loglikelihood([([], tokens[i : i + SEQ]) for i in range(0, len(tokens), SEQ)])
    assert res.n_tokens == len(tokens)
    assert res.logprob == pytest.approx(sum(p.logprob for p in parts), rel=1e-9)
    assert res.stderr == pytest.approx(math.sqrt(sum(p.stderr**2 for p in parts)), rel=1e-9)


def test_from_loaded_uses_the_loaded_model_attributes(arm):
    loaded = SimpleNamespace(
        model=arm, causal=True, mask_id=MASK, seq_len=SEQ, device=torch.device("cpu"), eos_id=7
    )
    scorer = Scorer.from_loaded(loaded, LikelihoodConfig(token_budget=64))
    assert (scorer.seq_len, scorer.prefix_id, scorer.cfg.token_budget) == (SEQ, 7, 64)
    res = scorer.loglikelihood([([], [1, 2])], progress=True)
    _close(res, _scorer(arm).loglikelihood([([7], [1, 2])]))
