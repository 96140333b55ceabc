"""Input-energy weighting of the lookup-table quantizers (log and VQ), as int4's weighted grid: the error
each minimizes is Σ_k e_k (w_k − ŵ_k)² with e_k the mean square of input k (test_quant_grid.py has int4's)."""
import pytest
import torch

from reparam_kernels.compress import quantize as Q
from reparam_kernels.compress.calib import CalibStats
from reparam_kernels.compress.methods import METHODS, get_method
from reparam_kernels.compress.vq import kmeans_batched, vq_dequantize, vq_quantize
from reparam_kernels.nn import LUTLinear


def skewed_energy(rng, k):
    return torch.rand(k, generator=rng) ** 6 * 50 + 1e-3  # a few inputs carry most of the energy


def test_weighted_kmeans_is_a_fixed_point_of_weighted_lloyd(rng):
    """At convergence every centroid coordinate is the weighted mean of its points' and every point sits at
    its nearest centroid by the weighted distance (float64 checks); weights of ones change nothing."""
    x = torch.randn(3, 400, 2, generator=rng)
    wt = torch.rand(3, 400, 2, generator=rng) ** 3 + 1e-3
    c, idx = kmeans_batched(x, 8, iters=300, seed=3, weights=wt)
    x64, w64, c64 = x.double(), wt.double(), c.double()
    d = (w64[:, :, None, :] * (x64[:, :, None, :] - c64[:, None, :, :]) ** 2).sum(-1)  # [L, P, k]
    best = d.min(-1).values
    assert (d.gather(-1, idx[..., None])[..., 0] <= best * (1 + 1e-5) + 1e-9).all()
    for li in range(3):
        for j in range(8):
            sel = idx[li] == j
            if sel.any():
                mean = (w64[li, sel] * x64[li, sel]).sum(0) / w64[li, sel].sum(0)
                assert torch.allclose(c64[li, j], mean, rtol=1e-4, atol=1e-5)
    plain = kmeans_batched(x, 8, iters=20, seed=3)
    ones = kmeans_batched(x, 8, iters=20, seed=3, weights=torch.ones_like(x))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])


@pytest.mark.parametrize("d", [1, 2])
def test_vq_input_energy_lowers_the_weighted_error(rng, d):
    """Summed over 8 layers (k-means ends in local optima: one small layer alone can come out either way;
    one layer's ratio ranged 0.58-1.05 at d = 1 and 0.18-0.44 at d = 2 over hundreds of draws)."""
    weighted = plain = 0.0
    for _ in range(8):
        w = torch.randn(32, 96, generator=rng)
        e = skewed_energy(rng, 96)
        werr = lambda codes, books: ((vq_dequantize(codes, books).double() - w.double()) ** 2 * e.double()).sum()  # noqa: E731,B023
        weighted += werr(*vq_quantize(w, d=d, bits=4, rows_per_codebook=4, input_energy=e))
        plain += werr(*vq_quantize(w, d=d, bits=4, rows_per_codebook=4))
    assert weighted < (0.95 if d == 1 else 0.6) * plain
    for bad in (e[:10], -e):
        with pytest.raises(ValueError, match="`input_energy`"):
            vq_quantize(w, d=d, input_energy=bad)


def test_log_input_energy_picks_the_weighted_best_scale(rng):
    """quantize_log(scale_search=s, input_energy=e): per row, the candidate scale of least weighted error."""
    w = torch.randn(20, 64, generator=rng)
    e = skewed_energy(rng, 64)
    codes, scale = Q.quantize_log(w, 4, scale_search=12, input_energy=e)
    levels = Q.log_levels(4, torch.float64)
    amax = w.double().abs().amax(1)
    alphas = [1.0] + torch.pow(2.0, -torch.arange(1, 13, dtype=torch.float64) / 13).tolist()
    errs = []
    for a in alphas:
        c = Q._log_codes(w.double(), a * amax, 4)  # nearest level of the row at scale a·max|w|
        errs.append((e.double() * (a * amax[:, None] * levels[c.long()] - w.double()) ** 2).sum(1))
    best = torch.stack(errs).amin(0)
    got = (e.double() * (scale.double()[:, None] * levels[codes.long()] - w.double()) ** 2).sum(1)
    assert torch.allclose(got, best, rtol=1e-5)


@pytest.mark.parametrize("method,kw", [("vq", dict(d=1, rows_per_codebook=1)), ("log", {})])
def test_lut_layer_and_methods_weighted_grid(rng, method, kw):
    lin = torch.nn.Linear(64, 24, bias=False)
    x = torch.randn(500, 64, generator=rng) * skewed_energy(rng, 64).sqrt()
    stats = CalibStats.from_inputs(x)
    # the energy the method takes from the statistics, bit for bit: mean(x²) computed another way differs in
    # the last bits, and k-means (VQ) can then settle differently (a CI run failed so, once)
    e = stats.mean_square.float()
    layer = LUTLinear.from_linear(lin, method=method, input_energy=e, **kw)
    plain = LUTLinear.from_linear(lin, method=method, **kw)
    built = get_method(method).build(lin, dict(weighted_grid=True, **kw), stats)
    assert torch.equal(built.codes, layer.codes) and torch.allclose(built.lut, layer.lut)
    # the energy-weighted weight error: per row never higher for log (the best of the same scales), and
    # lower over the layer for VQ (k-means finds local optima: not row by row)
    werr = [((m.to_dense() - lin.weight).detach().double() ** 2 * e.double()).sum(1) for m in (layer, plain)]
    if method == "log":
        assert (werr[0] <= werr[1] * (1 + 1e-5) + 1e-12).all()
    assert werr[0].sum() < werr[1].sum()
    assert METHODS[method].needs_calib(dict(weighted_grid=True)) and not METHODS[method].needs_calib({})
