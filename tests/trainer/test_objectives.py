"""ARM and MDM losses: hand-computed values, gradient paths, keyed randomness, stratified ELBO."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.configlib import ConfigError
from trainer.config import MDMConfig, TrainConfig
from trainer.model import ModelConfig, Transformer
from trainer.objectives import (
    OBJECTIVES,
    ARMObjective,
    MDMObjective,
    build_objective,
    stratified_times,
)
from trainer.sft_config import SFTConfig

torch.set_num_threads(1)

V = 40
CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=V, seq_len=32)


def _model(causal: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG, causal=causal)


def _batch(b: int = 3, t: int = 16, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, t + 1), generator=g)
    keys = torch.arange(b, dtype=torch.long) * 7919 + seed
    return tokens, keys


class Recorder(torch.nn.Module):
    """Wraps a model, keeps every logits tensor (with retained grad) and input it produced."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.inputs, self.lengths, self.logits = model, [], [], []

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        out = self.module(ids, lengths=lengths)
        out.retain_grad()
        self.inputs.append(ids)
        self.lengths.append(lengths)
        self.logits.append(out)
        return out


def test_registry_and_builder():
    assert OBJECTIVES == {"arm": ARMObjective, "mdm": MDMObjective}
    assert build_objective("arm", mask_id=V).causal is True
    mdm = build_objective("mdm", mask_id=V, eps=0.01, random_length_prob=0.0)
    assert isinstance(mdm, MDMObjective) and mdm.causal is False
    assert (mdm.mask_id, mdm.eps, mdm.random_length_prob) == (V, 0.01, 0.0)
    with pytest.raises(ConfigError, match="arm, mdm|'arm', 'mdm'"):
        build_objective("ar", mask_id=V)
    with pytest.raises(ConfigError, match="eps"):
        build_objective("arm", mask_id=V, eps=0.1)
    with pytest.raises(ConfigError, match="epsilon"):
        build_objective("mdm", mask_id=V, epsilon=0.1)
    with pytest.raises(ConfigError, match="eps"):
        MDMObjective(V, eps=0.0)


def test_objective_refuses_wrong_attention():
    tokens, keys = _batch()
    with pytest.raises(ValueError, match="causal"):
        MDMObjective(V).train_loss(_model(causal=True), tokens, keys)
    with pytest.raises(ValueError, match="causal"):
        ARMObjective().train_loss(_model(causal=False), tokens, keys)
    with pytest.raises(ValueError, match="keys"):
        ARMObjective().train_loss(_model(causal=True), tokens, keys[:1])


def test_arm_loss_equals_hand_computed_ce():
    model, obj = _model(causal=True), ARMObjective()
    tokens, keys = _batch()
    loss = obj.train_loss(model, tokens, keys)
    logp = torch.log_softmax(model(tokens[:, :-1]), dim=-1)
    hand = -logp.gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.embed.weight.grad is not None
    ev = obj.eval_loss(model, tokens, keys, n_samples=3)
    assert not ev.requires_grad
    torch.testing.assert_close(ev, loss.detach())


def test_mdm_loss_equals_hand_computed_on_the_drawn_mask():
    model, obj = _model(causal=False), MDMObjective(mask_id=V, random_length_prob=0.0)
    tokens, keys = _batch()
    x = tokens[:, :-1]
    b, t = x.shape
    hand = torch.zeros(())
    for row, key in enumerate(keys.tolist()):
        draw = obj.draw_row(key, t)
        assert draw.length == t and draw.mask.any()
        noisy = x[row].clone()
        noisy[draw.mask] = V
        logits = model(noisy[None])[0]
        for pos in draw.mask.nonzero().flatten().tolist():
            hand += F.cross_entropy(logits[pos], x[row, pos]) / draw.p
    hand /= b * t
    torch.testing.assert_close(obj.train_loss(model, tokens, keys), hand, rtol=1e-5, atol=1e-6)


def test_mdm_gradient_only_through_masked_positions():
    rec = Recorder(_model(causal=False))
    obj = MDMObjective(mask_id=V, random_length_prob=0.0)
    tokens, keys = _batch()
    obj.train_loss(rec, tokens, keys).backward()
    (ids,), (logits,) = rec.inputs, rec.logits
    masked = ids == V
    assert masked.any() and (~masked).any()
    for row, key in enumerate(keys.tolist()):  # the input is exactly the drawn mask
        assert torch.equal(masked[row], obj.draw_row(key, ids.shape[1]).mask)
    grad_norm = logits.grad.abs().sum(-1)
    assert (grad_norm[~masked] == 0).all()
    assert (grad_norm[masked] > 0).all()


