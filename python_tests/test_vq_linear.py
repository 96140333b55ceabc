"""vq_linear beyond test_quant_ops' pairs: other sub-vector lengths and codebook sizes at odd shapes, the
codebooks' gradient, and LUTLinear serving its d > 1 and 8-bit settings through it."""
import warnings

import pytest
import torch

import reparam_kernels as rk
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.nn import LUTLinear
from conftest import TOL, rel_err


def _make(rng, lead, K, N, d, entries, books, dtype):
    x = torch.randn(*lead, K, generator=rng).to(dtype)
    codes = torch.randint(0, entries, (N, K // d), generator=rng, dtype=torch.uint8)
    cb = (torch.randn(books, entries, d, generator=rng) * 0.1).to(dtype)
    w = cb.double()[torch.arange(N)[:, None] // (N // books), codes.long()].reshape(N, K)
    b = torch.randn(N, generator=rng).to(dtype)
    return (x, codes, cb, b), x.double() @ w.t() + b.double()


@pytest.mark.skipif(rk_triton.vq_linear is None, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K,N,d,entries,books", [(1, 99, 33, 3, 7, 1), (3, 200, 40, 8, 256, 4), (17, 60, 65, 1, 256, 65),
                                                   (300, 76, 24, 4, 100, 3), (1, 136, 24, 4, 100, 3),
                                                   (1, 1000, 70, 5, 31, 2)])
def test_triton_and_reference_match_float64(rng, dtype, M, K, N, d, entries, books):
    args, exact = _make(rng, (M,), K, N, d, entries, books, dtype)
    for fn in (reference.vq_linear, rk_triton.vq_linear):
        y = fn(*args)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel_err(y, exact) <= TOL[dtype], fn


def test_codebook_and_input_gradients(rng):
    (x, codes, cb, b), _ = _make(rng, (2, 3), 24, 6, 3, 5, 2, torch.float64)
    args = [x.requires_grad_(True), cb.requires_grad_(True), b.requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda x_, cb_, b_: rk.ops.vq_linear(x_, codes, cb_, b_), args)


@pytest.mark.parametrize("kw", [dict(method="vq", d=2, bits=8, iters=3), dict(method="log", bits=8),
                                dict(method="vq", d=4, bits=6, rows_per_codebook=16, iters=3)])
def test_lut_layer_runs_its_wider_settings_through_vq_linear(rng, kw):
    lin = torch.nn.Linear(128, 32)
    layer = LUTLinear.from_linear(lin, **kw)
    assert layer.uses_kernel and layer.kernel == "vq_linear" and layer.codes.dtype == torch.uint8
    x = torch.randn(5, 128, generator=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel serves it: no fallback warning
        y = layer(x)
    dense = x.double() @ layer.to_dense().double().t() + lin.bias.double()
    assert rel_err(y, dense) <= 1e-5
