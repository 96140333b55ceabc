"""lowrank_linear: reference, Triton, CUDA against float64; opcheck, compile, autograd, bad inputs."""
import pytest
import torch

import reparam_kernels as rk
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from conftest import HAS_GPU, TOL, rel_err


def make(rng, lead, K, N, r, dtype, device="cpu", bias=True):
    x = torch.randn(*lead, K, generator=rng).to(device=device, dtype=dtype)
    # factors scaled like a trained layer's so outputs are O(1)
    u = (torch.randn(N, r, generator=rng) / r**0.5).to(device=device, dtype=dtype)
    v = (torch.randn(r, K, generator=rng) / K**0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=rng).to(device=device, dtype=dtype) if bias else None
    return x, u, v, b


def exact(x, u, v, b):
    y = x.double() @ v.double().t() @ u.double().t()
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_float64(rng, dtype):
    x, u, v, b = make(rng, (2, 3), 37, 29, 5, dtype)
    y = reference.lowrank_linear(x, u, v, b)
    assert y.dtype == dtype and y.shape == (2, 3, 29)
    assert rel_err(y, exact(x, u, v, b)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.lowrank_linear is None, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,K,N,r", [((1,), 70, 33, 17), ((3,), 129, 65, 31), ((17,), 64, 96, 8),
                                        ((300,), 45, 70, 19), ((2, 5), 100, 40, 12)])
def test_triton_matches_float64(rng, dtype, lead, K, N, r):
    x, u, v, b = make(rng, lead, K, N, r, dtype)
    y = rk_triton.lowrank_linear(x, u, v, b)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y, exact(x, u, v, b)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.lowrank_linear is None, reason="triton not installed")
@pytest.mark.parametrize("M,split", [(1, 3), (5, 4), (1, None), (130, 2)])
def test_triton_matmul_nt_split_k(rng, M, split):
    """The shared Triton GEMM with K (700: not a multiple of the 128-wide step) split unevenly, the bias
    added after the split's reduction, an fp32 output (the low-rank intermediate)."""
    from reparam_kernels.triton._matmul_nt import matmul_nt
    a = torch.randn(M, 700, generator=rng).half()
    b = torch.randn(90, 700, generator=rng).half()
    bias = torch.randn(90, generator=rng).half()
    y = matmul_nt(a, b, bias, out_dtype=torch.float32, split=split)
    assert y.dtype == torch.float32
    assert rel_err(y, a.double() @ b.double().t() + bias.double()) <= TOL[torch.float16]


def test_op_cpu_dispatches_to_reference(rng):
    x, u, v, b = make(rng, (4,), 33, 21, 7, torch.float32)
    y = torch.ops.reparam.lowrank_linear(x, u, v, b)
    assert rel_err(y, exact(x, u, v, b)) <= 1e-5
    assert rel_err(rk.ops.lowrank_linear(x, u, v, None), exact(x, u, v, None)) <= 1e-5


def test_opcheck_cpu(rng):
    x, u, v, b = make(rng, (3, 2), 24, 16, 4, torch.float32)
    for args in [(x, u, v, b), (x, u, v, None)]:
        torch.library.opcheck(torch.ops.reparam.lowrank_linear, args)


def test_autograd_matches_finite_differences(rng):
    x, u, v, b = make(rng, (3,), 6, 5, 2, torch.float64)
    for t in (x, u, v, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(rk.ops.lowrank_linear, (x, u, v, b))


class TwoLayer(torch.nn.Module):
    def __init__(self, u, v, b):
        super().__init__()
        self.u, self.v, self.b = torch.nn.Parameter(u), torch.nn.Parameter(v), torch.nn.Parameter(b)

    def forward(self, x):
        return torch.relu(rk.ops.lowrank_linear(x, self.u, self.v, self.b)) * 2


def test_torch_compile_fullgraph(rng):
    x, u, v, b = make(rng, (5,), 32, 24, 6, torch.float32)
    m = TwoLayer(u, v, b)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), eager) <= 1e-6