def test_mdm_draws_are_keyed_and_p_in_range():
    obj = MDMObjective(mask_id=V, eps=0.2)
    a, b = obj.draw_row(12345, 64), obj.draw_row(12345, 64)
    assert (a.t, a.p, a.length) == (b.t, b.p, b.length) and torch.equal(a.mask, b.mask)
    draws = [obj.draw_row(k, 64) for k in range(400)]
    assert len({d.t for d in draws}) == 400
    mid = [d for d in draws if d.p < 0.9]  # p near 1 masks everything: identical masks
    assert len({tuple(d.mask.tolist()) for d in mid}) == len(mid) > 300
    ps = torch.tensor([d.p for d in draws])
    assert ps.min() >= 0.2 and ps.max() <= 1.0
    torch.testing.assert_close(ps, torch.tensor([0.8 * d.t + 0.2 for d in draws]))
    # the mask rate follows p
    rates = torch.tensor([d.mask.float().mean() for d in draws])
    assert (rates - ps).abs().mean() < 0.06


def test_random_length_rate_and_range():
    seq_len = 50
    cut = MDMObjective(V, random_length_prob=0.1)
    lengths = torch.tensor([cut.draw_row(k, seq_len).length for k in range(4000)])
    shortened = lengths < seq_len
    # a cut may land on the full length (1 / seq_len of cuts), so the rate is slightly below p
    assert 0.08 < shortened.float().mean() < 0.115
    assert lengths.min() >= 1 and len(set(lengths[shortened].tolist())) > 30
    never = MDMObjective(V, random_length_prob=0.0)
    assert all(never.draw_row(k, seq_len).length == seq_len for k in range(4000))
    always = MDMObjective(V, random_length_prob=1.0)
    full = sum(always.draw_row(k, seq_len).length == seq_len for k in range(4000))
    assert full < 4000 * 3 / seq_len
    # the cut does not change the row's mask prefix (the same uniforms are used)
    d_cut, d_full = always.draw_row(7, seq_len), never.draw_row(7, seq_len)
    assert d_cut.t == d_full.t and torch.equal(d_cut.mask, d_full.mask[: d_cut.length])


def _row_alone_loss(model, obj, tokens, key):
    """One row's training loss computed the slow way: truncated to its drawn length, run alone,
    CE gathered at its masked positions."""
    t = tokens.shape[0] - 1
    d = obj.draw_row(key, t)
    x = tokens[: d.length]
    logits = model(torch.where(d.mask, V, x)[None])[0]
    return F.cross_entropy(logits[d.mask], x[d.mask], reduction="sum") / d.p / d.length


def test_mdm_shortened_rows_cost_one_forward_and_match_rows_run_alone():
    model = _model(causal=False)
    rec = Recorder(model)
    obj = MDMObjective(mask_id=V, random_length_prob=1.0)
    tokens, keys = _batch(b=3, t=20)
    loss = obj.train_loss(rec, tokens, keys)
    draws = [obj.draw_row(k, 20) for k in keys.tolist()]
    assert min(d.length for d in draws) < 20
    # one forward over the whole micro-batch at full length, lengths passed to the model
    assert [tuple(ids.shape) for ids in rec.inputs] == [(3, 20)]
    assert rec.lengths[0].tolist() == [d.length for d in draws]
    loss.backward()
    (ids,), (logits,) = rec.inputs, rec.logits
    for row, d in enumerate(draws):
        assert torch.equal(ids[row, : d.length] == V, d.mask)  # the drawn mask, prefix only
        assert (logits.grad[row, d.length :] == 0).all()  # positions past the cut: no loss
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hand = sum(_row_alone_loss(model, obj, tokens[r], k) for r, k in enumerate(keys.tolist()))
    hand = hand / 3
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    hand.backward()  # and the same gradients as running each truncated row alone
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_mdm_without_cuts_calls_the_model_without_lengths():
    rec = Recorder(_model(causal=False))
    tokens, keys = _batch(b=3, t=20)
    MDMObjective(mask_id=V, random_length_prob=0.0).train_loss(rec, tokens, keys)
    assert rec.lengths == [None]


