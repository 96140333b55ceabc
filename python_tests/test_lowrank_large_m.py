"""The large-M route of lowrank_linear and pivoted_lowrank_linear (csrc/lowrank_large_m.cuh: two
cuBLAS products; pivoted factors expanded to [I | w] P first, by a gather through perm's inverse): the
expansion's index math emulated
against the dense right factor, and on the GPU against float64 and the fused kernel (REPARAM_LOWRANK_CUBLAS_MIN_M=0) at odd
sizes, with and without bias, leading dims, inside a CUDA graph."""
import numpy as np
import pytest
import torch

import test_lowrank_op as plain
import test_pivoted_lowrank as piv
from conftest import TOL, env_var, rel_err


def emulate_expand(w, perm):
    """invert_perm_kernel then expand_kernel: inv = -1, inv[perm[c]] = c (perm entries in 0..K-1 only);
    v[j, q] = [I | w][j, inv[q]], a zero column where inv[q] = -1."""
    r, K = w.shape[0], perm.size
    inv = np.full(K, -1)
    for c in range(K):
        if 0 <= perm[c] < K:
            inv[perm[c]] = c
    v = np.full((r, K), np.nan)
    for j in range(r):
        for q in range(K):
            c = inv[q]
            v[j, q] = 0.0 if c < 0 else (1.0 if c == j else 0.0) if c < r else w[j, c - r]
    return v


@pytest.mark.parametrize("K,r", [(37, 5), (16, 16), (9, 1)])
def test_expand_emulation_matches_the_dense_right_factor(rng, K, r):
    w = torch.randn(r, K - r, generator=rng, dtype=torch.float64)
    perm = torch.randperm(K, generator=rng)
    u = torch.eye(r, dtype=torch.float64)  # W = u @ [I | w] @ P is then the right factor itself
    assert np.array_equal(emulate_expand(w.numpy(), perm.numpy()), piv.dense(u, w, perm).numpy())


def test_expand_emulation_stays_in_bounds_off_contract():
    """perm with a repeat and an out-of-range entry (not a permutation: the op's contract broken) reads
    and writes nothing outside w and v: the columns no entry reached are zero."""
    w = np.arange(1.0, 1.0 + 2 * 3).reshape(2, 3)  # r = 2, K = 5
    v = emulate_expand(w, np.array([4, 4, 0, 9, 1]))  # q = 2 and 3 unreached; 9 out of range
    assert not np.isnan(v).any() and (v[:, 2] == 0).all() and (v[:, 3] == 0).all()


def fused(fn, *args):
    with env_var("REPARAM_LOWRANK_CUBLAS_MIN_M", "0"):
        return fn(*args)


SHAPES = [((512,), 1000, 520, 72), ((3, 259), 136, 200, 24), ((2048,), 4096, 4096, 512), ((600,), 40, 48, 40)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_plain_matches_float64_and_fused(rng, dtype, lead, K, N, r):
    x, u, v, b = plain.make(rng, lead, K, N, r, dtype, device="cuda")
    for bias in (b, None):
        ref = plain.exact(x, u, v, bias)
        y = torch.ops.reparam.lowrank_linear(x, u, v, bias)
        assert y.shape == (*lead, N) and torch.isfinite(y).all()
        assert rel_err(y, ref) <= TOL[dtype]
        assert rel_err(fused(torch.ops.reparam.lowrank_linear, x, u, v, bias), ref) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,K,N,r", SHAPES)  # the last: r = K, w is empty
def test_pivoted_matches_float64_and_fused(rng, dtype, lead, K, N, r):
    x, u, w, perm, b = piv.make(rng, lead, K, N, r, dtype, device="cuda")
    for bias in (b, None):
        ref = piv.exact(x, u, w, perm, bias)
        y = torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, bias)
        assert y.shape == (*lead, N) and torch.isfinite(y).all()
        assert rel_err(y, ref) <= TOL[dtype]
        assert rel_err(fused(torch.ops.reparam.pivoted_lowrank_linear, x, u, w, perm, bias), ref) <= TOL[dtype]


@pytest.mark.gpu
def test_large_m_in_a_cuda_graph(rng):
    x, u, w, perm, b = piv.make(rng, (700,), 300, 260, 40, torch.float16, device="cuda")
    torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b)  # warm-up before capture (cuBLAS)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = torch.ops.reparam.pivoted_lowrank_linear(x, u, w, perm, b)
    x.copy_(torch.randn(x.shape, generator=rng).half())
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, piv.exact(x, u, w, perm, b)) <= 5e-3
