"""grouped_int4_linear, grouped_int8_linear and grouped_vq_linear (a MoE layer's experts in one call): reference, Triton and the
registered ops against float64 per-expert math on odd sizes, empty experts, rows no expert takes and both maps
of programs to row tiles; opcheck, torch.compile, autograd, bad inputs; on a GPU, the Triton kernels and
CUDA-graph capture."""
import pytest
import torch

import reparam_kernels as rk
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.compress.quantize import pack_int4
from conftest import TOL, rel_err

needs_triton = pytest.mark.skipif(rk_triton.grouped_int4_linear is None, reason="triton not installed")
OPS = ["grouped_int4_linear", "grouped_int8_linear", "grouped_vq_linear", "grouped_lut_linear"]


def make(rng, counts, K, N, dtype, group=32, bias=True, tail=0, device="cpu", op="grouped_int4_linear", d=2,
         books=None, entries=256):
    """(args, want): rows routed counts[e] to expert e in order, then `tail` rows no expert takes; want is
    the float64 product of each row with its expert's dequantized weight (zeros for the tail). VQ: `books`
    codebooks an expert (default 2 where N is even, else 1) of `entries` entries; LUT: `books` tables an expert
    (default one a row, as log 4-bit's)."""
    E, T = len(counts), sum(counts) + tail
    x = torch.randn(T, K, generator=rng).to(dtype)
    b = torch.randn(E, N, generator=rng).to(dtype) if bias else None
    if op == "grouped_int4_linear":
        g = K // group
        q = torch.randint(0, 16, (E, N, K), generator=rng, dtype=torch.uint8)
        s = (torch.rand(E, N, g, generator=rng) * 0.05 + 0.01).to(dtype)
        z = torch.randint(0, 16, (E, N, g), generator=rng).to(dtype)
        w = ((q.double().reshape(E, N, g, group) - z.double()[..., None]) * s.double()[..., None]).reshape(E, N, K)
        fmt = (torch.stack([pack_int4(q[e]) for e in range(E)]), s, z, group)
    elif op == "grouped_int8_linear":
        q = torch.randint(-127, 128, (E, N, K), generator=rng, dtype=torch.int8)
        s = (torch.rand(E, N, generator=rng) * 0.02 + 0.005).to(dtype)
        w = q.double() * s.double()[..., None]
        fmt = (q, s)
    elif op == "grouped_lut_linear":
        tables = books or N
        q = torch.randint(0, 16, (E, N, K), generator=rng, dtype=torch.uint8)
        lut = (torch.randn(E, tables, 16, generator=rng) * 0.1).to(dtype)
        table_of_row = torch.arange(N) // (N // tables)
        w = torch.stack([lut[e].double()[table_of_row[:, None], q[e].long()] for e in range(E)])
        fmt = (torch.stack([pack_int4(q[e]) for e in range(E)]), lut)
    else:  # GPTVQ's layout: a code per d inputs, a codebook per N / L rows
        tables = books or (2 if N % 2 == 0 else 1)
        q = torch.randint(0, entries, (E, N, K // d), generator=rng, dtype=torch.uint8)
        cb = (torch.randn(E, tables, entries, d, generator=rng) * 0.1).to(dtype)
        book_of_row = torch.arange(N) // (N // tables)
        w = torch.stack([cb[e].double()[book_of_row[:, None], q[e].long()].reshape(N, K) for e in range(E)])
        fmt = (q, cb)
    offsets = torch.tensor([0] + counts).cumsum(0)
    want = torch.zeros(T, N, dtype=torch.float64)
    for e in range(E):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        want[lo:hi] = x[lo:hi].double() @ w[e].t() + (b[e].double() if bias else 0)
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (x, offsets, *fmt, b)]
    return tuple(args), want.to(device)


CASES = [([3, 0, 5, 1], 64, 33, 32, 0), ([20, 1, 0], 96, 70, 32, 4), ([0, 0, 2], 128, 65, 64, 0),
         ([40, 17], 256, 40, 128, 3), ([1] * 6, 64, 24, 32, 1),
         # more than two row tiles of T: the packed map (each expert's rows in tiles of its own)
         ([0, 50, 3, 0, 33], 64, 40, 32, 2), ([10, 0, 7, 12, 9, 0, 11, 1, 0], 64, 24, 32, 0)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_matches_float64(rng, op, dtype, case):
    counts, K, N, group, tail = CASES[case]
    args, want = make(rng, counts, K, N, dtype, group=group, tail=tail, op=op)
    y = getattr(reference, op)(*args)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y, want) <= TOL[dtype]
    assert not y[sum(counts):].any()  # rows no expert takes: zeros


@needs_triton
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_float64(rng, op, dtype, case):
    """Row tiles of 16 and 32 (20 and 40 rows an expert span several), experts without rows, a tail."""
    counts, K, N, group, tail = CASES[case]
    args, want = make(rng, counts, K, N, dtype, group=group, tail=tail, bias=case % 2 == 0, op=op)
    y = getattr(rk_triton, op)(*args)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y, want) <= TOL[dtype]
    assert not y[sum(counts):].any()


