"""Asymmetric int4 grids: integer vs float zero point, clipping search (plain and input-energy weighted),
in round to nearest, GPTQ, the Int4Linear layer and the int4 recipe method; float zero points through the ops."""
import itertools

import pytest
import torch

from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.compress import quantize as Q
from reparam_kernels.compress.gptq import gptq_quantize
from reparam_kernels.compress.methods import get_method
from reparam_kernels.nn import Int4Linear
from conftest import TOL, rel_err


def heavy_w(rng, n, k):
    """Rows with a few large weights per group: where clipping the range pays."""
    w = torch.randn(n, k, generator=rng, dtype=torch.float64)
    w += 6 * torch.randn(n, k, generator=rng, dtype=torch.float64) * (torch.rand(n, k, generator=rng) < 0.02)
    return w.float()


def grid64_params(lo, hi, integer_zero, qmax=15):
    """float64 step and zero point of the grid spanning [lo, hi]."""
    s = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    z = -lo / s
    if integer_zero:
        z = torch.clamp(torch.round(z), 0, qmax)
    return s, z


def grid64(wg, lo, hi, integer_zero, qmax=15):
    """float64 reference of one grid: returns the dequantized wg."""
    s, z = grid64_params(lo, hi, integer_zero, qmax)
    q = torch.clamp(torch.round(wg / s[..., None] + z[..., None]), 0, qmax)
    return (q - z[..., None]) * s[..., None]


def f32_tol(s, z):
    """How far a value dequantized with float32-stored s and z may sit from the float64 grid's: a few
    roundings of 2^-24 of each, met through (q - z) * s with |q - z| <= 15 (one bound per group)."""
    return 4 * 2.0 ** -24 * (15 + z.double().abs()) * s.double()


def on_grid64(d, wg, lo, hi, integer_zero, s, z):
    """d (dequantized with float32 s, z) is the float64 grid's answer within f32_tol; a value the float64
    grid puts within 1e-4 of a rounding tie may land on either neighbour (one step off)."""
    s64, z64 = grid64_params(lo, hi, integer_zero)
    frac = torch.frac(wg / s64[..., None] + z64[..., None])
    tie = (frac - 0.5).abs() < 1e-4
    tol = f32_tol(s, z)[..., None] + 1e-9
    tol = torch.where(tie, tol + s.double()[..., None], tol)
    return bool(((d - grid64(wg, lo, hi, integer_zero)).abs() <= tol).all())


def deq(w, q, s, z):
    return Q.dequantize_linear(q, s, z, torch.float64).reshape(w.shape[0], s.shape[1], -1)


def test_integer_zero_is_the_classic_grid(rng):
    w = heavy_w(rng, 9, 192)
    q, s, z = Q.quantize_linear(w, bits=4, group_size=64, symmetric=False)
    wg = w.double().reshape(9, 3, 64)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    assert torch.equal(z, torch.round(z)) and (z >= 0).all() and (z <= 15).all()
    assert on_grid64(deq(w, q, s, z), wg, lo, hi, True, s, z)
    # zero is exactly representable
    assert torch.allclose(Q.dequantize_linear(z.round().to(torch.uint8).repeat_interleave(64, 1), s, z), torch.zeros(9, 192))


def test_float_zero_spans_exactly_min_to_max(rng):
    w = heavy_w(rng, 9, 192)
    # all-positive rows: the grid that must contain 0 wastes levels on [0, 3] (a third or more of the range,
    # so its larger step loses in squared error by a wide margin, not just on average)
    w[:3] = w[:3].abs() + 3.0
    qf, sf, zf = Q.quantize_linear(w, bits=4, group_size=64, symmetric=False, integer_zero=False)
    qi, si, zi = Q.quantize_linear(w, bits=4, group_size=64, symmetric=False)
    wg = w.double().reshape(9, 3, 64)
    assert not torch.equal(zf, torch.round(zf))  # really fractional
    d = deq(w, qf, sf, zf)
    assert on_grid64(d, wg, wg.amin(-1), wg.amax(-1), False, sf, zf)
    # group min and max map to codes 0 and 15 exactly; every weight within half a step
    tol = f32_tol(sf, zf)
    assert ((d.amin(-1) - wg.amin(-1)).abs() <= tol).all() and ((d.amax(-1) - wg.amax(-1)).abs() <= tol).all()
    assert ((d - wg).abs() <= 0.5 * sf.double()[..., None] * (1 + 1e-5) + 1e-7).all()
    assert (sf <= si + 1e-7).all()  # finer step than the grid that must contain 0
    assert (sf[:3] < 0.99 * si[:3]).all()
    assert ((d - wg)[:3] ** 2).sum() < ((deq(w, qi, si, zi) - wg)[:3] ** 2).sum()


