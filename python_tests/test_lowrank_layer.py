"""LowRankLinear and the (whitened) truncated SVD behind it."""
import pytest
import torch
from torch import nn

from reparam_kernels.compress import svd
from reparam_kernels.compress.calib import CalibStats
from reparam_kernels.nn import LowRankLinear


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_truncated_svd_is_eckart_young_optimal():
    g = _gen(1)
    W = torch.randn(37, 53, generator=g, dtype=torch.float64)
    r = 11
    u, v, s = svd.truncated_svd(W, rank=r)
    assert u.shape == (37, r) and v.shape == (r, 53)
    err = torch.linalg.norm(W - (u @ v).double())
    best = s.double()[r:].pow(2).sum().sqrt()  # Eckart–Young bound
    assert abs(err - best) / best < 1e-5
    # any other rank-r matrix (here: a perturbation of the optimum) is worse
    other = (u + 1e-2 * torch.randn(u.shape, generator=g)) @ v
    assert torch.linalg.norm(W - other.double()) > err


def test_energy_and_ratio_select_the_documented_rank():
    g = _gen(2)
    # known spectrum: σ_i = 2^-i
    Q1, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=torch.float64))
    sig = 2.0 ** -torch.arange(40, dtype=torch.float64)
    W = Q2 @ torch.diag(sig) @ Q1.t()  # [60, 40]
    e = sig ** 2
    frac = torch.cumsum(e, 0) / e.sum()
    for energy in (0.5, 0.9, 0.99, 0.999999):
        u, v, _ = svd.truncated_svd(W, energy=energy)
        r = u.shape[1]
        assert frac[r - 1] >= energy - 1e-9 and (r == 1 or frac[r - 2] < energy)
    for ratio in (0.1, 0.2, 0.4, 0.9):
        u, v, _ = svd.truncated_svd(W, ratio=ratio)
        r = u.shape[1]
        assert r * (60 + 40) <= (1 - ratio) * 60 * 40 < (r + 1) * (60 + 40)
    assert svd.rank_for_ratio(60, 40, 0.999) == 1


def _correlated_inputs(n, k, g):
    # strongly anisotropic, correlated inputs with a few outlier channels, like LLM activations
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * (0.7 ** torch.arange(k, dtype=torch.float64))[:, None]
    X = torch.randn(n, k, generator=g, dtype=torch.float64) @ mix
    X[:, :3] *= 20
    return X


def test_whitened_svd_beats_plain_svd_on_output_error():
    g = _gen(3)
    W = torch.randn(48, 64, generator=g, dtype=torch.float64)
    X = _correlated_inputs(500, 64, g)
    for r in (4, 16):
        up, vp, _ = svd.truncated_svd(W, rank=r)
        uw, vw, _ = svd.whitened_svd(W, X, rank=r)
        plain = (torch.linalg.norm(X @ (W - (up @ vp).double()).t()) / torch.linalg.norm(X @ W.t())).item()
        white = (torch.linalg.norm(X @ (W - (uw @ vw).double()).t()) / torch.linalg.norm(X @ W.t())).item()
        print(f"rank {r}: relative output error plain SVD {plain:.4f}, whitened SVD {white:.4f}")
        assert white < 0.8 * plain
        # output_error computed from XᵀX alone agrees with the direct measurement
        G = X.t() @ X
        assert abs(svd.output_error(W, uw @ vw, G) - white) < 1e-4
        # the weight error goes the other way: plain SVD is weight-optimal
        assert svd.weight_error(W, up @ vp) <= svd.weight_error(W, uw @ vw) + 1e-9


def test_whitened_svd_handles_rank_deficient_calibration():
    g = _gen(4)
    W = torch.randn(20, 30, generator=g, dtype=torch.float64)
    X = torch.randn(8, 30, generator=g, dtype=torch.float64)  # n < in: XᵀX singular
    X[:, 5] = 0  # dead channel
    u, v, _ = svd.whitened_svd(W, X, rank=8)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # rank 8 is enough to reproduce the outputs on the 8 calibration rows almost exactly
    Y, Yh = X @ W.t(), X @ (u @ v).double().t()
    assert torch.linalg.norm(Y - Yh) / torch.linalg.norm(Y) < 1e-3
    # CalibStats accumulated in pieces gives the same factors
    st = CalibStats(30)
    st.add(X[:3].float())
    st.add(X[3:].float())
    u2, v2, _ = svd.whitened_svd(W, st, rank=8)
    assert torch.allclose(u2 @ v2, u @ v, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_linear_full_rank_round_trip(dtype):
    torch.manual_seed(5)
    lin = nn.Linear(29, 17, dtype=dtype)
    for calib in (None, torch.randn(100, 29, dtype=dtype)):
        m = LowRankLinear.from_linear(lin, rank=17, calib=calib)
        assert m.u.shape == (17, 17) and m.v.shape == (17, 29) and m.u.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert (m.to_dense() - lin.weight).abs().max() < tol * 10
        x = torch.randn(3, 4, 29, dtype=dtype)
        torch.testing.assert_close(m(x), lin(x), rtol=tol * 10, atol=tol * 10)
        assert torch.equal(m.bias, lin.bias)


def test_state_dict_round_trip_and_parameter_count():
    torch.manual_seed(6)
    lin = nn.Linear(40, 30)
    m = LowRankLinear.from_linear(lin, ratio=0.5)
    assert m.rank * (40 + 30) <= 0.5 * 40 * 30
    sd = m.state_dict()
    assert set(sd) == {"u", "v", "bias"}
    m2 = LowRankLinear(40, 30, m.rank)
    m2.load_state_dict(sd)
    x = torch.randn(7, 40)
    assert torch.equal(m2(x), m(x))
    assert sum(p.numel() for p in m.parameters()) == m.rank * 70 + 30


def test_inside_module_trains_and_compiles():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24))
    net[0] = LowRankLinear.from_linear(net[0], rank=10)
    net[2] = LowRankLinear.from_linear(net[2], energy=0.9)
    x = torch.randn(5, 24)
    ref = net(x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref)
    # gradients reach the factors through the op's autograd
    compiled(x).square().mean().backward()
    assert net[0].u.grad is not None and net[0].v.grad.abs().sum() > 0


def test_inside_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(8)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    for layer in model.model.layers:
        layer.mlp.down_proj = LowRankLinear.from_linear(layer.mlp.down_proj, rank=32)  # full rank: exact
        layer.self_attn.q_proj = LowRankLinear.from_linear(layer.self_attn.q_proj, rank=32)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    sd = model.state_dict()
    assert "model.layers.0.mlp.down_proj.u" in sd


@pytest.mark.parametrize("kwargs, name", [
    (dict(), "rank"),
    (dict(rank=3, ratio=0.5), "rank"),
    (dict(rank=0), "rank"),
    (dict(rank=99), "rank"),
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=0.0), "ratio"),
    (dict(energy=1.5), "energy"),
    (dict(rank=3, calib=torch.randn(10, 7)), "calib"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    lin = nn.Linear(12, 9)
    with pytest.raises(ValueError, match=f"`{name}`"):
        LowRankLinear.from_linear(lin, **kwargs)


def test_bad_constructor_and_input():
    with pytest.raises(ValueError, match="`rank`"):
        LowRankLinear(8, 6, 7)
    with pytest.raises(ValueError, match="`in_features`"):
        LowRankLinear(0, 6, 1)
    with pytest.raises(ValueError, match="`linear`"):
        LowRankLinear.from_linear(nn.ReLU(), rank=1)
    m = LowRankLinear(8, 6, 3)
    with pytest.raises(ValueError, match="`x`"):
        m(torch.randn(2, 9))
