import pytest
import torch

from resurgo.parallel.pipeline import cut_stage, stage_layers
from resurgo.trainer.config import ModelConfig
from resurgo.trainer.model import Transformer, apply_rope, rope_tables


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


def test_shapes_and_gqa():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300)
    model = build(cfg)
    attn = model.layers["0"].attention
    assert attn.wq.weight.shape == (64, 64) and attn.wk.weight.shape == (16, 64)
    assert model.layers["0"].feed_forward.w1.weight.shape == (cfg.hidden_dim, 64) == (192, 64)
    assert model(torch.randint(0, 300, (3, 10))).shape == (3, 10, 300)


def test_gqa_equals_repeated_kv_heads():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
    model = build(cfg)
    attn = model.layers["0"].attention
    x = torch.randn(2, 5, 32)
    out = attn(x, model.rope)
    # Same attention with every kv head repeated: an MHA model must give the same result.
    mha = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4)).layers["0"].attention
    with torch.no_grad():
        mha.wq.weight.copy_(attn.wq.weight)
        mha.wo.weight.copy_(attn.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(attn, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    torch.testing.assert_close(mha(x, model.rope), out)


def test_causal():
    model = build(ModelConfig())
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])


def test_rope_preserves_norm_and_relative_positions():
    head_dim, seq, theta = 8, 16, 10000.0
    tables = rope_tables(head_dim=head_dim, seq_len=seq, theta=theta, device=torch.device("cpu"))
    q = torch.randn(1, seq, 2, head_dim)
    torch.testing.assert_close(apply_rope(q, tables).norm(dim=-1), q.norm(dim=-1))

    # The same q and k at every position: scores[h, m, n] = <R(m) q, R(n) k>.
    torch.manual_seed(0)
    q, k = torch.randn(2, head_dim), torch.randn(2, head_dim)
    rq = apply_rope(q.expand(1, seq, 2, head_dim), tables)[0]
    rk = apply_rope(k.expand(1, seq, 2, head_dim), tables)[0]
    scores = torch.einsum("mhd,nhd->hmn", rq, rk)
    # Attention sees positions only through m - n: shifting both by s leaves every score unchanged.
    for s in (1, 3, 7, seq - 1):
        torch.testing.assert_close(scores[:, s:, s:], scores[:, : seq - s, : seq - s])
    # It does see m - n: the offsets give different scores (a rotation ignoring position would not).
    offsets = torch.stack([scores[:, d, 0] for d in range(seq)], dim=-1)
    assert (offsets[:, 1:] - offsets[:, :1]).abs().min() > 1e-3, offsets
    # And exactly as RoPE defines it: channel pairs as complex numbers turned by (m - n) * theta^(-2j/d).
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    qc, kc = (torch.view_as_complex(t.double().unflatten(-1, (-1, 2)).contiguous()) for t in (q, k))
    delta = torch.arange(seq, dtype=torch.float64)[:, None] - torch.arange(seq, dtype=torch.float64)[None, :]
    angles = delta[..., None] * freqs
    expected = ((qc * kc.conj())[:, None, None, :] * torch.polar(torch.ones_like(angles), angles)).real.sum(-1)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-5)


def test_init_is_identical_for_a_pipeline_stage_and_independent_of_order():
    cfg = ModelConfig(n_layers=4)
    full = dict(build(cfg, seed=3).named_parameters())
    with torch.device("meta"):
        stage = cut_stage(Transformer(cfg), stage_id=1, n_stages=2)
    stage.to_empty(device="cpu")
    stage.init_weights(seed=3)
    names = [n for n, _ in stage.named_parameters()]
    assert names and all(n.startswith(("layers.2", "layers.3", "norm", "output")) for n in names)
    for name, param in stage.named_parameters():
        assert torch.equal(param, full[name]), name
    assert not torch.equal(build(cfg, seed=4).output.weight, full["output.weight"])


def test_stage_layers_split_evenly_and_refuse_too_many_stages():
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="cannot fill"):
        stage_layers(2, 4)


def test_bad_model_config_is_refused():
    with pytest.raises(ValueError, match="multiple of model.n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_tied_embeddings_stay_tied_after_materializing():
    """`to_empty` gives each module a new parameter: the head is tied to the embedding again, so they
    train as one tensor (one gradient, one optimizer state)."""
    model = build(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    model(torch.randint(0, 256, (2, 5))).sum().backward()
    assert model.tok_embeddings.weight.grad is not None
