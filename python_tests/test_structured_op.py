"""block_circulant_linear / toeplitz_linear: reference, Triton, CUDA against float64;
opcheck, compile, autograd (gradcheck and kernel backward vs reference), bad inputs."""
import math

import pytest
import torch

import reparam_kernels as rk
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.compress import structured as st
from conftest import HAS_GPU, TOL, rel_err


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: with other jobs on the cores, intra-op threads only spin.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(rng, lead, K, N, b, dtype, device="cpu", bias=True):
    """Random block columns scaled like a trained layer's (outputs O(1)), their spectrum, x, bias."""
    p, q = math.ceil(N / b), math.ceil(K / b)
    cols = torch.randn(p, q, b, generator=rng, dtype=torch.float64) / math.sqrt(K)
    spec = st.block_circulant_spectrum(cols, torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(*lead, K, generator=rng).to(device=device, dtype=dtype)
    bb = torch.randn(N, generator=rng).to(device=device, dtype=dtype) if bias else None
    return x, spec.to(device), cols, bb


def exact(x, cols, N, bias=None):
    """x @ Wᵀ + bias with W built densely from the block columns (no FFT), in float64."""
    dense = st.block_circulant_to_dense(cols.to(x.device), N, x.shape[-1])
    y = x.double() @ dense.t()
    return y + bias.double() if bias is not None else y


SHAPES = [((1,), 7, 10, 4), ((3,), 70, 33, 16), ((2, 5), 64, 64, 64), ((17,), 100, 45, 9), ((4,), 37, 90, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead,K,N,b", SHAPES)
def test_reference_matches_dense_float64(rng, dtype, lead, K, N, b):
    x, spec, cols, bias = make(rng, lead, K, N, b, dtype)
    y = reference.block_circulant_linear(x, spec, b, N, bias)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel_err(y, exact(x, cols, N, bias)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.block_circulant_linear is None, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,K,N,b", SHAPES + [((33,), 130, 200, 128)])
def test_triton_matches_float64(rng, dtype, lead, K, N, b):
    x, spec, cols, bias = make(rng, lead, K, N, b, dtype)
    y = rk_triton.block_circulant_linear(x, spec, b, N, bias)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y, exact(x, cols, N, bias)) <= TOL[dtype]


def test_circulant_is_one_block_and_toeplitz_embedding(rng):
    x, spec, cols, _ = make(rng, (3,), 23, 23, 23, torch.float32, bias=False)
    assert rel_err(rk.ops.block_circulant_linear(x, spec, 23, 23), exact(x, cols, 23)) <= 1e-5
    n, k = 19, 30
    t = torch.randn(n + k - 1, generator=rng, dtype=torch.float64)
    size = st.toeplitz_fft_size(n, k)
    assert size == 64 and st.toeplitz_fft_size(64, 64) == 128  # 2n for a square power of two
    tspec = st.toeplitz_spectrum(t, n, k)
    xt = torch.randn(5, k, generator=rng)
    ref = xt.double() @ st.toeplitz_to_dense(t, n, k).t()
    assert rel_err(rk.ops.toeplitz_linear(xt, tspec, size, n), ref) <= 1e-5
    if rk_triton.toeplitz_linear is not None:
        assert rel_err(rk_triton.toeplitz_linear(xt, tspec, size, n), ref) <= 1e-5


def test_op_cpu_dispatches_to_reference(rng):
    x, spec, cols, b = make(rng, (4,), 33, 21, 8, torch.float32)
    assert rel_err(torch.ops.reparam.block_circulant_linear(x, spec, 8, 21, b), exact(x, cols, 21, b)) <= 1e-5
    assert rk._dispatch.backend_for("block_circulant_linear", "cpu", torch.float16)[0] == "reference"


def test_opcheck_cpu(rng):
    x, spec, _, b = make(rng, (3, 2), 24, 19, 8, torch.float32)
    for args in [(x, spec, 8, 19, b), (x, spec, 8, 19, None)]:
        torch.library.opcheck(torch.ops.reparam.block_circulant_linear, args)
    t = st.toeplitz_spectrum(torch.randn(24 + 19 - 1, generator=rng, dtype=torch.float64), 19, 24)
    torch.library.opcheck(torch.ops.reparam.toeplitz_linear, (x, t, 64, 19, b))


@pytest.mark.parametrize("K,N,b", [(6, 5, 4), (8, 8, 8), (9, 7, 3)])
def test_autograd_matches_finite_differences(rng, K, N, b):
    x, spec, _, bias = make(rng, (3,), K, N, b, torch.float64)
    # a spectrum that is NOT the rfft of a real column (imag at DC/Nyquist set): still a valid input
    spec = spec + 0.1 * torch.randn(spec.shape, generator=rng, dtype=torch.float64)
    for t in (x, spec, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, s, bb: rk.ops.block_circulant_linear(x, s, b, N, bb), (x, spec, bias))
    L = st.toeplitz_fft_size(N, K)
    tspec = torch.randn(1, 1, 2, L // 2 + 1, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: rk.ops.toeplitz_linear(x, s, L, N, None), (x, tspec))


class Block(torch.nn.Module):
    def __init__(self, spec, b, n, bias):
        super().__init__()
        self.spec, self.bias, self.b, self.n = torch.nn.Parameter(spec), torch.nn.Parameter(bias), b, n

    def forward(self, x):
        return torch.relu(rk.ops.block_circulant_linear(x, self.spec, self.b, self.n, self.bias)) * 2


def test_torch_compile_fullgraph(rng):
    x, spec, _, b = make(rng, (5,), 32, 24, 8, torch.float32)
    m = Block(spec, 8, 24, b)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), eager) <= 1e-6
    compiled(x).sum().backward()
    assert m.spec.grad is not None and torch.isfinite(m.spec.grad).all()


@pytest.mark.parametrize("bad,match", [
    (lambda x, s, b, n, bb: (x, s.half(), b, n, bb), "`w_spectrum` must have dtype"),
    (lambda x, s, b, n, bb: (x, s[..., :-1].contiguous(), b, n, bb), r"`w_spectrum` must be \[p, q, 2"),
    (lambda x, s, b, n, bb: (x, s, b, n + 20, bb), "`out_features` 41 does not fit"),
    (lambda x, s, b, n, bb: (x[..., :-9], s, b, n, bb), "`x` has 24 features"),
    (lambda x, s, b, n, bb: (x, s, 0, n, bb), "`block_size` must be a positive int"),
    (lambda x, s, b, n, bb: (x, s, b, n, bb[:-1]), "`bias` has"),
    (lambda x, s, b, n, bb: (x, s.transpose(0, 1), b, n, bb), "`w_spectrum` must be contiguous"),
    (lambda x, s, b, n, bb: (x.t().contiguous().t(), s, b, n, bb), "`x` must be contiguous in its last dimension"),
    (lambda x, s, b, n, bb: (x.int(), s, b, n, bb), "`x` must have dtype"),
    (lambda x, s, b, n, bb: (x, s.to("meta"), b, n, bb), "`w_spectrum` is on meta"),
])
def test_bad_inputs_name_the_argument(rng, bad, match):
    x, spec, _, b = make(rng, (4,), 33, 21, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        rk.ops.block_circulant_linear(*bad(x, spec, 8, 21, b))


# ---------------------------------------------------------------- GPU (CUDA kernel)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K,N,b", [(1, 4096, 4096, 4096), (1, 4096, 4096, 256), (3, 1000, 700, 64),
                                     (16, 4096, 14336, 512), (17, 300, 500, 128), (64, 2048, 2048, 1024),
                                     (2048, 1024, 1024, 256), (5, 8192, 8192, 2048),
                                     # large M: block_circulant_large_m.cuh by default (test_cuda_paths_gpu.py forces each kernel)
                                     (2048, 4096, 4096, 256), (1024, 4096, 4096, 256), (3000, 520, 1024, 64)])
def test_cuda_matches_float64(rng, dtype, M, K, N, b):
    x, spec, cols, bias = make(rng, (M,), K, N, b, dtype, device="cuda")
    for bb in (bias, None):
        torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)  # poison the cache
        y = rk.ops.block_circulant_linear(x, spec, b, N, bb)
        torch.cuda.synchronize()
        ref = exact(x, cols, N, bb)
        assert torch.isfinite(y).all() and rel_err(y, ref) <= {torch.float32: 1e-4}.get(dtype, TOL[dtype])