@needs_triton
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_both_row_tile_maps(rng, op, packed, case):
    """Either map of programs to row tiles (per expert, or packed with the bisection) on every case."""
    counts, K, N, group, tail = CASES[case]
    args, want = make(rng, counts, K, N, torch.float16, group=group, tail=tail, op=op)
    assert rel_err(getattr(rk_triton, op)(*args, packed=packed), want) <= TOL[torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_int4_gemv_form(rng, dtype, case):
    """int4's GEMV form (an expert's rows one after the other) forced on every case, many rows an expert too."""
    counts, K, N, group, tail = CASES[case]
    args, want = make(rng, counts, K, N, dtype, group=group, tail=tail, bias=case % 2 == 1)
    y = rk_triton.grouped_int4_linear(*args, gemv=True)
    assert rel_err(y, want) <= TOL[dtype]
    assert not y[sum(counts):].any()


@needs_triton
def test_triton_int8_any_k(rng):
    args, want = make(rng, [3, 0, 9], 37, 21, torch.float16, op="grouped_int8_linear")
    assert rel_err(rk_triton.grouped_int8_linear(*args, packed=True), want) <= TOL[torch.float16]


@needs_triton
@pytest.mark.parametrize("d", [1, 3, 4])
def test_triton_vq_other_sub_vector_lengths(rng, d):
    args, want = make(rng, [3, 0, 20], 48, 22, torch.float16, op="grouped_vq_linear", d=d)
    for packed in (False, True):
        assert rel_err(rk_triton.grouped_vq_linear(*args, packed=packed), want) <= TOL[torch.float16]


def test_launch_plan_packs_long_inputs():
    from reparam_kernels.triton._grouped import Plan, tile_ends
    p = Plan(2, 8, 28672, 4096)  # decode: one tile
    assert (p.tiles.bm, p.tiles_m, p.packed, p.programs) == (16, 1, False, 8)
    p = Plan(2, 8, 28672, 4096, gemv="auto")  # decode, a format with a GEMV form: one program an expert
    assert p.gemv and p.tiles.gemv and (p.tiles_m, p.packed, p.programs) == (1, False, 8)
    assert not Plan(9, 8, 28672, 4096, gemv="auto").gemv
    p = Plan(4096 * 8, 128, 1536, 2048)  # prefill
    assert p.packed and p.programs == p.tiles_m + 128 < 128 * p.tiles_m and p.search == 8
    ends = tile_ends(torch.tensor([0, 5, 5, 40, 41]), 41, 16)
    assert ends.tolist() == [1, 1, 4, 5]


@needs_triton
@pytest.mark.parametrize("op", OPS)
def test_triton_clamps_offsets_past_the_rows(rng, op):
    """Offsets beyond T (a caller's bug the op cannot see without a host sync) read no row past x."""
    args, want = make(rng, [3, 4], 64, 16, torch.float32, op=op)
    x, offsets, *rest = args
    for packed in (False, True):
        y = getattr(rk_triton, op)(x, torch.tensor([0, 3, 1000]), *rest, packed=packed)
        assert rel_err(y, want) <= TOL[torch.float32]
        assert rel_err(getattr(reference, op)(x, torch.tensor([0, 3, 1000]), *rest), want) <= TOL[torch.float32]


@pytest.mark.parametrize("op", OPS)
def test_op_cpu_opcheck_and_wrapper(rng, op):
    args, want = make(rng, [2, 0, 3], 64, 24, torch.float32, tail=1, op=op)
    assert rel_err(getattr(torch.ops.reparam, op)(*args), want) <= 1e-5
    torch.library.opcheck(getattr(torch.ops.reparam, op), args)
    nob = (*args[:-1], None)
    torch.library.opcheck(getattr(torch.ops.reparam, op), nob)
    assert rel_err(getattr(rk.ops, op)(*args), want) <= 1e-5


# (op, make's arguments, whether the CUDA kernel's small-M loop takes the layout)
LAYOUTS = [("grouped_int4_linear", {"group": 64}, True), ("grouped_int4_linear", {"K": 192, "group": 96}, False),
           ("grouped_int8_linear", {"K": 96}, True), ("grouped_int8_linear", {"K": 100}, False),
           ("grouped_vq_linear", {"books": 2}, True), ("grouped_vq_linear", {"N": 256, "books": 2}, True),
           ("grouped_vq_linear", {"books": 1, "d": 4}, False), ("grouped_vq_linear", {"K": 48}, False),
           ("grouped_vq_linear", {"N": 128, "books": 4}, False), ("grouped_vq_linear", {"N": 640, "books": 10}, True),
           ("grouped_lut_linear", {}, True), ("grouped_lut_linear", {"K": 100}, False)]


@pytest.mark.parametrize("op,kw,fast", LAYOUTS)
def test_layouts_off_the_cuda_loop_run_triton(rng, monkeypatch, op, kw, fast):
    """Where the C++ op would take a layout only through its warp-per-output fallback (csrc/grouped_quant.cuh), the
    wrapper runs the Triton kernel instead (OpSpec.fast_layout); elsewhere the C++ op. The CUDA backend and Triton
    are faked, so this runs on the CPU; test_cuda_on_cpu_grouped*.py check fast_layout against the C++ op."""
    kw = {"K": 128, "N": 64, **kw}
    K, N = kw.pop("K"), kw.pop("N")
    args, _ = make(rng, [2, 0, 3], K, N, torch.float16, op=op, **kw)
    assert_routes(monkeypatch, op, args, fast)


def assert_routes(monkeypatch, op, args, fast):
    """With a faked CUDA backend and Triton: the wrapper's route for args (the C++ op where fast, else Triton; the
    C++ op with gradients wanted or without Triton)."""
    assert rk._dispatch.REGISTRY[op].fast_layout(*args) is fast
    monkeypatch.setattr(rk._dispatch, "BACKEND_CACHE", {})
    monkeypatch.setattr(rk._dispatch, "backend_of", lambda name, x: ("cuda", "faked"))
    monkeypatch.setattr(rk._dispatch, "triton_status", lambda device_type="cuda": (True, "faked"))
    assert rk._dispatch.route(op, *args)[0] == ("cuda" if fast else "triton")
    assert rk._dispatch.route(op, *args, needs_grad=True)[0] == "cuda"  # (the C++ op holds the autograd)
    # no Triton: the C++ op all the same (its fallback is correct, only slow)
    monkeypatch.setattr(rk._dispatch, "BACKEND_CACHE", {})
    monkeypatch.setattr(rk._dispatch, "triton_status", lambda device_type="cuda": (False, "faked"))
    assert rk._dispatch.route(op, *args)[0] == "cuda"


@pytest.mark.parametrize("op", OPS)
def test_x_and_bias_gradient_and_no_scales_gradient(rng, op):
    args, _ = make(rng, [2, 0, 3], 64, 5, torch.float64, tail=1, op=op)
    fn = getattr(rk.ops, op)
    x, b = args[0].requires_grad_(True), args[-1].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, b_: fn(x_, *args[1:-1], b_), (x, b))
    s = args[3].clone().requires_grad_(True)
    y = fn(args[0], args[1], args[2], s, *args[4:])
    with pytest.raises(NotImplementedError, match="no gradient for the experts' quantization tensors"):
        y.sum().backward()


