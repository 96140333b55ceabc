"""block_circulant_cols_linear (block-circulant from the blocks' first columns, the decode op): reference
against float64, opcheck, compile, autograd (gradcheck), bad inputs; on a GPU the tensor-core kernel
against float64 at odd sizes, CUDA graphs, and BlockCirculantLinear taking it in eval mode."""
import math

import pytest
import torch

import reparam_kernels as rk
import reparam_kernels.nn  # noqa: F401  (BlockCirculantLinear)
from reparam_kernels.compress import structured as st
from conftest import TOL, rel_err
from test_structured_op import _one_thread  # noqa: F401  (autouse: small tensors, one intra-op thread)

OP = torch.ops.reparam.block_circulant_cols_linear


def make(rng, lead, K, N, b, dtype, device="cpu", bias=True):
    """Random block columns scaled like a trained layer's (outputs O(1)), x, bias."""
    p, q = math.ceil(N / b), math.ceil(K / b)
    cols = torch.randn(p, q, b, generator=rng, dtype=torch.float64) / math.sqrt(K)
    x = torch.randn(*lead, K, generator=rng).to(device=device, dtype=dtype)
    bb = torch.randn(N, generator=rng).to(device=device, dtype=dtype) if bias else None
    return x, cols, bb


def exact(x, cols, N, bias=None):
    """x @ Wᵀ + bias with W built densely from the block columns, in float64."""
    y = x.double() @ st.block_circulant_to_dense(cols.to(x.device), N, x.shape[-1]).t()
    return y + bias.double() if bias is not None else y


def cols_for(cols, x):
    return cols.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