@pytest.mark.parametrize("integer_zero", [True, False])
def test_clip_search_is_the_best_range_of_the_grid(rng, integer_zero):
    w = heavy_w(rng, 6, 128)
    steps, min_clip = 4, 0.6
    q, s, z = Q.quantize_linear(w, bits=4, group_size=32, symmetric=False, integer_zero=integer_zero,
                                clip_steps=steps, min_clip=min_clip)
    wg = w.double().reshape(6, 4, 32)
    lo, hi = wg.amin(-1), wg.amax(-1)
    if integer_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    fracs = torch.linspace(1.0, min_clip, steps + 1, dtype=torch.float64)
    errs = torch.stack([((grid64(wg, lo * a, hi * b, integer_zero) - wg) ** 2).sum(-1)
                        for a, b in itertools.product(fracs, fracs)])  # brute force over all (a, b)
    got = ((deq(w, q, s, z) - wg) ** 2).sum(-1)
    assert torch.allclose(got, errs.amin(0), rtol=1e-4, atol=1e-9)
    plain = ((deq(w, *Q.quantize_linear(w, 4, 32, False, integer_zero=integer_zero)) - wg) ** 2).sum(-1)
    assert (got <= plain * (1 + 1e-6)).all() and got.sum() < plain.sum()


def test_importance_weights_the_clip_search(rng):
    wg = heavy_w(rng, 40, 64).reshape(40, 2, 32)
    imp = torch.rand(2, 32, generator=rng) ** 4 * 10  # a few columns carry most of the energy
    s_w, z_w = Q.asymmetric_grid(wg, 4, False, 6, 0.5, imp)
    s_u, z_u = Q.asymmetric_grid(wg, 4, False, 6, 0.5)

    def werr(s, z):
        d = (Q.asym_codes(wg, s, z, 15) - z[..., None]) * s[..., None]
        return ((d - wg) ** 2 * imp).sum(-1)

    assert (werr(s_w, z_w) <= werr(s_u, z_u) * (1 + 1e-5)).all() and werr(s_w, z_w).sum() < werr(s_u, z_u).sum()


def test_grid_bad_arguments():
    w = torch.randn(4, 64)
    for kw, name in [(dict(clip_steps=-1), "clip_steps"), (dict(clip_steps=True), "clip_steps"),
                     (dict(min_clip=0.0), "min_clip"), (dict(min_clip=1.5), "min_clip"),
                     (dict(integer_zero=1), "integer_zero")]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            Q.quantize_linear(w, 4, 32, False, **kw)
        with pytest.raises(ValueError, match=f"`{name}`"):
            gptq_quantize(w, torch.eye(64), group_size=32, **kw)


