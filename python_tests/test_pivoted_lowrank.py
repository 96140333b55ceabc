"""pivoted_lowrank_linear and PivotedLowRankLinear: op against float64 (reference, Triton under the
interpreter, GPU), opcheck, compile, gradcheck, bad inputs; the pivoting is exact; ratio → rank;
the recipe option and the global allocation with pivoted costs."""
import pytest
import torch

import reparam_kernels as rk
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.compress.svd import pivoted_rank_for_ratio, rank_for_ratio
from reparam_kernels.nn import LowRankLinear, PivotedLowRankLinear
from reparam_kernels.nn.pivoted import pivot_factors
from conftest import TOL, rel_err


def make(rng, lead, K, N, r, dtype, device="cpu", bias=True):
    x = torch.randn(*lead, K, generator=rng).to(device=device, dtype=dtype)
    u = (torch.randn(N, r, generator=rng) / r**0.5).to(device=device, dtype=dtype)
    w = (torch.randn(r, K - r, generator=rng) / K**0.5).to(device=device, dtype=dtype)
    perm = torch.randperm(K, generator=rng).to(device)
    b = torch.randn(N, generator=rng).to(device=device, dtype=dtype) if bias else None
    return x, u, w, perm, b


def dense(u, w, perm):
    """W = u @ [I | w] @ P in float64, built column by column (independent of the op's gather)."""
    r, k = u.shape[1], perm.numel()
    W = torch.zeros(u.shape[0], k, dtype=torch.float64, device=u.device)
    full = torch.cat([torch.eye(r, dtype=torch.float64, device=u.device), w.double()], 1)  # [I | w]
    for j in range(k):
        W[:, perm[j]] = u.double() @ full[:, j]
    return W


def exact(x, u, w, perm, b):
    y = x.double() @ dense(u, w, perm).t()
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_float64(rng, dtype):
    x, u, w, perm, b = make(rng, (2, 3), 37, 29, 5, dtype)
    y = reference.pivoted_lowrank_linear(x, u, w, perm, b)
    assert y.dtype == dtype and y.shape == (2, 3, 29)
    assert rel_err(y, exact(x, u, w, perm, b)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.pivoted_lowrank_linear is None, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,K,N,r", [((1,), 70, 33, 17), ((3,), 129, 65, 31), ((17,), 64, 96, 8),
                                        ((2, 5), 100, 40, 12), ((4,), 24, 30, 24)])  # last: r = K, w empty
def test_triton_matches_float64(rng, dtype, lead, K, N, r):
    x, u, w, perm, b = make(rng, lead, K, N, r, dtype)
    y = rk_triton.pivoted_lowrank_linear(x, u, w, perm, b)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y, exact(x, u, w, perm, b)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.pivoted_lowrank_linear is None, reason="triton not installed")
@pytest.mark.parametrize("M,split", [(1, 3), (5, 2), (1, None)])
def test_triton_split_k_adds_the_pivots_once(rng, M, split):
    """K − r split across programs: the partials summed, x's pivot columns added by one split only."""
    x, u, w, perm, b = make(rng, (M,), 600, 40, 24, torch.float16)
    y = rk_triton.pivoted_lowrank_linear(x, u, w, perm, b, split=split)
    assert rel_err(y, exact(x, u, w, perm, b)) <= TOL[torch.float16]


def test_opcheck_compile_and_gradcheck(rng):
    x, u, w, perm, b = make(rng, (3, 2), 24, 16, 4, torch.float32)
    for args in [(x, u, w, perm, b), (x, u, w, perm, None)]:
        torch.library.opcheck(torch.ops.reparam.pivoted_lowrank_linear, args)
    layer = PivotedLowRankLinear(24, 16, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), layer(x)) <= 1e-6
    x, u, w, perm, b = make(rng, (3,), 7, 5, 3, torch.float64)
    for t in (x, u, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: rk.ops.pivoted_lowrank_linear(*a[:3], perm, a[3]), (x, u, w, b))