@pytest.mark.parametrize("bad,match", [
    (lambda x, u, v, b: (x.half(), u, v, b), "`u` must have dtype"),
    (lambda x, u, v, b: (x, u[:, :-1].contiguous(), v, b), "rank mismatch"),
    (lambda x, u, v, b: (x[..., :-1], u, v, b), "`x` has 32 features"),
    (lambda x, u, v, b: (x, u, v, b[:-1]), "`bias` has"),
    (lambda x, u, v, b: (x, u.t().contiguous().t(), v, b), "`u` must be contiguous"),
    (lambda x, u, v, b: (x.t().contiguous().t(), u, v, b), "`x` must be contiguous in its last dimension"),
    (lambda x, u, v, b: (x, u.to("meta"), v, b), "`u` is on meta"),
    (lambda x, u, v, b: (x, u, v.int(), b), "`v` must have dtype"),
])
def test_bad_inputs_name_the_argument(rng, bad, match):
    x, u, v, b = make(rng, (4,), 33, 21, 7, torch.float32)
    with pytest.raises(ValueError, match=match):
        rk.ops.lowrank_linear(*bad(x, u, v, b))


# ---------------------------------------------------------------- GPU (CUDA kernel)

def _poison_allocator():
    # Fill freed cache blocks with NaN so an output element the kernel forgets shows up.
    junk = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)
    del junk


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 128), (3, 70, 33, 17), (16, 512, 1000, 64),
                                     (17, 136, 200, 24), (64, 1024, 512, 96), (65, 77, 130, 9),
                                     (300, 512, 384, 64), (2048, 1024, 1024, 256), (5, 8192, 8192, 512)])
def test_cuda_kernel_matches_float64(rng, dtype, M, K, N, r):
    assert rk._extension.LOADED, rk._extension.REASON
    x, u, v, b = make(rng, (M,), K, N, r, dtype, device="cuda")
    for bias in (b, None):
        _poison_allocator()
        y = torch.ops.reparam.lowrank_linear(x, u, v, bias)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()
        assert rel_err(y, exact(x, u, v, bias)) <= TOL[dtype], (M, K, N, r)


@pytest.mark.gpu
def test_cuda_leading_dims_and_noncontiguous_x(rng):
    x, u, v, b = make(rng, (2, 3, 5), 96, 80, 16, torch.float16, device="cuda")
    y = rk.ops.lowrank_linear(x, u, v, b)
    assert y.shape == (2, 3, 5, 80) and rel_err(y, exact(x, u, v, b)) <= 5e-3
    xs = x.transpose(0, 1)  # non-contiguous leading dims, contiguous last dim
    assert rel_err(rk.ops.lowrank_linear(xs, u, v, b), exact(xs, u, v, b)) <= 5e-3


@pytest.mark.gpu
def test_cuda_opcheck_and_graph_capture(rng):
    x, u, v, b = make(rng, (4,), 64, 48, 8, torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.reparam.lowrank_linear, (x, u, v, b))
    static_y = rk.ops.lowrank_linear(x, u, v, b)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = rk.ops.lowrank_linear(x, u, v, b)
    x.copy_(torch.randn(x.shape, generator=rng).to(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, exact(x, u, v, b)) <= 5e-3


@pytest.mark.gpu
def test_cuda_triton_backend_matches(rng):
    x, u, v, b = make(rng, (33,), 200, 150, 40, torch.bfloat16, device="cuda")
    assert rel_err(rk_triton.lowrank_linear(x, u, v, b), exact(x, u, v, b)) <= 2e-2


@pytest.mark.gpu
def test_cuda_fp32_falls_back_with_a_backend_that_exists(rng):
    x, u, v, b = make(rng, (3,), 40, 30, 6, torch.float32, device="cuda")
    assert rel_err(rk.ops.lowrank_linear(x, u, v, b), exact(x, u, v, b)) <= 1e-4


@pytest.mark.skipif(HAS_GPU, reason="CPU-only check")
def test_backend_report_on_this_machine():
    backend, why = rk._dispatch.backend_for("lowrank_linear", "cpu", torch.float16)
    assert backend == "reference" and "cpu" in why


@pytest.mark.gpu
def test_cuda_fp32_fallback_keeps_gradients(rng):
    x, u, v, b = make(rng, (3,), 40, 30, 6, torch.float32, device="cuda")
    u.requires_grad_(True)
    rk.ops.lowrank_linear(x, u, v, b).square().sum().backward()
    ud = u.detach().double().requires_grad_(True)
    exact(x, ud, v, b).square().sum().backward()
    assert rel_err(u.grad, ud.grad) <= 1e-4