@pytest.mark.gpu
def test_cuda_backward_matches_reference(rng):
    x, spec, _, bias = make(rng, (7,), 300, 200, 64, torch.float32, device="cuda")
    grads = []
    for fn in (rk.ops.block_circulant_linear, reference.block_circulant_linear):
        # the reference is differentiated by torch autograd through torch.fft
        xs, ss = x.clone().requires_grad_(), spec.clone().requires_grad_()
        fn(xs, ss, 64, 200, bias).square().sum().backward()
        grads.append((xs.grad, ss.grad))
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-4
    assert rel_err(grads[0][1], grads[1][1]) <= 1e-4


@pytest.mark.gpu
def test_cuda_graph_capture_and_odd_block_falls_back(rng):
    x, spec, cols, b = make(rng, (4,), 256, 256, 128, torch.float16, device="cuda")
    g = torch.cuda.CUDAGraph()
    rk.ops.block_circulant_linear(x, spec, 128, 256, b)
    with torch.cuda.graph(g):
        y = rk.ops.block_circulant_linear(x, spec, 128, 256, b)
    x.copy_(torch.randn(x.shape, generator=rng).to(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, exact(x, cols, 256, b)) <= 5e-3
    x, spec, cols, b = make(rng, (4,), 100, 90, 48, torch.float16, device="cuda")  # not a power of two
    assert rel_err(rk.ops.block_circulant_linear(x, spec, 48, 90, b), exact(x, cols, 90, b)) <= 5e-3


@pytest.mark.skipif(HAS_GPU, reason="CPU-only check")
def test_backend_report_on_this_machine():
    backend, why = rk._dispatch.backend_for("toeplitz_linear", "cpu", torch.float16)
    assert backend == "reference" and "cpu" in why


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,n,k", [(1, 2048, 2048), (5, 1000, 700), (64, 300, 1500), (3, 4096, 4096)])
def test_cuda_toeplitz_matches_float64(rng, dtype, M, n, k):
    t = torch.randn(n + k - 1, generator=rng, dtype=torch.float64) / math.sqrt(k)
    size = st.toeplitz_fft_size(n, k)  # 4096 for the first cases (CUDA kernel), 8192 for the last (Triton)
    spec = st.toeplitz_spectrum(t, n, k).cuda()
    x = torch.randn(M, k, generator=rng).to(device="cuda", dtype=dtype)
    ref = x.double() @ st.toeplitz_to_dense(t, n, k).cuda().t()
    y = rk.ops.toeplitz_linear(x, spec, size, n)
    torch.cuda.synchronize()
    assert rel_err(y, ref) <= {torch.float32: 1e-4}.get(dtype, TOL[dtype])


@pytest.mark.gpu
def test_cuda_triton_backend_matches(rng):
    x, spec, cols, b = make(rng, (33,), 1000, 700, 256, torch.bfloat16, device="cuda")
    assert rel_err(rk_triton.block_circulant_linear(x, spec, 256, 700, b), exact(x, cols, 700, b)) <= 2e-2


@pytest.mark.gpu
def test_cuda_odd_block_size_stays_trainable(rng):
    x, spec, _, b = make(rng, (6,), 100, 90, 48, torch.float32, device="cuda")  # routed past the CUDA kernel
    s1, s2 = spec.clone().requires_grad_(), spec.cpu().clone().requires_grad_()
    rk.ops.block_circulant_linear(x, s1, 48, 90, b).square().sum().backward()
    rk.ops.block_circulant_linear(x.cpu(), s2, 48, 90, b.cpu()).square().sum().backward()
    assert s1.grad is not None and rel_err(s1.grad.cpu(), s2.grad) <= 1e-4