@pytest.mark.parametrize("bad,match", [
    (lambda x, u, w, p, b: (x, u, w[:-1], p, b), "rank mismatch"),
    (lambda x, u, w, p, b: (x, u, w, p[:-1], b), "`perm` must have K"),
    (lambda x, u, w, p, b: (x, u, w, p.int(), b), "`perm` must have dtype"),
    (lambda x, u, w, p, b: (x[..., :-1], u, w, p, b), "`x` has 32 features"),
    (lambda x, u, w, p, b: (x, u, w, p, b[:-1]), "`bias` has"),
])
def test_bad_inputs_name_the_argument(rng, bad, match):
    x, u, w, perm, b = make(rng, (4,), 33, 21, 7, torch.float32)
    with pytest.raises(ValueError, match=match):
        rk.ops.pivoted_lowrank_linear(*bad(x, u, w, perm, b))


def test_pivoting_is_exact_and_well_conditioned(rng):
    u = torch.randn(40, 12, generator=rng, dtype=torch.float64)
    v = torch.randn(12, 50, generator=rng, dtype=torch.float64)
    up, w, perm = pivot_factors(u, v)
    assert sorted(perm.tolist()) == list(range(50))
    assert torch.allclose(dense(up, w, perm), u @ v, atol=1e-10)
    assert w.abs().max() < 10  # column-pivoted QR keeps the pivot block well conditioned


@pytest.mark.parametrize("calib", [False, True])
def test_layer_has_the_function_of_lowrank_at_the_same_rank(rng, calib):
    lin = torch.nn.Linear(96, 64)
    X = torch.randn(400, 96, generator=rng) if calib else None
    a = PivotedLowRankLinear.from_linear(lin, rank=20, calib=X)
    b = LowRankLinear.from_linear(lin, rank=20, calib=X)
    x = torch.randn(7, 96, generator=rng)
    with torch.no_grad():
        assert rel_err(a(x), b(x).double()) <= 1e-5 and rel_err(a.to_dense(), b.to_dense().double()) <= 1e-5
    n_piv = sum(p.numel() for p in a.parameters())
    n_plain = sum(p.numel() for p in b.parameters())
    assert n_plain - n_piv == 20 * 20  # the identity block is not stored


def test_ratio_counts_the_pivoted_storage():
    for o, i, ratio in [(576, 576, 0.2), (1536, 576, 0.2), (576, 1536, 0.4), (64, 96, 0.3), (8, 8, 0.9)]:
        r = pivoted_rank_for_ratio(o, i, ratio)
        budget = (1 - ratio) * o * i
        assert r * (o + i - r) <= budget < (r + 1) * (o + i - r - 1) or r == 1
        assert r >= rank_for_ratio(o, i, ratio)
    assert pivoted_rank_for_ratio(576, 576, 0.2) == 318 and rank_for_ratio(576, 576, 0.2) == 230
    layer = PivotedLowRankLinear.from_linear(torch.nn.Linear(96, 64), ratio=0.3)
    assert layer.rank == pivoted_rank_for_ratio(64, 96, 0.3)


def test_recipe_option_and_global_allocation(rng):
    from reparam_kernels.compress.allocate import choose_ranks

    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 48))
    small, rep = rk.compress(model, {"0": {"method": "lowrank", "ratio": 0.3, "whiten": False, "pivoted": True},
                                     "2": {"method": "lowrank", "ratio": 0.3, "whiten": False}}, progress=False)
    assert isinstance(small[0], PivotedLowRankLinear) and type(small[2]) is LowRankLinear
    assert small[0].rank > small[2].rank
    with pytest.raises(ValueError, match="pivoted"):
        rk.compress(model, {"0": {"method": "lowrank", "ratio": 0.3, "whiten": False, "pivoted": "yes"}},
                    progress=False)
    spectra = {"a": torch.linspace(10, 0.1, 40, dtype=torch.float64) ** 2,
               "b": torch.linspace(5, 0.1, 40, dtype=torch.float64) ** 2}
    shapes = {"a": (40, 48), "b": (48, 40)}
    plain, piv = choose_ranks(spectra, shapes, 0.3), choose_ranks(spectra, shapes, 0.3, pivoted=True)
    cost = sum(r * (o + i - r) if r else o * i for (o, i), r in zip(shapes.values(), piv.values()))
    assert cost <= 0.7 * sum(o * i for o, i in shapes.values())
    assert all((piv[n] or 40) >= (plain[n] or 0) for n in shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 512), (3, 70, 33, 17), (16, 576, 1536, 418), (17, 136, 200, 24),
                                     (64, 1024, 512, 96), (65, 77, 130, 9), (300, 576, 1536, 318),
                                     (5, 8192, 8192, 512), (4, 40, 48, 40)])  # last: r = K, nothing gathered