def correlated(rng, k, *rows):
    """Samples [r, k] for each r in rows, all from one distribution: correlated, uneven channel energies."""
    scale = torch.rand(k, generator=rng) * 3 + 0.1
    mix = (torch.randn(k, k, generator=rng) / k ** 0.5 + 0.3 * torch.eye(k)) * scale
    return [(torch.randn(r, k, generator=rng) @ mix).double() for r in rows]


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_clipped_float_grid(rng, act_order):
    n, k, g = 48, 256, 64
    w = heavy_w(rng, n, k)
    x, xt = correlated(rng, k, 1024, 512)
    H = x.t() @ x
    ref = xt @ w.double().t()

    def out_err(q_, s_, z_):
        return ((xt @ Q.dequantize_linear(q_, s_, z_, torch.float64).t() - ref).norm() / ref.norm()).item()

    kw = dict(integer_zero=False, clip_steps=5)
    gp = gptq_quantize(w, H, bits=4, group_size=g, act_order=act_order, **kw)
    rtn = Q.quantize_linear(w, 4, g, symmetric=False, **kw)
    assert gp[0].dtype == torch.uint8 and gp[0].max() <= 15
    if act_order:  # static groups: the grid searched on the original weight, weighted by H_kk
        s, z = Q.asymmetric_grid(w.double().reshape(n, k // g, g), 4, False, 5, 0.5,
                                 torch.diag(H).reshape(k // g, g))
        assert torch.allclose(gp[1], s.float()) and torch.allclose(gp[2], z.float())
        assert not torch.equal(gp[2], torch.round(gp[2]))
    print(f"act_order={act_order}: output error GPTQ {out_err(*gp):.4f}, RTN {out_err(*rtn):.4f}")
    assert out_err(*gp) < 0.85 * out_err(*rtn)


@pytest.mark.skipif(rk_triton.int4_linear is None, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fractional_zero_points_through_the_ops(rng, dtype):
    """The ops take the zero point as a number: a non-integer one must decode as (q − z)·s too."""
    n, k, g = 37, 128, 64
    w = heavy_w(rng, n, k) * 0.05
    q, s, z = Q.quantize_linear(w, 4, g, symmetric=False, integer_zero=False, clip_steps=3)
    x = torch.randn(3, 5, k, generator=rng).to(dtype)
    sd, zd = s.to(dtype), z.to(dtype)
    w64 = Q.dequantize_linear(q, sd.double(), zd.double(), torch.float64)  # with the zero as stored in dtype
    exact = x.double() @ w64.t()
    args = (x, Q.pack_int4(q), sd, zd, g)
    for fn in (reference.int4_linear, rk_triton.int4_linear):
        assert rel_err(fn(*args), exact) <= TOL[dtype]


@pytest.mark.parametrize("calib", [False, True])
def test_layer_and_recipe_method_pass_the_grid(rng, calib):
    lin = torch.nn.Linear(128, 24)
    with torch.no_grad():
        lin.weight.copy_(heavy_w(rng, 24, 128) * 0.05)
    stats = correlated(rng, 128, 256)[0] if calib else None
    kw = dict(integer_zero=False, clip_steps=4, min_clip=0.7)
    layer = Int4Linear.from_linear(lin, group_size=64, calib=stats, **kw)
    if calib:
        want = gptq_quantize(lin.weight.detach(), stats.t() @ stats, group_size=64, act_order=True, **kw)
    else:
        want = Q.quantize_linear(lin.weight.detach(), 4, 64, symmetric=False, **kw)
    assert torch.equal(Q.unpack_int4(layer.qweight), want[0])
    assert torch.allclose(layer.scales, want[1]) and torch.allclose(layer.zeros, want[2])
    x = torch.randn(7, 128, generator=rng)
    y64 = x.double() @ layer.to_dense().double().t() + lin.bias.double()
    assert rel_err(layer(x), y64) <= TOL[torch.float32]
    from reparam_kernels.compress.calib import CalibStats
    st = CalibStats.from_inputs(stats.float()) if calib else None
    built = get_method("int4").build(lin, dict(group_size=64, gptq=calib, **kw), st)
    assert torch.equal(built.qweight, layer.qweight)


def test_int4_method_defaults(rng):
    """Round to nearest and gptq=true both default to the float-zero clipped grid (Int4Linear.from_linear too)."""
    lin = torch.nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(heavy_w(rng, 16, 128) * 0.05)
    rtn = get_method("int4").build(lin, dict(group_size=64), None)
    want = Q.quantize_linear(lin.weight.detach(), 4, 64, symmetric=False, integer_zero=False, clip_steps=10)
    assert torch.equal(Q.unpack_int4(rtn.qweight), want[0]) and torch.allclose(rtn.zeros, want[2])
    from reparam_kernels.compress.calib import CalibStats
    x = correlated(rng, 128, 256)[0]
    st = CalibStats.from_inputs(x.float())
    gp = get_method("int4").build(lin, dict(group_size=64, gptq=True), st)
    want = gptq_quantize(lin.weight.detach(), st.gram, bits=4, group_size=64, symmetric=False, act_order=True,
                         integer_zero=False, clip_steps=10)
    assert torch.equal(Q.unpack_int4(gp.qweight), want[0]) and torch.allclose(gp.zeros, want[2])
    assert not torch.equal(gp.zeros, torch.round(gp.zeros))  # a float zero point, not the integer grid
    direct = Int4Linear.from_linear(lin, group_size=64)
    assert torch.equal(direct.qweight, rtn.qweight) and torch.equal(direct.zeros, rtn.zeros)


def test_refine_never_worse_and_is_the_least_squares_fit(rng):
    """refine_steps: per group the error never rises, falls somewhere, and a refined group's (s, z) is the
    least-squares line through (code, weight) for its own codes (checked in float64)."""
    w = heavy_w(rng, 16, 256)
    kw = dict(bits=4, group_size=64, symmetric=False, integer_zero=False, clip_steps=4)
    q0, s0, z0 = Q.quantize_linear(w, **kw)
    q1, s1, z1 = Q.quantize_linear(w, **kw, refine_steps=3)
    wg = w.double().reshape(16, 4, 64)
    e0 = ((deq(w, q0, s0, z0) - wg) ** 2).sum(-1)
    e1 = ((deq(w, q1, s1, z1) - wg) ** 2).sum(-1)
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < 0.97 * e0.sum()
    # one step from the clipped grid: the fit of the clipped grid's codes, where it was kept
    qa, sa, za = Q.quantize_linear(w, **kw, refine_steps=1)
    codes = q0.double().reshape(16, 4, 64)
    A = torch.stack([codes, torch.ones_like(codes)], -1)  # w ≈ a·q + b
    sol = torch.linalg.lstsq(A, wg[..., None]).solution[..., 0]
    kept = ~torch.isclose(sa.double(), s0.double(), rtol=0, atol=0)
    assert kept.float().mean() > 0.5
    assert torch.allclose(sa.double()[kept], sol[..., 0][kept], rtol=1e-4)
    assert torch.allclose((-za.double() * sa.double())[kept], sol[..., 1][kept], rtol=1e-3, atol=1e-5)


def test_refine_in_gptq_layer_and_method(rng):
    lin = torch.nn.Linear(128, 24)
    with torch.no_grad():
        lin.weight.copy_(heavy_w(rng, 24, 128))
    x = torch.randn(256, 128, generator=rng)
    for calib in (None, x):
        a = Int4Linear.from_linear(lin, group_size=64, calib=calib)
        b = Int4Linear.from_linear(lin, group_size=64, calib=calib, refine_steps=2)
        ea = (a.to_dense() - lin.weight).pow(2).sum()
        eb = (b.to_dense() - lin.weight).pow(2).sum()
        if calib is None:
            assert eb < ea
        else:  # GPTQ: the refined grid is chosen before the sweep; output error stays close or better
            oa, ob = (x @ (a.to_dense() - lin.weight).t()).norm(), (x @ (b.to_dense() - lin.weight).t()).norm()
            assert ob < 1.05 * oa
    layer = get_method("int4").build(lin, {"group_size": 64, "refine_steps": 2}, None)
    assert torch.equal(layer.scales, Int4Linear.from_linear(lin, group_size=64, refine_steps=2).scales)
    with pytest.raises(ValueError, match="refine_steps"):
        Q.quantize_linear(lin.weight, bits=4, group_size=64, symmetric=False, refine_steps=-1)
    with pytest.raises(ValueError, match="integer_zero=False"):
        Q.quantize_linear(lin.weight, bits=4, group_size=64, symmetric=False, integer_zero=True, refine_steps=1)


def test_input_energy_weights_round_to_nearest(rng):
    """quantize_linear(input_energy=e): the grid search weighted by e per input column (the same search as
    asymmetric_grid's importance), never worse than the plain grid in that weighted error; uniform energy
    changes nothing; bad energies and the symmetric grid are refused naming the argument."""
    w = heavy_w(rng, 24, 128)
    energy = torch.rand(128, generator=rng) ** 4 * 10  # a few inputs carry most of the energy
    kw = dict(bits=4, group_size=64, symmetric=False, integer_zero=False, clip_steps=6)
    q, s, z = Q.quantize_linear(w, **kw, input_energy=energy)
    s_ref, z_ref = Q.asymmetric_grid(w.reshape(24, 2, 64), 4, False, 6, 0.5, energy.reshape(1, 2, 64))
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    q0, s0, z0 = Q.quantize_linear(w, **kw)
    wg = w.double().reshape(24, 2, 64)
    e = energy.double().reshape(1, 2, 64)
    err_w = (((deq(w, q, s, z) - wg) ** 2) * e).sum(-1)
    err_0 = (((deq(w, q0, s0, z0) - wg) ** 2) * e).sum(-1)
    assert (err_w <= err_0 * (1 + 1e-6)).all() and err_w.sum() < 0.95 * err_0.sum()
    uniform = Q.quantize_linear(w, **kw, input_energy=torch.full((128,), 3.0))
    assert all(torch.equal(a, b) for a, b in zip(uniform, (q0, s0, z0)))
    for bad in (torch.rand(64), -energy, energy.to(torch.int64), torch.full((128,), float("nan"))):
        with pytest.raises(ValueError, match="`input_energy`"):
            Q.quantize_linear(w, **kw, input_energy=bad)
    with pytest.raises(ValueError, match="`input_energy`"):
        Q.quantize_linear(w, 4, 64, symmetric=True, input_energy=energy)


def test_weighted_grid_method_uses_the_layer_input_energy(rng):
    """int4 weighted_grid=true: round to nearest weighted by diag(XᵀX)/n of the layer's calibration inputs
    (Int4Linear.from_linear(input_energy=...)); it needs calibration data and is refused beside gptq."""
    from reparam_kernels.compress.calib import CalibStats
    from reparam_kernels.compress.methods import METHODS
    lin = torch.nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(heavy_w(rng, 16, 128) * 0.05)
    x = correlated(rng, 128, 300)[0].float()
    stats = CalibStats.from_inputs(x)
    built = get_method("int4").build(lin, dict(group_size=64, weighted_grid=True), stats)
    energy = stats.mean_square.float()  # = mean x² per input (the polish below is continuous: the very same energy)
    assert torch.allclose(energy, (x.double() ** 2).mean(0).float(), rtol=1e-5)
    # the method polishes a weighted grid by default (refine_steps 'auto' = 5)
    want = Q.quantize_linear(lin.weight.detach(), 4, 64, symmetric=False, integer_zero=False, clip_steps=10,
                             input_energy=energy, refine_steps=5)
    assert torch.equal(Q.unpack_int4(built.qweight), want[0]) and torch.allclose(built.zeros, want[2])
    direct = Int4Linear.from_linear(lin, group_size=64, input_energy=energy, refine_steps=5)
    assert torch.equal(direct.qweight, built.qweight)
    plain = Int4Linear.from_linear(lin, group_size=64)
    assert not torch.equal(plain.zeros, built.zeros)  # the weighting changed some group's grid
    # per group, the energy-weighted weight error (the diagonal part of the output error on x) never rises
    werr = [((m.to_dense() - lin.weight).detach().double() ** 2 * energy.double()).reshape(16, 2, 64).sum(-1)
            for m in (built, plain)]
    assert (werr[0] <= werr[1] * (1 + 1e-5) + 1e-12).all() and werr[0].sum() < werr[1].sum()
    m = METHODS["int4"]
    assert m.needs_calib(dict(weighted_grid=True)) and not m.needs_calib({})
    with pytest.raises(ValueError, match="weighted_grid"):
        m.check(16, 128, dict(weighted_grid=True, gptq=True))
    with pytest.raises(ValueError, match="`input_energy`"):
        Int4Linear.from_linear(lin, group_size=64, calib=x, input_energy=energy)
