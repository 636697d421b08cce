"""The shared ARM/MDM Transformer: shapes, masking, init, precision, parameter and FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.configlib import ConfigError
from trainer.model import (
    ModelConfig,
    Rotary,
    Transformer,
    flops_per_token,
    non_embedding_params,
)

torch.set_num_threads(1)

TINY = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=50, seq_len=16)


def _model(causal: bool, cfg: ModelConfig = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, causal=causal).eval()


def _tokens(b: int = 2, t: int = 12, vocab: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_shapes_embedding_rows_and_mask_token():
    model = _model(causal=False)
    assert model.embed.weight.shape == (TINY.vocab_size + 1, TINY.d_model)
    assert model.head.weight.shape == (TINY.vocab_size, TINY.d_model)
    assert TINY.mask_id == TINY.vocab_size
    ids = _tokens()
    ids[:, ::3] = TINY.mask_id  # the mask token is a valid input
    logits = model(ids)
    assert logits.shape == (2, 12, TINY.vocab_size)
    assert torch.isfinite(logits).all()
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))


@torch.no_grad()
def test_causal_model_ignores_future_tokens():
    model = _model(causal=True)
    ids = _tokens()
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % TINY.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-5)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


@torch.no_grad()
def test_bidirectional_model_sees_future_tokens():
    model = _model(causal=False)
    ids = _tokens()
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % TINY.vocab_size
    a, b = model(ids), model(changed)
    assert (a[:, :6] - b[:, :6]).abs().amax(dim=-1).min() > 1e-4  # every early position moves


@pytest.mark.parametrize("causal", [False, True])
@torch.no_grad()
def test_lengths_cut_rows_like_running_them_alone(causal):
    model = _model(causal=causal)
    ids = _tokens(b=4, t=12)
    ids[1, 2] = TINY.mask_id
    lengths = torch.tensor([12, 5, 1, 9])
    out = model(ids, lengths=lengths)
    assert out.shape == (4, 12, TINY.vocab_size) and torch.isfinite(out).all()
    for row, n in enumerate(lengths.tolist()):
        alone = model(ids[row : row + 1, :n])[0]
        torch.testing.assert_close(out[row, :n], alone, rtol=1e-5, atol=1e-6)
    # tokens past a row's cut do not reach its kept positions
    changed = ids.clone()
    changed[1, 5:] = (changed[1, 5:] + 7) % TINY.vocab_size
    torch.testing.assert_close(model(changed, lengths=lengths)[1, :5], out[1, :5], rtol=0, atol=0)


def test_lengths_cut_gradients_like_running_rows_alone():
    model = _model(causal=False)
    ids = _tokens(b=3, t=12)
    lengths = torch.tensor([12, 4, 7])
    targets = _tokens(b=3, t=12, seed=9)
    logits = model(ids, lengths=lengths)
    keep = torch.arange(12)[None, :] < lengths[:, None]
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), reduction="none"
    )
    (ce * keep.flatten()).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(
        torch.nn.functional.cross_entropy(
            model(ids[r : r + 1, :n])[0], targets[r, :n], reduction="sum"
        )
        for r, n in enumerate(lengths.tolist())
    )
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("causal", [False, True])
def test_cut_rows_stay_on_the_fused_attention_path(causal, monkeypatch):
    """No call ever passes a dense mask (it would leave the flash kernels): a causal model
    ignores cuts, a bidirectional one runs uncut rows together and each cut row on its prefix."""
    model = _model(causal=causal)
    ids = _tokens(b=3)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[0], q.shape[2], kwargs))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        plain = model(ids)
        full = model(ids, lengths=torch.tensor([12, 12, 12]))
        model(ids, lengths=torch.tensor([12, 3, 12]))
    assert torch.equal(plain, full)
    n = TINY.n_layer
    assert all("attn_mask" not in kw for _, _, kw in calls)
    assert calls[: 2 * n] == [(3, 12, {"is_causal": causal})] * (2 * n)  # fused kernels
    if causal:  # a cut changes only positions past it: the causal kernel already hides them
        assert calls[2 * n :] == [(3, 12, {"is_causal": True})] * n
    else:  # per block: rows 0 and 2 at full length, then row 1 alone on its 3 kept positions
        assert calls[2 * n :] == [(2, 12, {}), (1, 3, {})] * n


def _dense_mask_attention(q, k, v, lengths):
    """The previous implementation of a cut: one SDPA call with a boolean key mask."""
    keys = torch.arange(q.shape[2])
    mask = (keys < lengths[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_cut_attention_equals_the_dense_masked_path(monkeypatch):
    """Kept outputs and all gradients equal the dense-mask computation (fp32 tolerance)."""
    ids, targets = _tokens(b=4, t=12), _tokens(b=4, t=12, seed=9)
    lengths = torch.tensor([12, 5, 1, 9])
    keep = (torch.arange(12)[None, :] < lengths[:, None]).flatten()

    def run():
        model = _model(causal=False).train()
        logits = model(ids, lengths=lengths)
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        )
        (ce * keep).sum().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    logits, grads = run()
    monkeypatch.setattr("trainer.model.cut_attention", _dense_mask_attention)
    ref_logits, ref_grads = run()
    kept = keep.view(4, 12)
    torch.testing.assert_close(logits[kept], ref_logits[kept], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("lengths", [[12], [0, 12], [12, 13]])
def test_bad_lengths_are_refused(lengths):
    with pytest.raises(ValueError, match="lengths"):
        _model(causal=False)(_tokens(), lengths=torch.tensor(lengths))


def test_same_weights_for_arm_and_mdm_given_seed():
    arm, mdm = _model(causal=True), _model(causal=False)
    for (na, pa), (nm, pm) in zip(arm.state_dict().items(), mdm.state_dict().items()):
        assert na == nm and torch.equal(pa, pm)


def test_init_stds():
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=256, vocab_size=1000, seq_len=32)
    model = _model(causal=True, cfg=cfg)
    std = math.sqrt(2 / (5 * 256))
    out_std = 1 / math.sqrt(256) / 4
    checks = {
        "embed.weight": std,
        "head.weight": std,
        "blocks.0.attn.qkv.weight": std,
        "blocks.3.mlp.gate_up.weight": std,
        "blocks.1.attn.out.weight": out_std,
        "blocks.2.mlp.down.weight": out_std,
    }
    params = dict(model.named_parameters())
    for name, expected in checks.items():
        w = params[name].detach()
        assert abs(w.std().item() / expected - 1) < 0.03, name
        assert abs(w.mean().item()) < expected * 0.05, name
    norms = [p for n, p in params.items() if n.endswith("norm.weight")]
    assert len(norms) == 2 * 4 + 1
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)


@pytest.mark.parametrize("ffn", [None, 72])
def test_count_matches_formula(ffn):
    cfg = ModelConfig(n_layer=3, n_head=2, d_model=32, ffn_hidden=ffn, vocab_size=50)
    f = ffn or 4 * 32
    expected = 3 * (4 * 32**2 + 3 * 32 * f + 2 * 32) + 32
    assert non_embedding_params(cfg) == expected
    assert Transformer(cfg, causal=True).count_non_embedding_params() == expected
    with torch.device("meta"):
        meta = Transformer(cfg, causal=False)
    assert meta.count_non_embedding_params() == expected


def test_flops_per_token_formula():
    cfg = ModelConfig(n_layer=6, n_head=4, d_model=256)
    n = non_embedding_params(cfg)
    assert flops_per_token(cfg) == 6 * n + 12 * 6 * 256 * 2048
    assert flops_per_token(cfg, seq_len=512) == 6 * n + 12 * 6 * 256 * 512
    assert flops_per_token(cfg, include_head=True) == flops_per_token(cfg) + 6 * 256 * 32000


def test_rope_tables_fp32_non_persistent_and_survive_casts():
    model = _model(causal=True)
    assert not any("cos" in k or "sin" in k for k in model.state_dict())
    ref_cos = model.rotary.cos.clone()
    assert ref_cos.dtype == torch.float32 and ref_cos.shape == (TINY.seq_len, TINY.head_dim)
    model.bfloat16()
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(model.rotary.cos, ref_cos, rtol=0, atol=0)
    model.to_empty(device="cpu")  # e.g. after meta init: tables are rebuilt, not garbage
    torch.testing.assert_close(model.rotary.cos, ref_cos, rtol=0, atol=0)
    with torch.no_grad():
        model.reset_parameters()
        logits = model(_tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_rope_tables_exact_when_float_constructors_round_to_bf16(monkeypatch):
    """DeepSpeed's zero.Init casts floating results of torch.arange/empty/... to bf16."""
    ref = Rotary(head_dim=16, seq_len=64, base=10000.0)

    def rounding(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out.to(torch.bfloat16) if out.is_floating_point() else out

        return wrapped

    for name in ("arange", "empty", "zeros", "ones", "tensor"):
        monkeypatch.setattr(torch, name, rounding(getattr(torch, name)))
    rot = Rotary(head_dim=16, seq_len=64, base=10000.0)
    assert rot.cos.dtype == torch.float32
    torch.testing.assert_close(rot.cos, ref.cos, rtol=0, atol=0)
    torch.testing.assert_close(rot.sin, ref.sin, rtol=0, atol=0)


def test_rope_depends_only_on_relative_position():
    rot = Rotary(head_dim=8, seq_len=32, base=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        qs = torch.zeros(1, 1, 32, 8)
        ks = torch.zeros(1, 1, 32, 8)
        qs[0, 0, m], ks[0, 0, n] = q, k
        return (rot(qs)[0, 0, m] * rot(ks)[0, 0, n]).sum()

    torch.testing.assert_close(score(3, 1), score(20, 18), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))
    x = torch.randn(1, 2, 32, 8)
    torch.testing.assert_close(rot(x).norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_autocast_bf16_forward_and_backward():
    model = _model(causal=False).train()
    ids = _tokens()
    with torch.no_grad():
        ref = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref).abs().max() < 0.1
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_long_sequence_is_refused():
    model = _model(causal=True)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, TINY.seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"n_layer": 2, "n_head": 3, "d_model": 32}, "n_head"),
        ({"n_layer": 2, "n_head": 8, "d_model": 24}, "must be even"),
        ({"n_layer": 0, "n_head": 2, "d_model": 32}, "n_layer"),
        ({"n_layer": 2, "n_head": 2, "d_model": 32, "ffn_hidden": 0}, "ffn_hidden"),
        ({"n_layer": 2, "n_head": 2, "d_model": 32, "norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_invalid_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**kw).validate()