class Net(torch.nn.Module):
    def __init__(self, op, args):
        super().__init__()
        self.fn, self.args = getattr(rk.ops, op), args[1:]

    def forward(self, x):
        return torch.relu(self.fn(x, *self.args)) * 2


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(rng, op):
    args, _ = make(rng, [2, 0, 3], 64, 24, torch.float32, tail=1, op=op)
    m = Net(op, args)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(args[0]), m(args[0])) <= 1e-6


BAD_INT8 = [
    (lambda a: (a[0], a[1], a[2].to(torch.uint8), *a[3:]), "`qweight` must have dtype torch.int8"),
    (lambda a: (a[0], a[1], a[2], a[3][:, :-1].contiguous(), a[4]), "`scales` must be \\[E, N\\] = \\[2, 24\\]"),
    (lambda a: (a[0], a[1][1:], *a[2:]), "`expert_offsets` must have experts \\+ 1 = 3 entries"),
    (lambda a: (*a[:4], a[4][:, :-1].contiguous()), "`bias` must be \\[E, N\\]"),
]
BAD_VQ = [
    (lambda a: (a[0], a[1], a[2].to(torch.int16), *a[3:]), "`codes` must have dtype torch.uint8"),
    (lambda a: (a[0], a[1], a[2], a[3][0], a[4]), "`codebooks` must be 4-D"),
    (lambda a: (a[0], a[1], a[2][:1].contiguous(), *a[3:]), "`codes` holds 1 experts, `codebooks` 2"),
    (lambda a: (a[0], a[1], a[2], torch.zeros(2, 5, 256, 2), a[4]), "`codebooks` has 5 codebooks an expert"),
    (lambda a: (a[0][:, :-2].contiguous(), *a[1:]), "`x` has 62 features"),
]
BAD_LUT = [
    (lambda a: (a[0], a[1], a[2].to(torch.int16), *a[3:]), "`codes` must have dtype torch.uint8"),
    (lambda a: (a[0], a[1], a[2], a[3][0], a[4]), "`lut` must be 3-D"),
    (lambda a: (a[0], a[1], a[2], a[3][:, :, :8].contiguous(), a[4]), "`lut` must be \\[E, L, 16\\]"),
    (lambda a: (a[0], a[1], a[2][:1].contiguous(), *a[3:]), "`lut` must be \\[E, L, 16\\] with E = 1"),
    (lambda a: (a[0], a[1], a[2], torch.zeros(2, 5, 16), a[4]), "`lut` has 5 tables an expert"),
    (lambda a: (a[0][:, :-2].contiguous(), *a[1:]), "`x` has 62 features"),
]
BAD = [
    (lambda a: (a[0], a[1][:-1], *a[2:]), "`expert_offsets` must have experts \\+ 1 = 3 entries"),
    (lambda a: (a[0], a[1].int(), *a[2:]), "`expert_offsets` must have dtype torch.int64"),
    (lambda a: (a[0][None], *a[1:]), "`x` must be 2-D"),
    (lambda a: (a[0], a[1], a[2][0], *a[3:]), "`qweight` must be 3-D"),
    (lambda a: (a[0], a[1], a[2], a[3][:, :-1].contiguous(), *a[4:]), "`scales` must be \\[E, N, K // group_size\\]"),
    (lambda a: (a[0], a[1], a[2], a[3], a[4].half(), *a[5:]), "`zeros` must have dtype"),
    (lambda a: (*a[:5], 48, a[6]), "`group_size` must be a positive multiple of 32"),
    (lambda a: (*a[:6], a[6][0]), "`bias` must be 2-D"),
    (lambda a: (a[0][:, :-2], *a[1:]), "`x` has 62 features"),
]