SHAPES = [((1,), 7, 10, 4), ((3,), 70, 33, 16), ((2, 5), 64, 64, 64), ((17,), 100, 45, 9), ((4,), 37, 90, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead,K,N,b", SHAPES)
def test_reference_matches_dense_float64(rng, dtype, lead, K, N, b):
    x, cols, bias = make(rng, lead, K, N, b, dtype)
    y = rk.ops.block_circulant_cols_linear(x, cols_for(cols, x), N, bias)
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert rel_err(y, exact(x, cols, N, bias)) <= {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, TOL[dtype])


def test_same_as_the_spectrum_op(rng):
    x, cols, bias = make(rng, (5,), 300, 200, 64, torch.float32)
    spec = st.block_circulant_spectrum(cols)
    assert rel_err(rk.ops.block_circulant_cols_linear(x, cols.float(), 200, bias),
                   rk.ops.block_circulant_linear(x, spec, 64, 200, bias)) <= 1e-6


def test_opcheck_cpu(rng):
    x, cols, b = make(rng, (3, 2), 24, 19, 8, torch.float32)
    for args in [(x, cols.float(), 19, b), (x, cols.float(), 19, None)]:
        torch.library.opcheck(OP, args)


@pytest.mark.parametrize("K,N,b", [(6, 5, 4), (8, 8, 8), (9, 7, 3)])
def test_autograd_matches_finite_differences(rng, K, N, b):
    # through the op's registered backward (transposed columns for x, a cross-correlation for the columns)
    x, cols, bias = make(rng, (3,), K, N, b, torch.float64)
    for t in (x, cols, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, c, bb: OP(x, c, N, bb), (x, cols, bias))


def test_torch_compile_fullgraph(rng):
    x, cols, b = make(rng, (5,), 32, 24, 8, torch.float32)
    w = torch.nn.Parameter(cols.float())

    def f(x):
        return torch.relu(rk.ops.block_circulant_cols_linear(x, w, 24, b)) * 2

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), eager) <= 1e-6
    compiled(x).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("bad,match", [
    (lambda x, c, n, bb: (x, c.half(), n, bb), "`w_cols` must have dtype"),
    (lambda x, c, n, bb: (x, c[0], n, bb), "`w_cols` must be 3-D"),
    (lambda x, c, n, bb: (x, c, n + 20, bb), "`out_features` 41 does not fit"),
    (lambda x, c, n, bb: (x[..., :-9], c, n, bb), "`x` has 24 features"),
    (lambda x, c, n, bb: (x, c, 0, bb), "`out_features` must be a positive int"),
    (lambda x, c, n, bb: (x, c, n, bb[:-1]), "`bias` has"),
    (lambda x, c, n, bb: (x, c.transpose(0, 1), n, bb), "`w_cols` must be contiguous"),
    (lambda x, c, n, bb: (x.int(), c, n, bb), "`x` must have dtype"),
    (lambda x, c, n, bb: (x, c.to("meta"), n, bb), "`w_cols` is on meta"),
])
def test_bad_inputs_name_the_argument(rng, bad, match):
    x, cols, b = make(rng, (4,), 33, 21, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        rk.ops.block_circulant_cols_linear(*bad(x, cols.float(), 21, b))


def test_layer_columns_follow_the_spectrum(rng):
    layer = rk.nn.BlockCirculantLinear(100, 70, 32)
    dense = layer.to_dense().double()
    assert (st.block_circulant_to_dense(layer.w_cols.double(), 70, 100) - dense).abs().max() <= 1e-6
    with torch.no_grad():
        layer.w_spectrum.mul_(2)  # by hand: stale until refreshed (eval, load, or an eager decode call)
    layer.eval()
    assert rel_err(st.block_circulant_to_dense(layer.w_cols.double(), 70, 100), 2 * dense) <= 1e-6
    state = {k: v * 3 if k == "w_spectrum" else v for k, v in layer.state_dict().items()}
    assert "w_cols" not in state  # derived, not saved
    layer.load_state_dict(state)
    assert rel_err(st.block_circulant_to_dense(layer.w_cols.double(), 70, 100), 6 * dense) <= 1e-6
    layer.half()  # the columns stay fp32, like the spectrum
    assert layer.w_cols.dtype == torch.float32 and layer.w_spectrum.dtype == torch.float32
    assert layer._decode_cols(torch.randn(1, 100).half()) is None  # CPU inputs: the spectrum op


def test_layer_columns_under_inference_mode_and_in_place():
    with torch.inference_mode():  # inference tensors have no version counter: built and refreshed all the same
        layer = rk.nn.BlockCirculantLinear(100, 70, 32)
        layer.eval()
    layer.eval()  # outside: the buffer is replaced (an inference tensor cannot be updated in place here)
    fresh = rk.nn.BlockCirculantLinear(100, 70, 32)
    ptr = fresh.w_cols.data_ptr()
    with torch.no_grad():
        fresh.w_spectrum.mul_(-1)
    fresh.eval()  # in place: a captured CUDA graph keeps reading the same address
    assert fresh.w_cols.data_ptr() == ptr
    assert rel_err(st.block_circulant_to_dense(fresh.w_cols.double(), 70, 100), fresh.to_dense().double()) <= 1e-6


def test_toeplitz_layer_columns_are_its_embedding(rng):
    layer = rk.nn.ToeplitzLinear(100, 90)
    assert layer.t_cols.shape == (1, 1, layer.fft_size)
    dense = st.block_circulant_to_dense(layer.t_cols.double(), 90, 100)
    assert (dense - layer.to_dense().double()).abs().max() <= 1e-6
    x = torch.randn(3, 100, generator=rng)
    assert rel_err(rk.ops.block_circulant_cols_linear(x, layer.t_cols, 90, layer.bias.detach()),
                   layer(x).detach()) <= 1e-5


# ---------------------------------------------------------------- GPU (CUDA kernel)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,b", [(1, 4096, 4096, 256), (1, 4096, 14336, 512), (16, 4096, 4096, 256),
                                     (3, 1029, 515, 128), (9, 700, 1100, 64), (17, 2100, 2050, 1024),
                                     (1, 4096, 4096, 4096), (40, 1000, 700, 256)])
def test_cuda_matches_float64(rng, dtype, M, K, N, b):
    x, cols, bias = make(rng, (M,), K, N, b, dtype, device="cuda")
    for bb in (bias, None):
        torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)  # poison the cache
        y = rk.ops.block_circulant_cols_linear(x, cols_for(cols, x), N, bb)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and rel_err(y, exact(x, cols, N, bb)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,b", [(16, 4096, 4096, 256), (9, 700, 1100, 64), (17, 2100, 2050, 1024)])
def test_cuda_in_8_row_tiles_matches_float64(rng, monkeypatch, M, K, N, b):
    # REPARAM_BC_COLS_TILE_ROWS=8 (read per call): above M = 8 one row group a CTA, the last tile partial
    monkeypatch.setenv("REPARAM_BC_COLS_TILE_ROWS", "8")
    x, cols, bias = make(rng, (M,), K, N, b, torch.float16, device="cuda")
    y = rk.ops.block_circulant_cols_linear(x, cols_for(cols, x), N, bias)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and rel_err(y, exact(x, cols, N, bias)) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,b", [(1, 4096, 4096, 256), (16, 4096, 4096, 256), (3, 4096, 4096, 4096),
                                     (12, 2100, 700, 512), (2, 1000, 700, 64)])