def test_cuda_kernel_matches_float64(rng, dtype, M, K, N, r):
    """The fused CUDA kernel (pivoted phase 0: gather + identity block) at odd sizes: K - r not a multiple of
    8 takes the scalar loads, M = 1 and 5 split the reductions, freed memory is poisoned with NaN first."""
    assert rk._extension.LOADED, rk._extension.REASON
    assert rk._dispatch.backend_for("pivoted_lowrank_linear", "cuda", dtype)[0] == "cuda"
    x, u, w, perm, b = make(rng, (M,), K, N, r, dtype, device="cuda")
    for bias in (b, None):
        junk = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)
        del junk
        y = torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, bias)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()
        assert rel_err(y, exact(x, u, w, perm, bias)) <= TOL[dtype], (M, K, N, r)


@pytest.mark.gpu
def test_cuda_graph_capture_triton_and_leading_dims(rng):
    x, u, w, perm, b = make(rng, (2, 3, 5), 96, 80, 16, torch.float16, device="cuda")
    y = rk.ops.pivoted_lowrank_linear(x, u, w, perm, b)
    assert y.shape == (2, 3, 5, 80) and rel_err(y, exact(x, u, w, perm, b)) <= 5e-3
    assert rel_err(rk_triton.pivoted_lowrank_linear(x, u, w, perm, b), exact(x, u, w, perm, b)) <= 5e-3
    torch.library.opcheck(torch.ops.reparam.pivoted_lowrank_linear, (x, u, w, perm, b))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = rk.ops.pivoted_lowrank_linear(x, u, w, perm, b)
    x.copy_(torch.randn(x.shape, generator=rng).to(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, exact(x, u, w, perm, b)) <= 5e-3


def test_save_load_bit_identical(rng, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 48))
    small, _ = rk.compress(model, {"0": {"method": "lowrank", "ratio": 0.3, "whiten": False, "pivoted": True}},
                           progress=False)
    rk.save_compressed(small, tmp_path / "p")
    skeleton = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 48))
    rk.load_compressed(skeleton, tmp_path / "p")
    assert isinstance(skeleton[0], PivotedLowRankLinear) and torch.equal(skeleton[0].perm, small[0].perm)
    x = torch.randn(5, 48, generator=rng)
    with torch.no_grad():
        assert torch.equal(skeleton(x), small(x))


@pytest.mark.parametrize("M,K,r,gthreads", [(1, 70, 17, 256), (5, 40, 40, 96), (17, 136, 24, 1000), (3, 9, 4, 7)])
def test_cuda_pivoted_phase0_emulated(rng, M, K, r, gthreads):
    """csrc/lowrank_linear.cu's pivoted phase 0, line by line in NumPy (grid-strided loops over a flat index,
    i / kr and i − m·kr as in the kernel), then phases 1–2 as plain products: equals the float64 op."""
    import numpy as np

    x, u, w, perm, _ = make(rng, (M,), K, 11, r, torch.float64, bias=False)
    xf, pm, kr = x.numpy().reshape(-1), perm.numpy(), K - r
    xg, t32 = np.full(M * kr, np.nan), np.full(M * r, np.nan)
    for gtid in range(gthreads):
        for i in range(gtid, M * kr, gthreads):
            m = i // kr
            l_ = i - m * kr
            xg[i] = xf[m * K + pm[r + l_]]
        for i in range(gtid, M * r, gthreads):
            m = i // r
            j = i - m * r
            t32[i] = xf[m * K + pm[j]]
    t = t32.reshape(M, r) + xg.reshape(M, kr) @ w.numpy().T  # phase 1 (t += xg @ w^T)
    y = t @ u.numpy().T  # phase 2
    assert np.abs(y - exact(x, u, w, perm, None).numpy()).max() < 1e-10