def test_mdm_train_weights():
    obj = MDMObjective(mask_id=V, random_length_prob=0.5)
    keys = torch.arange(40) * 31 + 3
    weight, lengths = obj.train_weights(keys, 24)
    assert weight.shape == (40, 24) and weight.dtype == torch.float32
    assert lengths is not None and (lengths < 24).any() and (lengths == 24).any()
    for row, key in enumerate(keys.tolist()):
        d = obj.draw_row(key, 24)
        assert lengths[row] == d.length
        assert torch.equal(weight[row, : d.length] > 0, d.mask)
        assert (weight[row, d.length :] == 0).all()
        torch.testing.assert_close(
            weight[row, : d.length][d.mask], torch.full((int(d.mask.sum()),), 1 / (d.p * d.length))
        )
    assert MDMObjective(V, random_length_prob=0.0).train_weights(keys, 24)[1] is None


@pytest.mark.parametrize("objective", [ARMObjective(), MDMObjective(V, random_length_prob=0.5)])
def test_batch_loss_is_mean_of_row_losses(objective):
    """Rows draw from their own keys, so any split into micro-batches/ranks gives the same loss."""
    model = _model(causal=objective.causal)
    tokens, keys = _batch(b=4, t=24)
    whole = objective.train_loss(model, tokens, keys)
    rows = [objective.train_loss(model, tokens[i : i + 1], keys[i : i + 1]) for i in range(4)]
    halves = [objective.train_loss(model, tokens[i : i + 2], keys[i : i + 2]) for i in (0, 2)]
    torch.testing.assert_close(whole, torch.stack(rows).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, torch.stack(halves).mean(), rtol=1e-5, atol=1e-6)
    shuffled = objective.train_loss(model, tokens[[2, 0, 3, 1]], keys[[2, 0, 3, 1]])
    torch.testing.assert_close(whole, shuffled, rtol=1e-5, atol=1e-6)


def test_mdm_eval_times_are_stratified():
    obj = MDMObjective(V)
    keys = torch.arange(20)
    times, masks = obj.eval_draws(keys, n_samples=16, seq_len=10)
    assert times.shape == (20, 16) and masks.shape == (20, 16, 10)
    bins = (times * 16).floor().long().sort(dim=1).values
    assert torch.equal(bins, torch.arange(16).expand(20, 16))  # each 1/n bin exactly once
    assert len({round(float(t), 12) for t in times[:, 0]}) == 20  # u differs per key
    again, masks_again = obj.eval_draws(keys, n_samples=16, seq_len=10)
    assert torch.equal(times, again) and torch.equal(masks, masks_again)


def test_mdm_eval_loss_hand_computed_and_deterministic():
    model = _model(causal=False)
    obj = MDMObjective(V)
    tokens, keys = _batch(b=2, t=12)
    ev = obj.eval_loss(model, tokens, keys, n_samples=4)
    assert not ev.requires_grad
    assert ev == obj.eval_loss(model, tokens, keys, n_samples=4)
    assert ev != obj.eval_loss(model, tokens, keys + 1, n_samples=4)
    x = tokens[:, :-1]
    times, masks = obj.eval_draws(keys, 4, 12)
    hand = 0.0
    with torch.no_grad():
        for row in range(2):
            for i in range(4):
                p = (1 - obj.eps) * times[row, i].item() + obj.eps
                m = masks[row, i]
                logits = model(torch.where(m, V, x[row])[None])[0]
                hand += F.cross_entropy(logits[m], x[row][m], reduction="sum").item() / p
    assert ev.item() == pytest.approx(hand / (2 * 4 * 12), rel=1e-5)


class MaskFractionModel(torch.nn.Module):
    """Predicts token 0 with confidence falling as more of the row is masked (a loss that
    depends strongly on t, like a trained model's)."""

    causal = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        frac = (ids == V).float().mean(1, keepdim=True)  # [B, 1]
        logits = torch.zeros(*ids.shape, V)
        logits[..., 0] = 8.0 * (1 - frac)
        return logits


def test_mdm_stratified_eval_has_lower_variance_than_iid_times():
    """Same row, n = 8 draws per estimate: stratified t vs 8 independent training draws."""
    model, obj = MaskFractionModel(), MDMObjective(V, random_length_prob=0.0)
    tokens, reps, n = torch.zeros(1, 33, dtype=torch.long), 40, 8
    strat = torch.stack([obj.eval_loss(model, tokens, torch.tensor([k]), n) for k in range(reps)])
    draws = [obj.train_loss(model, tokens, torch.tensor([k])) for k in range(reps * n)]
    iid = torch.stack(draws).view(reps, n).mean(1)
    assert strat.var() < 0.5 * iid.var()
    # both estimate the same expectation
    assert abs(strat.mean() - iid.mean()) < 3 * (strat.var() / reps + iid.var() / reps) ** 0.5


