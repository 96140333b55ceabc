"""int8_linear, int4_linear, lut_linear, vq_linear: reference, Triton, CUDA against float64 dequantized math;
opcheck, torch.compile, autograd, bad inputs naming the argument."""
import pytest
import torch

import reparam_kernels as rk
from reparam_kernels.compress.quantize import pack_int4
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from conftest import HAS_GPU, TOL, rel_err

OPS = ["int8_linear", "int4_linear", "lut_linear", "vq_linear"]


def make(op, rng, lead, K, N, dtype, device="cpu", bias=True, group=32, tables=1):
    """(args, W64): the op's arguments and its dense weight in float64, from random codes."""
    x = torch.randn(*lead, K, generator=rng).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=rng).to(device=device, dtype=dtype) if bias else None
    if op == "int8_linear":
        q = torch.randint(-127, 128, (N, K), generator=rng, dtype=torch.int8)
        s = (torch.rand(N, generator=rng) * 0.02 + 0.005).to(dtype)
        w = q.double() * s.double()[:, None]
        args = (x, q.to(device), s.to(device), b)
    elif op == "int4_linear":
        q = torch.randint(0, 16, (N, K), generator=rng, dtype=torch.uint8)
        g = K // group
        s = (torch.rand(N, g, generator=rng) * 0.05 + 0.01).to(dtype)
        z = torch.randint(0, 16, (N, g), generator=rng).to(dtype)
        w = (q.double().reshape(N, g, group) - z.double()[..., None]) * s.double()[..., None]
        args = (x, pack_int4(q).to(device), s.to(device), z.to(device), group, b)
        w = w.reshape(N, K)
    elif op == "vq_linear":  # pairs, 256 entries a codebook (GPTVQ's 4 bits a weight)
        q = torch.randint(0, 256, (N, K // 2), generator=rng, dtype=torch.uint8)
        books = (torch.randn(tables, 256, 2, generator=rng) * 0.1).to(dtype)
        w = books.double()[torch.arange(N)[:, None] // (N // tables), q.long()].reshape(N, K)
        args = (x, q.to(device), books.to(device), b)
    else:
        q = torch.randint(0, 16, (N, K), generator=rng, dtype=torch.uint8)
        lut = (torch.randn(tables, 16, generator=rng) * 0.1).to(dtype)
        w = lut.double().repeat_interleave(N // tables, 0).gather(1, q.long())
        args = (x, pack_int4(q).to(device), lut.to(device), b)
    return args, w


def exact(args, w):
    x, b = args[0], args[-1]
    y = x.double() @ w.to(x.device).t()
    return y + b.double() if b is not None else y


def wrapper(op):
    return getattr(rk.ops, op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_matches_float64(rng, op, dtype):
    args, w = make(op, rng, (2, 3), 64, 29, dtype, tables=29)
    y = getattr(reference, op)(*args)
    assert y.dtype == dtype and y.shape == (2, 3, 29)
    assert rel_err(y, exact(args, w)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.int4_linear is None, reason="triton not installed")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,K,N,group,tables", [((1,), 64, 33, 32, 1), ((3,), 192, 65, 64, 5),
                                                   ((17,), 128, 70, 128, 70), ((2, 5), 96, 40, 32, 8)])
def test_triton_matches_float64(rng, op, dtype, lead, K, N, group, tables):
    args, w = make(op, rng, lead, K, N, dtype, group=group, tables=tables)
    y = getattr(rk_triton, op)(*args)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert rel_err(y, exact(args, w)) <= TOL[dtype]


@pytest.mark.skipif(rk_triton.int4_linear is None, reason="triton not installed")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("M,K,N,group,split", [(1, 512, 70, 32, 3), (1, 384, 33, 96, None), (5, 640, 40, 64, 4),
                                               (70, 256, 130, 128, 2), (130, 192, 24, 64, None)])
def test_triton_tiles_and_split_k(rng, op, M, K, N, group, split):
    """Every tile class of _tiles.choose (GEMV at M = 1, 16-row dots, 128 × 128 dots) with K split
    into uneven parts (int4 K = 640, g64: 192 + 192 + 192 + 64) or the automatic choice; the bias
    through the split's reduction."""
    args, w = make(op, rng, (M,), K, N, torch.float16, group=group, tables=N if N % 2 else 2)
    y = getattr(rk_triton, op)(*args, split=split)
    assert rel_err(y, exact(args, w)) <= TOL[torch.float16]


def test_triton_split_choice():
    from reparam_kernels.triton import _tiles
    cpu = torch.device("cpu")  # stands in for a 4-SM GPU
    t = _tiles.choose(1, 64, 8192, cpu)  # one output tile: split up to 2 × 4 programs
    assert t.gemv and t.split == 8 and t.k_split * t.split >= 8192 and t.k_split % t.bk == 0
    assert _tiles.choose(1, 64, 256, cpu).split == 1  # two steps of K: nothing to split
    assert _tiles.choose(300, 4096, 4096, cpu).split == 1  # tiles enough
    assert _tiles.choose(16, 64, 4096, cpu, bk_limit=32).bk == 32
    t = _tiles.choose(1, 64, 1024, cpu, split=3)  # 8 steps → 3, 3, 2
    assert (t.split, t.k_split) == (3, 384)


@pytest.mark.skipif(rk_triton.int8_linear is None, reason="triton not installed")
@pytest.mark.parametrize("K", [37, 130])  # int8 takes any K, not only tile multiples
def test_triton_int8_odd_k(rng, K):
    args, w = make("int8_linear", rng, (5,), K, 21, torch.float16)
    assert rel_err(rk_triton.int8_linear(*args), exact(args, w)) <= TOL[torch.float16]


@pytest.mark.parametrize("op", OPS)
def test_op_cpu_and_opcheck(rng, op):
    args, w = make(op, rng, (3, 2), 64, 24, torch.float32, tables=8)
    assert rel_err(getattr(torch.ops.reparam, op)(*args), exact(args, w)) <= 1e-5
    torch.library.opcheck(getattr(torch.ops.reparam, op), args)
    nob = (*args[:-1], None)
    torch.library.opcheck(getattr(torch.ops.reparam, op), nob)
    assert rel_err(wrapper(op)(*nob), exact(nob, w)) <= 1e-5


@pytest.mark.parametrize("op", OPS)
def test_x_gradient(rng, op):
    args, w = make(op, rng, (3,), 64, 5, torch.float64, tables=5)
    x, b = args[0].requires_grad_(True), args[-1].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, b_: wrapper(op)(x_, *args[1:-1], b_), (x, b))


class Net(torch.nn.Module):
    def __init__(self, op, args):
        super().__init__()
        self.op, self.args = op, args[1:]

    def forward(self, x):
        return torch.relu(wrapper(self.op)(x, *self.args)) * 2


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(rng, op):
    args, w = make(op, rng, (5,), 64, 24, torch.float32)
    m = Net(op, args)
    eager = m(args[0])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(args[0]), eager) <= 1e-6


BAD = {
    "int8_linear": [
        (lambda a: (a[0].half(), *a[1:]), "`scales` must have dtype"),
        (lambda a: (a[0], a[1].to(torch.uint8), *a[2:]), "`qweight` must have dtype"),
        (lambda a: (a[0], a[1], a[2][:-1], a[3]), "`scales` has 23 elements"),
        (lambda a: (a[0][..., :-1], *a[1:]), "`x` has 63 features"),
        (lambda a: (*a[:-1], a[-1][:-1]), "`bias` has"),
        (lambda a: (a[0], a[1].t().contiguous().t(), *a[2:]), "`qweight` must be contiguous"),
    ],
    "int4_linear": [
        (lambda a: (*a[:4], 48, a[5]), "`group_size` must be a positive multiple of 32"),
        (lambda a: (*a[:4], 128, a[5]), "`group_size` = 128 does not divide"),
        (lambda a: (a[0], a[1], a[2].repeat(1, 2), *a[3:]), "`scales` must be"),
        (lambda a: (a[0], a[1], a[2], a[3][:-1], *a[4:]), "`zeros` must be"),
        (lambda a: (a[0], a[1], a[2].half(), *a[3:]), "`scales` must have dtype"),
        (lambda a: (a[0], a[1].to(torch.int8), *a[2:]), "`qweight` must have dtype"),
        (lambda a: (a[0][..., :-2], *a[1:]), "`x` has 62 features"),
    ],
    "lut_linear": [
        (lambda a: (a[0], a[1], a[2][:, :8].contiguous(), a[3]), "`lut` must be \\[L, 16\\]"),
        (lambda a: (a[0], a[1], torch.zeros(5, 16), a[3]), "`lut` has 5 tables"),
        (lambda a: (a[0], a[1], a[2].double(), a[3]), "`lut` must have dtype"),
        (lambda a: (a[0], a[1].to(torch.int32), *a[2:]), "`codes` must have dtype"),
        (lambda a: (a[0][..., :-2], *a[1:]), "`x` has 62 features"),
    ],
    "vq_linear": [
        (lambda a: (a[0], a[1], a[2][:, :, 0], a[3]), "`codebooks` must be 3-D"),
        (lambda a: (a[0], a[1], torch.zeros(4, 300, 2), a[3]), "E <= 256"),
        (lambda a: (a[0], a[1], torch.zeros(5, 256, 2), a[3]), "`codebooks` has 5 codebooks"),
        (lambda a: (a[0], a[1], a[2].double(), a[3]), "`codebooks` must have dtype"),
        (lambda a: (a[0], a[1].to(torch.int16), *a[2:]), "`codes` must have dtype"),
        (lambda a: (a[0], a[1], a[2].repeat(1, 1, 2), a[3]), "`x` has 64 features in its last dimension, expected 128"),
        (lambda a: (a[0], a[1], a[2].transpose(1, 2).contiguous().transpose(1, 2), a[3]), "`codebooks` must be contiguous"),
    ],
}


@pytest.mark.parametrize("op,case", [(op, i) for op in OPS for i in range(len(BAD[op]))])
def test_bad_inputs_name_the_argument(rng, op, case):
    args, _ = make(op, rng, (4,), 64, 24, torch.float32, group=64, tables=4)
    bad, match = BAD[op][case]
    with pytest.raises(ValueError, match=match):
        wrapper(op)(*bad(args))


# ---------------------------------------------------------------- GPU (CUDA and Triton kernels)

GPU_SHAPES = [(1, 4096, 4096), (3, 128, 72), (16, 512, 1000), (17, 256, 200), (64, 1024, 512),
              (65, 384, 136), (300, 512, 384), (2048, 1024, 1024), (1, 8192, 8192), (5, 14336, 4096)]


def _poison_allocator():
    junk = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)
    del junk


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_gpu_op_matches_float64(rng, op, dtype, M, K, N):
    group = 128 if K % 128 == 0 else 32
    args, w = make(op, rng, (M,), K, N, dtype, device="cuda", group=group, tables=8 if N % 8 == 0 else 1)
    for nob in (False, True):
        a = (*args[:-1], None) if nob else args
        _poison_allocator()
        y = getattr(torch.ops.reparam, op)(*a)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()
        assert rel_err(y, exact(a, w)) <= TOL[dtype], (op, M, K, N)
        if rk_triton.int8_linear is not None and M <= 300:
            assert rel_err(getattr(rk_triton, op)(*a), exact(a, w)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_opcheck_graph_capture_leading_dims(rng, op):
    args, w = make(op, rng, (2, 3), 256, 136, torch.float16, device="cuda")
    torch.library.opcheck(getattr(torch.ops.reparam, op), args)
    xs = args[0].transpose(0, 1)  # non-contiguous leading dims
    a2 = (xs, *args[1:])
    assert rel_err(wrapper(op)(*a2), exact(a2, w)) <= 5e-3
    static_y = wrapper(op)(*args)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = wrapper(op)(*args)
    args[0].copy_(torch.randn(args[0].shape, generator=rng).to(args[0]))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, exact(args, w)) <= 5e-3