@pytest.mark.parametrize("op,case", [("grouped_int4_linear", i) for i in range(len(BAD))]
                         + [("grouped_int8_linear", i) for i in range(len(BAD_INT8))]
                         + [("grouped_vq_linear", i) for i in range(len(BAD_VQ))]
                         + [("grouped_lut_linear", i) for i in range(len(BAD_LUT))])
def test_bad_inputs_name_the_argument(rng, op, case):
    args, _ = make(rng, [2, 3], 64, 24, torch.float32, op=op)
    bad, match = {"grouped_int4_linear": BAD, "grouped_int8_linear": BAD_INT8, "grouped_vq_linear": BAD_VQ,
                  "grouped_lut_linear": BAD_LUT}[op][case]
    with pytest.raises(ValueError, match=match):
        getattr(rk.ops, op)(*bad(args))


# ---------------------------------------------------------------- GPU

# decode (one row an expert of 8: int4's GEMV), a prefill (the packed map, 128-row tiles), two odd CPU cases
GPU_CASES = [([1, 0, 0, 1, 0, 0, 0, 0], 4096, 1536, 128, 0), ([300, 0, 77, 1000, 5], 1024, 2816, 128, 9),
             CASES[1], CASES[5]]


@pytest.mark.gpu
@pytest.mark.parametrize("op,dtype,case", [(op, torch.float16, c) for op in OPS for c in range(len(GPU_CASES))]
                         + [(op, torch.bfloat16, 0) for op in OPS])