@pytest.mark.parametrize("objective", [ARMObjective(), MDMObjective(V, random_length_prob=0.5)])
def test_losses_under_bf16_autocast_are_fp32_and_close(objective):
    model = _model(causal=objective.causal)
    tokens, keys = _batch(b=4, t=24)
    ref = objective.train_loss(model, tokens, keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective.train_loss(model, tokens, keys)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
    assert torch.isfinite(model.head.weight.grad).all()


@pytest.mark.parametrize("objective", [ARMObjective(), MDMObjective(V)])
def test_eval_row_losses_average_to_eval_loss(objective):
    """Per-row validation losses (eval ppl's bootstrap) are the rows of eval_loss's estimate."""
    model = _model(causal=objective.causal)
    tokens, keys = _batch(b=3, t=12)
    rows = objective.eval_row_losses(model, tokens, keys, n_samples=4)
    assert rows.shape == (3,) and rows.dtype == torch.float64
    mean = objective.eval_loss(model, tokens, keys, n_samples=4)
    assert rows.mean().item() == pytest.approx(mean.item(), rel=1e-6)
    alone = [
        objective.eval_row_losses(model, tokens[i : i + 1], keys[i : i + 1], 4) for i in range(3)
    ]
    assert torch.allclose(torch.cat(alone), rows, rtol=1e-5)


# ----------------------------------------------------------------------------- stratified t


def _keys(b: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2**62, (b,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b", [1, 5, 16])
def test_stratified_times_hold_one_t_per_stratum(b):
    for seed in range(20):
        times = torch.tensor(stratified_times(_keys(b, seed)), dtype=torch.float64)
        assert ((times >= 0) & (times < 1)).all()
        assert sorted((times * b).floor().long().tolist()) == list(range(b))
    # the shared offset u = min(t) * b is itself uniform: different per micro-batch, spread out
    offsets = torch.tensor([min(stratified_times(_keys(b, s))) * b for s in range(400)])
    assert len(set(offsets.tolist())) == 400
    assert abs(offsets.mean().item() - 0.5) < 0.05 and offsets.min() < 0.05 < 0.95 < offsets.max()


def test_stratified_draws_are_keyed_and_order_free():
    """A row's t depends on its key and the set of keys it shares a micro-batch with, not on
    their order (ranks and resumes see the same set); only t changes versus iid draws."""
    keys = _keys(8, 3)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    by_key = dict(zip(keys.tolist(), stratified_times(keys), strict=True))
    assert dict(zip(keys[perm].tolist(), stratified_times(keys[perm]), strict=True)) == by_key
    assert stratified_times(keys) == stratified_times(keys.clone())
    assert stratified_times(_keys(8, 4)) != stratified_times(keys)
    strat = MDMObjective(V, random_length_prob=0.0, t_sampling="stratified")
    iid = MDMObjective(V, random_length_prob=0.0)
    w_strat, _ = strat.train_weights(keys, 64)
    w_perm, _ = strat.train_weights(keys[perm], 64)
    assert torch.equal(w_perm, w_strat[perm])
    w_iid, _ = iid.train_weights(keys, 64)
    assert not torch.equal(w_iid, w_strat)
    for row, (key, t) in enumerate(by_key.items()):  # same uniforms, stratified t
        d_iid, d_strat = iid.draw_row(key, 64), strat.draw_row(key, 64, t)
        assert d_strat.t == t and d_strat.p == pytest.approx((1 - strat.eps) * t + strat.eps)
        w = w_strat[row]
        assert torch.equal(w > 0, d_strat.mask)
        torch.testing.assert_close(w[w > 0], torch.full_like(w[w > 0], 1 / (d_strat.p * 64)))
        small, big = sorted((d_iid, d_strat), key=lambda d: d.p)  # a larger p masks a superset
        assert not (small.mask & ~big.mask).any()


def test_stratified_loss_is_unbiased_with_lower_variance():
    """Mean of the training loss over many micro-batches: iid and stratified estimate the same
    ELBO; stratified t spreads less (the loss depends strongly on t, as a trained model's)."""
    model, tokens = MaskFractionModel(), torch.zeros(8, 33, dtype=torch.long)
    est = {}
    for mode in ("iid", "stratified"):
        obj = MDMObjective(V, random_length_prob=0.0, t_sampling=mode)
        est[mode] = torch.stack([obj.train_loss(model, tokens, _keys(8, s)) for s in range(300)])
    iid, strat = est["iid"], est["stratified"]
    assert strat.var() < 0.3 * iid.var()
    se = (iid.var() / len(iid) + strat.var() / len(strat)) ** 0.5
    assert abs(iid.mean() - strat.mean()) < 3 * se
    # and both match the validation ELBO (stratified over 256 times per row)
    elbo = MDMObjective(V).eval_loss(model, tokens[:2], torch.tensor([1, 2]), n_samples=256)
    assert abs(strat.mean() - elbo) < 3 * (strat.var() / len(strat)) ** 0.5 + 0.02


def test_t_sampling_option_is_validated():
    assert build_objective("mdm", V, t_sampling="stratified").t_sampling == "stratified"
    assert MDMObjective(V).t_sampling == "iid" and MDMConfig().t_sampling == "iid"
    with pytest.raises(ConfigError, match="t_sampling"):
        MDMObjective(V, t_sampling="sobol")
    with pytest.raises(ConfigError, match="t_sampling"):
        MDMConfig(t_sampling="sobol").validate()
    with pytest.raises(ConfigError, match="t_sampling"):
        build_objective("arm", V, t_sampling="stratified")
    sft = TrainConfig(
        task="sft", init="run", sft=SFTConfig(data="d.jsonl", epochs=1), objective="mdm"
    )
    sft.validate()
    sft.mdm.t_sampling = "stratified"  # the SFT objective draws its own t: refused, not ignored
    with pytest.raises(ConfigError, match="t_sampling.*sft"):
        sft.validate()


def test_trainer_uses_mdm_t_sampling(corpus_factory, tmp_path):
    """Real trainer, one step from the same init and rows: only t differs between the runs."""
    from trainer.cli import load_train_config
    from trainer.loop import train

    corpus = corpus_factory(vocab_size=64, seq_len=16, kind="ramp")
    base = [
        f"corpus={corpus}", "objective=mdm", "model=tiny-0.3M", "model_overrides.n_layer=1",
        "model_overrides.d_model=32", "model_overrides.n_head=2", "precision=fp32",
        "zero_stage=0", "batch.global_batch=8", "steps=1", "optim.warmup_min=0", "eval.every=0",
        "eval.at_end=false", "checkpoint.export=false", "tracking.enabled=false",
        "mdm.random_length_prob=0",
    ]  # fmt: skip
    loss = {}
    for mode in ("iid", "stratified"):
        run = tmp_path / mode
        train(load_train_config(None, [*base, f"run_dir={run}", f"mdm.t_sampling={mode}"]))
        assert f"t_sampling: {mode}" in (run / "config.yaml").read_text()
        loss[mode] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert loss["iid"] != pytest.approx(loss["stratified"], rel=1e-4)


def test_masked_mean_weighting_is_the_mean_ce_over_masked_tokens():
    """loss_weighting=masked_mean: the same masks as the ELBO, every masked token weighted
    equally (the mean CE over the micro-batch's masked tokens); the default stays the ELBO."""
    torch.manual_seed(0)
    model = _model(causal=False)
    tokens, keys = _batch(b=4, t=16)
    elbo = MDMObjective(V, random_length_prob=0.0)
    mean = build_objective("mdm", V, random_length_prob=0.0, loss_weighting="masked_mean")
    assert MDMObjective(V).loss_weighting == "elbo" and MDMConfig().loss_weighting == "elbo"
    w_elbo, _ = elbo.train_weights(keys, 16)
    w_mean, _ = mean.train_weights(keys, 16)
    masked = w_elbo > 0
    assert torch.equal(w_mean > 0, masked)  # same masks
    assert torch.allclose(w_mean[masked], torch.full_like(w_mean[masked], 4 / masked.sum()))
    x = tokens[:, :-1]
    with torch.no_grad():
        logits = model(torch.where(masked, V, x))
        ce = F.cross_entropy(logits.flatten(0, 1), x.reshape(-1), reduction="none").view(4, 16)
        expected = ce[masked].mean()
        assert float(mean.train_loss(model, tokens, keys)) == pytest.approx(float(expected))
        assert float(elbo.train_loss(model, tokens, keys)) != pytest.approx(float(expected))
    with pytest.raises(ConfigError, match="loss_weighting"):
        MDMConfig(loss_weighting="uniform").validate()
    with pytest.raises(ConfigError, match="loss_weighting"):
        MDMObjective(V, loss_weighting="uniform")


def test_row_mean_weighting_is_the_mean_over_rows_of_each_rows_masked_mean():
    """loss_weighting=row_mean: the ELBO's masks, each row's masked tokens weighted 1/count, so
    the loss is the mean over rows of each row's mean masked CE (a row without a masked token
    adds 0, as in the ELBO); cut rows keep their cut."""
    torch.manual_seed(0)
    model = _model(causal=False)
    tokens, keys = _batch(b=6, t=16)
    elbo = MDMObjective(V, random_length_prob=0.5)
    rows = build_objective("mdm", V, random_length_prob=0.5, loss_weighting="row_mean")
    w_elbo, len_elbo = elbo.train_weights(keys, 16)
    w_rows, len_rows = rows.train_weights(keys, 16)
    masked = w_elbo > 0
    assert torch.equal(w_rows > 0, masked) and torch.equal(len_elbo, len_rows)
    counts = masked.sum(dim=1)
    assert torch.allclose(w_rows.sum(dim=1), (counts > 0).float())
    x = tokens[:, :-1]
    with torch.no_grad():
        logits = model(torch.where(masked, V, x), lengths=len_rows)
        ce = F.cross_entropy(logits.flatten(0, 1), x.reshape(-1), reduction="none").view(6, 16)
        per_row = [float(ce[i][masked[i]].mean()) if counts[i] else 0.0 for i in range(6)]
        got = float(rows.train_loss(model, tokens, keys))
        assert got == pytest.approx(sum(per_row) / 6, rel=1e-5)
    MDMConfig(loss_weighting="row_mean").validate()


# ----------------------------------------------------------------------------- padding


def _padded(b: int = 3, t: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose rows 1 and 2 end in padding (lengths 9 and 14 of t + 1 = 17 ids)."""
    tokens, keys = _batch(b, t)
    lengths = torch.tensor([t + 1, 9, 14][:b])
    return tokens, keys, lengths


def _repad(tokens: torch.Tensor, lengths: torch.Tensor, value: int) -> torch.Tensor:
    out = tokens.clone()
    out[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = value
    return out


@pytest.mark.parametrize("chunk", [0, 5])
def test_arm_scores_no_padding(chunk):
    model = _model(causal=True)
    tokens, keys, lengths = _padded()
    obj = ARMObjective(loss_chunk=chunk)
    loss = obj.train_loss(model, tokens, keys, lengths)
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1]).double(), -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    text = torch.arange(16)[None, :] < (lengths - 1)[:, None]  # target j is token j + 1
    assert loss.item() == pytest.approx((nll * text).sum().item() / text.sum().item(), rel=1e-5)
    assert loss.item() != pytest.approx(nll.mean().item(), rel=1e-3)  # padding would move it
    for pad in (0, V - 1):  # what the padding holds does not matter
        assert obj.train_loss(model, _repad(tokens, lengths, pad), keys, lengths).item() == (
            pytest.approx(loss.item(), rel=1e-6)
        )
    losses, scored = obj.eval_token_losses(model, tokens, keys, 1, lengths)
    assert torch.equal(scored, text) and (losses[~scored] == 0).all()
    sums, counts = obj.eval_row_sums(model, tokens, keys, 1, lengths)
    assert counts.tolist() == [16, 8, 13]
    assert (sums.sum() / counts.sum()).item() == pytest.approx(loss.item(), rel=1e-5)


def test_mdm_neither_scores_nor_attends_to_padding():
    model = _model(causal=False)
    tokens, keys, lengths = _padded()
    obj = MDMObjective(V, random_length_prob=0.0)
    other = _repad(tokens, lengths, 1)
    with torch.no_grad():
        losses, scored = obj.eval_token_losses(model, tokens, keys, 8, lengths)
        again, _ = obj.eval_token_losses(model, other, keys, 8, lengths)
    assert scored.sum(1).tolist() == [16, 9, 14] and (losses[~scored] == 0).all()
    assert torch.allclose(losses, again, atol=1e-6)  # padding content never reaches the loss
    train = obj.train_loss(model, tokens, keys, lengths)
    assert obj.train_loss(model, other, keys, lengths).item() == pytest.approx(
        train.item(), rel=1e-6
    )
    full = obj.train_loss(model, tokens, keys)  # unpadded rows draw and score as before
    assert obj.train_loss(model, tokens, keys, torch.full((3,), 17)).item() == full.item()
    with pytest.raises(ValueError, match="lengths"):
        obj.train_loss(model, tokens, keys, torch.tensor([17, 1, 9]))