def test_cuda_in_wide_ctas_matches_float64(rng, monkeypatch, M, K, N, b):
    # REPARAM_BC_COLS_WIDE=1 (read per call): where the tiles leave SMs idle, one CTA of 16 warps (8 above M = 8) a
    # tile, K split among them; odd chunk counts (idle warps, a warp with two chunks)
    monkeypatch.setenv("REPARAM_BC_COLS_WIDE", "1")
    x, cols, bias = make(rng, (M,), K, N, b, torch.float16, device="cuda")
    torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)  # poison the cache
    y = rk.ops.block_circulant_cols_linear(x, cols_for(cols, x), N, bias)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and rel_err(y, exact(x, cols, N, bias)) <= TOL[torch.float16]


@pytest.mark.gpu
def test_cuda_graph_capture_and_backward(rng):
    x, cols, b = make(rng, (4,), 1000, 600, 256, torch.float16, device="cuda")
    w = cols_for(cols, x)
    rk.ops.block_circulant_cols_linear(x, w, 600, b)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = rk.ops.block_circulant_cols_linear(x, w, 600, b)
    for _ in range(2):  # replays reuse the split-K arrival counters
        x.copy_(torch.randn(x.shape, generator=rng).to(x))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, exact(x, cols, 600, b)) <= TOL[torch.float16]
    xs, ws = x.float().requires_grad_(), w.clone().requires_grad_()
    rk.ops.block_circulant_cols_linear(xs.half(), ws, 600, b).float().square().sum().backward()
    xr, wr = x.float().cpu().requires_grad_(), w.cpu().clone().requires_grad_()
    rk.ops.block_circulant_cols_linear(xr.half(), wr, 600, b.cpu()).float().square().sum().backward()
    assert rel_err(ws.grad.cpu(), wr.grad) <= 2e-2 and rel_err(xs.grad.cpu(), xr.grad) <= 2e-2


@pytest.mark.gpu
def test_layer_decodes_through_the_columns_in_eval_mode(rng, monkeypatch):
    import reparam_kernels.nn.structured as structured
    calls = []
    real = structured.block_circulant_cols_linear
    monkeypatch.setattr(structured, "block_circulant_cols_linear", lambda *a: calls.append(1) or real(*a))
    layer = rk.nn.BlockCirculantLinear(1000, 700, 256).cuda()
    x = torch.randn(3, 1000, generator=rng).cuda().half()
    ref = x.double() @ layer.to_dense().double().t() + layer.bias.double()
    with torch.no_grad():
        y_train = layer.half()(x)  # training mode: the spectrum op
        assert not calls
        y_eval = layer.eval()(x)
        assert calls and rel_err(y_eval, ref) <= TOL[torch.float16] and rel_err(y_train, ref) <= TOL[torch.float16]
        calls.clear()
        layer(torch.randn(17, 1000, generator=rng).cuda().half())  # more rows than COLS_MAX_M: the spectrum op
        assert not calls
    layer(x).float().sum()  # gradient wanted for the spectrum: the spectrum op
    assert not calls
    toe = rk.nn.ToeplitzLinear(3000, 2900).cuda().half().eval()  # embedding of 8192: past the FFT kernel's 4096
    x = torch.randn(2, 3000, generator=rng).cuda().half()
    with torch.no_grad():
        y = toe(x)
    assert calls and rel_err(y, x.double() @ toe.to_dense().double().t() + toe.bias.double()) <= TOL[torch.float16]
    # Toeplitz layers keep the columns up to TOEPLITZ_COLS_MAX_M rows (256: run 3 timed them faster than the FFT
    # paths at M = 64 and 256), block-circulant ones up to COLS_MAX_M (16)
    calls.clear()
    x = torch.randn(structured.TOEPLITZ_COLS_MAX_M, 3000, generator=rng).cuda().half()
    with torch.no_grad():
        y = toe(x)
        assert len(calls) == 1 and rel_err(y, x.double() @ toe.to_dense().double().t() + toe.bias.double()) <= 5e-3
        toe(torch.randn(structured.TOEPLITZ_COLS_MAX_M + 1, 3000, generator=rng).cuda().half())
    assert len(calls) == 1
