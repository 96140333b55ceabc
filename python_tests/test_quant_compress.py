"""Quantizers: linear (sym/asym, per-channel/group), packing round trips, log, VQ, GPTQ vs RTN."""
import pytest
import torch

from reparam_kernels.compress import quantize as Q
from reparam_kernels.compress.gptq import gptq_quantize
from reparam_kernels.compress.vq import kmeans, vq_dequantize, vq_quantize


def rand_w(rng, n, k):
    return torch.randn(n, k, generator=rng) * (torch.rand(n, 1, generator=rng) + 0.1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_linear_quant_error_within_half_step(rng, bits, symmetric, group):
    w = rand_w(rng, 12, 256)
    q, s, z = Q.quantize_linear(w, bits=bits, group_size=group, symmetric=symmetric)
    g = 256 if group is None else group
    assert s.shape == (12, 256 // g) and (z is None) == symmetric
    if symmetric:
        assert q.dtype == torch.int8 and q.abs().max() <= 2 ** (bits - 1) - 1
    else:
        assert q.dtype == torch.uint8 and q.max() <= 2 ** bits - 1
    wd = Q.dequantize_linear(q, s, z, torch.float64)
    step = s.double().repeat_interleave(g, 1)
    # round-to-nearest: every weight within half a step (plus float slack) of its code's value
    assert ((wd - w.double()).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all()
    # the extreme of each group is representable (no clipping beyond half a step)
    assert (wd.abs().amax(1) >= w.abs().amax(1).double() - 0.5 * step.amax(1) - 1e-6).all()


def test_group_must_divide_k():
    with pytest.raises(ValueError, match="`group_size` = 64 does not divide in_features K = 96"):
        Q.quantize_linear(torch.randn(4, 96), bits=4, group_size=64)
    with pytest.raises(ValueError, match="`bits`"):
        Q.quantize_linear(torch.randn(4, 96), bits=5)


def test_int4_pack_round_trip_and_layout(rng):
    q = torch.randint(0, 16, (7, 38), generator=rng, dtype=torch.uint8)
    p = Q.pack_int4(q)
    assert p.shape == (7, 19) and p.dtype == torch.uint8
    assert torch.equal(p[:, 0], q[:, 0] | (q[:, 1] << 4))  # low nibble = even k
    assert torch.equal(Q.unpack_int4(p), q)
    with pytest.raises(ValueError, match="even number of columns"):
        Q.pack_int4(q[:, :5])
    with pytest.raises(ValueError, match="outside the unsigned 4-bit range"):
        Q.pack_int4(q.to(torch.int16) + 1)


def test_int8_pack_round_trip(rng):
    q = torch.randint(-128, 128, (5, 33), generator=rng, dtype=torch.int16)
    assert torch.equal(Q.unpack_int8(Q.pack_int8(q)), q)
    with pytest.raises(ValueError, match="outside the int8 range"):
        Q.pack_int8(q + 200)


def test_symmetric_int4_to_unsigned_form(rng):
    w = rand_w(rng, 6, 64)
    q, s, z = Q.quantize_linear(w, 4, 32, symmetric=True)
    qu, su, zu = Q.to_unsigned4(q, s, z)
    assert qu.min() >= 1 and qu.max() <= 15 and (zu == 8).all()
    assert torch.allclose(Q.dequantize_linear(qu, su, zu), Q.dequantize_linear(q, s, None))


@pytest.mark.parametrize("bits", [4, 8])
def test_log_quant_codes_and_nearest_level(rng, bits):
    w = rand_w(rng, 9, 50)
    codes, scale = Q.quantize_log(w, bits)
    levels = Q.log_levels(bits, torch.float64)
    nz = levels[levels != 0].abs()
    assert torch.allclose(torch.log2(nz), torch.round(torch.log2(nz)))  # powers of two
    assert int(codes.max()) < 2 ** bits and scale.shape == (9,)
    wd = Q.dequantize_log(codes, scale, bits, torch.float64)
    # chosen level is the nearest of all levels (brute force)
    cand = scale.double()[:, None, None] * levels[None, None, :]
    best = (cand - w.double()[..., None]).abs().amin(-1)
    assert torch.allclose((wd - w.double()).abs(), best, atol=1e-7)
    assert torch.allclose(wd.abs().amax(1), w.abs().amax(1).double(), rtol=1e-6)  # row max exact


def test_log_scale_search_never_worse_and_nearest(rng):
    w = rand_w(rng, 16, 80)
    c0, s0 = Q.quantize_log(w, 4)
    c1, s1 = Q.quantize_log(w, 4, scale_search=12)
    e0 = (Q.dequantize_log(c0, s0, 4, torch.float64) - w.double()).pow(2).sum(1)
    e1 = (Q.dequantize_log(c1, s1, 4, torch.float64) - w.double()).pow(2).sum(1)
    assert (e1 <= e0 * (1 + 1e-9)).all() and e1.sum() < e0.sum()
    assert ((s1 <= s0 * (1 + 1e-6)) & (s1 >= s0 / 2 * (1 - 1e-6))).all()
    cand = s1.double()[:, None, None] * Q.log_levels(4, torch.float64)[None, None, :]
    best = (cand - w.double()[..., None]).abs().amin(-1)
    assert torch.allclose((Q.dequantize_log(c1, s1, 4, torch.float64) - w.double()).abs(), best, atol=1e-6)


@pytest.mark.parametrize("d,bits,rows", [(1, 4, None), (2, 6, None), (4, 5, 8), (8, 4, 16), (3, 3, None)])
def test_vq_shapes_and_assignment(rng, d, bits, rows):
    w = rand_w(rng, 32, 48)
    codes, books = vq_quantize(w, d=d, bits=bits, rows_per_codebook=rows, iters=10)
    L = 1 if rows is None else 32 // rows
    assert codes.shape == (32, 48 // d) and books.shape == (L, 2 ** bits, d)
    wd = vq_dequantize(codes, books)
    # every sub-vector is assigned to its nearest centroid
    sub = w.reshape(32, -1, d)
    book_of_row = torch.arange(32) // (32 // L)
    dist = ((sub[:, :, None, :] - books[book_of_row][:, None, :, :]) ** 2).sum(-1)
    assert torch.allclose(dist.gather(2, codes[..., None]).squeeze(-1), dist.amin(-1), atol=1e-5)
    assert ((wd - w).norm() / w.norm()) < (0.15 if d == 1 else 0.9)


def test_vq_seeded_and_beats_uniform_grid(rng):
    w = rand_w(rng, 16, 64)
    c1, b1 = vq_quantize(w, d=1, bits=4, seed=3)
    c2, b2 = vq_quantize(w, d=1, bits=4, seed=3)
    assert torch.equal(c1, c2) and torch.equal(b1, b2)
    # 16 k-means levels for the whole layer beat a per-layer 16-level uniform grid
    q, s, z = Q.quantize_linear(w.reshape(1, -1), 4, symmetric=False)
    e_uni = (Q.dequantize_linear(q, s, z).reshape_as(w) - w).norm()
    assert (vq_dequantize(c1, b1) - w).norm() < e_uni


def test_vq_bad_inputs():
    with pytest.raises(ValueError, match="`d` = 5 does not divide"):
        vq_quantize(torch.randn(4, 12), d=5)
    with pytest.raises(ValueError, match="`d`"):
        vq_quantize(torch.randn(4, 12), d=9)
    with pytest.raises(ValueError, match="`rows_per_codebook`"):
        vq_quantize(torch.randn(6, 12), rows_per_codebook=4)


def test_kmeans_finds_separated_clusters(rng):
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = centers.repeat(50, 1) + 0.1 * torch.randn(200, 2, generator=rng)
    c, idx = kmeans(x, 4, seed=1)
    found = torch.cdist(centers, c).amin(1)
    assert (found < 0.2).all()


@pytest.mark.parametrize("group,symmetric", [(64, False), (128, True), (None, False)])
def test_gptq_beats_rtn_on_correlated_inputs(rng, group, symmetric):
    n, k = 64, 256
    w = rand_w(rng, n, k)
    mix = torch.randn(k, k, generator=rng) / k ** 0.5 + 0.3 * torch.eye(k)
    x = (torch.randn(1024, k, generator=rng) @ mix).double()  # strongly correlated inputs
    xt = (torch.randn(512, k, generator=rng) @ mix).double()  # held-out inputs of the same distribution
    q, s, z = gptq_quantize(w, x.t() @ x, bits=4, group_size=group, symmetric=symmetric)
    qr, sr, zr = Q.to_unsigned4(*Q.quantize_linear(w, 4, group, symmetric=symmetric))
    ref = xt @ w.double().t()

    def out_err(q_, s_, z_):
        return ((xt @ Q.dequantize_linear(q_, s_, z_, torch.float64).t() - ref).norm() / ref.norm()).item()

    e_gptq, e_rtn = out_err(q, s, z), out_err(qr, sr, zr)
    print(f"group={group} symmetric={symmetric}: output rel. error GPTQ {e_gptq:.4f}  RTN {e_rtn:.4f}")
    assert q.dtype == torch.uint8 and q.max() <= 15
    assert e_gptq < 0.85 * e_rtn


def test_gptq_act_order_helps_with_uneven_input_scales(rng):
    n, k = 64, 256
    w = rand_w(rng, n, k)
    scale = torch.rand(k, generator=rng) * 3 + 0.1  # channels of very different energy
    mix = (torch.randn(k, k, generator=rng) / k ** 0.5 + 0.3 * torch.eye(k)) * scale
    x = (torch.randn(1024, k, generator=rng) @ mix).double()
    xt = (torch.randn(512, k, generator=rng) @ mix).double()
    ref = xt @ w.double().t()

    def out_err(q_, s_, z_):
        return ((xt @ Q.dequantize_linear(q_, s_, z_, torch.float64).t() - ref).norm() / ref.norm()).item()

    plain = gptq_quantize(w, x.t() @ x, bits=4, group_size=64)
    act = gptq_quantize(w, x.t() @ x, bits=4, group_size=64, act_order=True)
    rtn = Q.to_unsigned4(*Q.quantize_linear(w, 4, 64, symmetric=False))
    print(f"output rel. error: GPTQ act-order {out_err(*act):.4f}, GPTQ {out_err(*plain):.4f}, RTN {out_err(*rtn):.4f}")
    assert act[0].dtype == torch.uint8 and act[1].shape == (n, 4)
    # static groups: the scales are those of round-to-nearest on the original weight, and so are the
    # zero points, except where -min/scale sits on a rounding tie (x.5 within float32 noise: float64
    # GPTQ and float32 RTN may then round it apart; seen once in ~1000 runs)
    assert torch.allclose(act[1], rtn[1])
    wg = w.double().reshape(n, 4, 64)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    unrounded = -lo / ((hi - lo) / 15)
    tie = ((unrounded - unrounded.floor()) - 0.5).abs() < 1e-5
    assert torch.equal(act[2][~tie], rtn[2][~tie]) and ((act[2] - rtn[2]).abs() <= 1).all()
    assert out_err(*act) < out_err(*plain) < out_err(*rtn)


def test_gptq_bad_inputs():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="`hessian` must be"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="`group_size` = 48 does not divide"):
        gptq_quantize(w, torch.eye(64), group_size=48)


def test_kmeans_assignment_chunking_changes_only_rounding(rng):
    """Chunking the distance computation (by codebooks and, for a huge codebook, by points) changes the
    distances only by float rounding (BLAS may take another kernel for another chunk shape: seen with MKL on
    AVX-512, ~2e-6 here), so the nearest centroid stays the same wherever it is not a near tie."""
    from reparam_kernels.compress.vq import nearest_centroids, _sqdist

    x = torch.randn(3, 1000, 2, generator=rng)
    c = torch.randn(3, 7, 2, generator=rng)
    i1, d1 = nearest_centroids(x, c)
    two = _sqdist(x.double(), c.double()).topk(2, -1, largest=False).values
    clear = (two[..., 1] - two[..., 0]) > 1e-4  # not a near tie in float64
    assert clear.float().mean() > 0.99
    for budget in (50, 7000, 7 * 1000 * 2):
        i2, d2 = nearest_centroids(x, c, budget=budget)
        torch.testing.assert_close(d2, d1, rtol=1e-5, atol=1e-5)
        assert torch.equal(i1[clear], i2[clear])
        torch.testing.assert_close(d1.double(), two[..., 0].clamp(min=0), rtol=1e-5, atol=1e-5)  # and it is the nearest