def test_gpu_matches_float64(rng, op, dtype, case):
    counts, K, N, group, tail = GPU_CASES[case]
    args, want = make(rng, counts, K, N, dtype, group=group, tail=tail, device="cuda", op=op)
    for fn in (getattr(rk.ops, op), getattr(rk_triton, op)):  # the registered op (CUDA in fp16 / bf16) and Triton
        y = fn(*args)
        assert rel_err(y, want) <= TOL[dtype]
        assert not y[sum(counts):].any()


# the CUDA kernels' paths (csrc/grouped_quant.cuh): the small-M kernel's tiles (T = 1, 2, 8, 16, 32, 64; 70 rows of
# one expert in two 64-row chunks), split K at decode, and the fallback (int8 rows of 100 bytes; VQ with d = 3, and
# pairs with a codebook per 4 rows; LUT code rows of 50 bytes; switched off)
CUDA_CASES = [([1, 0, 0, 0, 0, 0, 0, 0], 4096, 1024, {}), ([0, 1, 0, 1], 2048, 512, {}),
              ([3, 0, 5], 1024, 700, {"tail": 1}), ([9, 0, 7], 512, 264, {}), ([20, 1, 11], 256, 72, {}),
              ([40, 17, 0, 7], 640, 130, {}), ([0, 70, 3, 27], 256, 96, {"tail": 5})]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("small_m", ["1", "0"])
def test_gpu_cuda_kernel_paths(rng, monkeypatch, op, dtype, small_m):
    monkeypatch.setenv("REPARAM_GROUPED_SMALL_M", small_m)  # read by the C++ op at every call
    extra = {"grouped_int8_linear": [([3, 0, 5], 100, 33, {"tail": 2})],
             "grouped_vq_linear": [([3, 0, 5], 99, 33, {"tail": 2, "d": 3}), ([2, 9], 64, 40, {"books": 10})],
             "grouped_lut_linear": [([3, 0, 5], 100, 33, {"tail": 2})]}
    cases = CUDA_CASES + extra.get(op, [])
    for counts, K, N, kw in cases:
        args, want = make(rng, counts, K, N, dtype, group=64, device="cuda", op=op, **kw)
        y = getattr(torch.ops.reparam, op)(*args)  # the C++ op itself (the wrapper sends `extra` to Triton)
        assert rel_err(y, want) <= TOL[dtype], (counts, K, N)
        assert not y[sum(counts):].any()


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
# one row tile; the packed map; decode with K split over CTAs (the CUDA kernel's split-K counters, replayed)
@pytest.mark.parametrize("counts,k", [([2, 0, 3, 1], 256), ([40, 0, 33, 1], 256), ([1, 0, 1, 0], 4096)])
def test_gpu_cuda_graph_replays_new_routing(rng, op, counts, k):
    """Captured once, replayed with other offsets in the same buffer: the routing lives on the device."""
    args, _ = make(rng, counts, k, 128, torch.float16, device="cuda", op=op)
    x, offsets, *rest = args
    fn = getattr(rk.ops, op)
    fn(x, offsets, *rest)  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x, offsets, *rest)
    rows = sum(counts)
    offsets.copy_(torch.tensor([0, 0, rows, rows, rows]))  # every row to expert 1 now
    for _ in range(2):  # (a second replay: split-K counters back at zero)
        graph.replay()
        torch.testing.assert_close(y, getattr(reference, op)(x, offsets, *rest), rtol=2e-2, atol=2e-2)
