"""grouped_lowrank_linear (a MoE layer's low-rank experts of ragged ranks in one call, plain or pivoted factors):
reference, Triton and the registered op against float64 per-expert math on odd sizes, experts of rank 0 and
without rows, rows no expert takes and both maps of programs to row tiles; opcheck, torch.compile, autograd,
the flat layout's checks; on a GPU, the kernels and CUDA-graph capture."""
import pytest
import torch

import reparam_kernels as rk
from reparam_kernels import reference
from reparam_kernels import triton as rk_triton
from reparam_kernels.ops.grouped_lowrank_linear import stack_factors
from conftest import TOL, rel_err
from test_grouped_ops import assert_routes

needs_triton = pytest.mark.skipif(rk_triton.grouped_lowrank_linear is None, reason="triton not installed")


def make(rng, counts, ranks, K, N, dtype, pivoted, bias=True, tail=0, device="cpu"):
    """(args, want): rows routed counts[e] to expert e (rank ranks[e]) in order, then `tail` rows no expert
    takes; want: each row times its expert's float64 u·v (pivoted: u·[I | w]·P), zeros for the tail.
    pivoted="mixed": the even experts pivoted, the odd ones plain (a perm given, their rows the identity)."""
    E, T = len(counts), sum(counts) + tail
    x = torch.randn(T, K, generator=rng).to(dtype)
    b = torch.randn(E, N, generator=rng).to(dtype) if bias else None
    piv = [pivoted is True or (pivoted == "mixed" and e % 2 == 0) for e in range(E)]
    us = [(torch.randn(N, r, generator=rng) / max(r, 1) ** 0.5).to(dtype) for r in ranks]
    vs = [(torch.randn(r, K - r if p else K, generator=rng) / K ** 0.5).to(dtype) for r, p in zip(ranks, piv)]
    perms = [torch.randperm(K, generator=rng) if p else None for p in piv] if pivoted else None
    u, v, perm, fo, max_rank, align = stack_factors(us, vs, perms)
    offsets = torch.tensor([0] + counts).cumsum(0)
    want = torch.zeros(T, N, dtype=torch.float64)
    for e in range(E):
        right = vs[e].double()
        if piv[e]:
            right = torch.zeros(ranks[e], K, dtype=torch.float64)
            right[:, perms[e][:ranks[e]]] = torch.eye(ranks[e], dtype=torch.float64)
            right[:, perms[e][ranks[e]:]] = vs[e].double()
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        want[lo:hi] = x[lo:hi].double() @ (us[e].double() @ right).t() + (b[e].double() if bias else 0)
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in (x, offsets, u, v, perm, fo, N, max_rank, align, b)]
    return tuple(args), want.to(device)


# (counts, ranks, K, N, tail): odd sizes, rank 0, an expert without rows, ranks past one column tile, a tail;
# the last two have more than two row tiles of T (the packed map)
CASES = [([3, 0, 5, 1], [5, 9, 0, 17], 45, 37, 0), ([20, 1, 0], [33, 8, 3], 70, 29, 4),
         ([1] * 6, [1, 2, 3, 4, 5, 6], 24, 19, 1), ([0, 50, 3, 0, 33], [16, 40, 7, 2, 24], 64, 40, 2),
         ([10, 0, 7, 12, 9, 0, 11, 1, 0], [8] * 9, 33, 24, 0),
         # ranks and K in multiples of 8 (the default recipe's rounding): row_align 8, the kernels' 16-byte loads
         ([5, 0, 9, 30], [16, 8, 24, 8], 64, 40, 1)]


@pytest.mark.parametrize("pivoted", [False, True, "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_matches_float64(rng, pivoted, dtype, case):
    counts, ranks, K, N, tail = CASES[case]
    args, want = make(rng, counts, ranks, K, N, dtype, pivoted, tail=tail)
    y = reference.grouped_lowrank_linear(*args)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y, want) <= TOL[dtype]
    assert not y[sum(counts):].any()


@needs_triton
@pytest.mark.parametrize("pivoted", [False, True, "mixed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_float64(rng, pivoted, dtype, case):
    counts, ranks, K, N, tail = CASES[case]
    args, want = make(rng, counts, ranks, K, N, dtype, pivoted, bias=case % 2 == 0, tail=tail)
    y = rk_triton.grouped_lowrank_linear(*args)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y, want) <= TOL[dtype]
    assert not y[sum(counts):].any()


@needs_triton
@pytest.mark.parametrize("pivoted", [False, True, "mixed"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_both_row_tile_maps(rng, pivoted, packed, case):
    counts, ranks, K, N, tail = CASES[case]
    args, want = make(rng, counts, ranks, K, N, torch.float16, pivoted, tail=tail)
    assert rel_err(rk_triton.grouped_lowrank_linear(*args, packed=packed), want) <= TOL[torch.float16]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_experts_in_a_group(rng, backend):
    """Experts a rank allocation kept dense join the group exactly as stack_factors says: W [N, K] with N ≥ K as
    u = W, an empty w and the identity perm (pivoted, rank K), with N < K as u = I, v = W (plain, rank N)."""
    if backend == "triton" and rk_triton.grouped_lowrank_linear is None:
        pytest.skip("triton not installed")
    K = 24
    for N in (40, 16):
        x = torch.randn(9, K, generator=rng)
        wd = torch.randn(N, K, generator=rng)
        ul, vl = torch.randn(N, 5, generator=rng), torch.randn(5, K - 5, generator=rng)
        pl = torch.randperm(K, generator=rng)
        if N >= K:
            dense = (wd, torch.zeros(K, 0), torch.arange(K))
        else:
            dense = (torch.eye(N), wd, None)
        u, v, perm, fo, r, align = stack_factors([ul, dense[0]], [vl, dense[1]], [pl, dense[2]])
        args = (x, torch.tensor([0, 4, 9]), u, v, perm, fo, N, r, align, None)
        y = getattr(rk_triton if backend == "triton" else reference, "grouped_lowrank_linear")(*args)
        right = torch.zeros(5, K, dtype=torch.float64)
        right[:, pl[:5]] = torch.eye(5, dtype=torch.float64)
        right[:, pl[5:]] = vl.double()
        want = torch.cat([x[:4].double() @ (ul.double() @ right).t(), x[4:].double() @ wd.double().t()])
        assert rel_err(y, want) <= TOL[torch.float32]


def test_row_align_from_the_ranks():
    for ranks, k, pivoted, want in (([16, 8, 24], 64, True, 8), ([16, 8, 24], 60, True, 4), ([16, 8, 24], 60, False, 4),
                                    ([8, 6], 64, False, 2), ([8, 5], 64, False, 1)):
        us = [torch.zeros(10, r) for r in ranks]
        vs = [torch.zeros(r, k - r if pivoted else k) for r in ranks]
        perms = [torch.arange(k) for _ in ranks] if pivoted else None
        assert stack_factors(us, vs, perms)[5] == want, (ranks, k, pivoted)


@needs_triton
def test_triton_clamps_bad_layouts(rng):
    """Offsets past T, a rank past max_rank and factor offsets past the tensors (bugs the kernels cannot see
    without a host sync) read nothing out of bounds: the tensors are views of larger buffers filled with NaN,
    and the rows that stay in range come out right."""
    args, want = make(rng, [3, 4], [5, 6], 40, 16, torch.float32, True)
    x, offsets, u, v, perm, fo, n, r, align, b = args
    y = rk_triton.grouped_lowrank_linear(x, torch.tensor([0, 3, 1000]), u, v, perm, fo, n, r, align, b)
    assert rel_err(y, want) <= TOL[torch.float32]
    big = torch.full((2, v.numel() + 64), float("nan"))
    big[0, :v.numel()] = v
    bad_fo = torch.tensor([[0, 5, 11], [0, 175, 10**6]])  # expert 1's w starts far past v
    y = rk_triton.grouped_lowrank_linear(x, offsets, u, big[0, :v.numel()], perm, bad_fo, n, r, align, b)
    assert rel_err(y[:3], want[:3]) <= TOL[torch.float32] and torch.isfinite(y).all()
    y = rk_triton.grouped_lowrank_linear(x, offsets, u, v, perm, torch.tensor([[0, 5, 90], [0, 175, 379]]), n, r,
                                         align, b)
    assert rel_err(y[:3], want[:3]) <= TOL[torch.float32]  # expert 1's rank 85 > max_rank: clamped


@pytest.mark.parametrize("pivoted", [False, True])
def test_op_cpu_opcheck_and_wrapper(rng, pivoted):
    args, want = make(rng, [2, 0, 3], [4, 0, 7], 40, 24, torch.float32, pivoted, tail=1)
    assert rel_err(torch.ops.reparam.grouped_lowrank_linear(*args), want) <= 1e-5
    torch.library.opcheck(torch.ops.reparam.grouped_lowrank_linear, args)
    torch.library.opcheck(torch.ops.reparam.grouped_lowrank_linear, (*args[:-1], None))
    assert rel_err(rk.ops.grouped_lowrank_linear(*args), want) <= 1e-5


@pytest.mark.parametrize("pivoted", [False, True])
def test_x_and_bias_gradient_and_no_factor_gradient(rng, pivoted):
    args, _ = make(rng, [2, 0, 3], [3, 2, 4], 12, 5, torch.float64, pivoted, tail=1)
    fn = rk.ops.grouped_lowrank_linear
    x, b = args[0].requires_grad_(True), args[-1].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, b_: fn(x_, *args[1:-1], b_), (x, b))
    u = args[2].clone().requires_grad_(True)
    y = fn(args[0], args[1], u, *args[3:])
    with pytest.raises(NotImplementedError, match="per-expert op"):
        y.sum().backward()


def test_torch_compile_fullgraph(rng):
    args, _ = make(rng, [2, 0, 3], [4, 1, 6], 40, 24, torch.float32, True, tail=1)
    fn = rk.ops.grouped_lowrank_linear

    def net(x):
        return torch.relu(fn(x, *args[1:])) * 2

    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(args[0]), net(args[0])) <= 1e-6


def _swap(a, i, value):
    return (*a[:i], value, *a[i + 1:])


BAD = [
    (lambda a: _swap(a, 2, a[2].view(a[6], -1)), "`u` must be 1-D"),
    (lambda a: _swap(a, 3, a[3].double()), "`v` must have dtype torch.float32"),
    (lambda a: _swap(a, 4, a[4][:1].contiguous()), "`perm` must be \\[E, K\\] with E = 2"),
    (lambda a: _swap(a, 4, a[4][:, :-1].contiguous()), "`x` has 40 features in its last dimension, expected 39"),
    (lambda a: _swap(a, 5, a[5].int()), "`factor_offsets` must have dtype torch.int64"),
    (lambda a: _swap(a, 5, a[5][:1]), "`factor_offsets` must be \\[2, E \\+ 1\\]"),
    (lambda a: _swap(a, 5, a[5].flip(1).contiguous()), "must start at 0 and not decrease"),
    (lambda a: _swap(a, 5, a[5] * torch.tensor([[1], [2]])), "row 1 must step by each expert's r·K or r·\\(K − r\\)"),
    (lambda a: (*a[:6], a[6] + 1, *a[7:9], None), "`u` must hold N·Σr"),
    (lambda a: _swap(a, 7, 3), "exceeds `max_rank` = 3"),
    (lambda a: _swap(a, 7, 0), "`max_rank` must be a positive int"),
    (lambda a: _swap(a, 1, a[1][1:]), "`expert_offsets` must have experts \\+ 1 = 3 entries"),
    (lambda a: _swap(a, 9, a[9][0]), "`bias` must be 2-D"),
    (lambda a: _swap(a, 8, 3), "`row_align` must be 1, 2, 4 or 8"),
    (lambda a: _swap(a, 8, 4), "`row_align` = 4 must divide every rank"),
    (lambda a: _swap(a, 0, a[0][:, :-2]), "`x` has 38 features"),
    (lambda a: (a[0][:, :-2], *a[1:4], None, *a[5:]), "row 1 must step by each expert's r·K elements"),  # K from x
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs_name_the_argument(rng, case):
    args, _ = make(rng, [2, 3], [4, 6], 40, 24, torch.float32, True)
    bad, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        rk.ops.grouped_lowrank_linear(*bad(args))


def test_stack_factors_refuses_mismatched_factors():
    with pytest.raises(ValueError, match="one N"):
        stack_factors([torch.zeros(4, 2), torch.zeros(5, 2)], [torch.zeros(2, 8), torch.zeros(2, 8)])


@pytest.mark.parametrize("ranks,K,fast", [([16, 8, 24], 64, True), ([16, 0, 8], 32, True), ([16, 8, 3], 64, False),
                                          ([16, 8, 24], 60, False), ([0, 0, 0], 60, False)])
def test_layouts_off_the_cuda_loop_run_triton(rng, monkeypatch, ranks, K, fast):
    """Where the C++ op would take the factors only through its warp-per-output fallback (row_align < 8, or K not
    a multiple of 8: csrc/grouped_lowrank_linear.cu), the wrapper runs the Triton kernel instead
    (OpSpec.fast_layout); elsewhere, with gradients wanted or without Triton, the C++ op. The CUDA backend and
    Triton are faked, so this runs on the CPU; test_cuda_on_cpu_grouped_lowrank.py checks fast_layout against
    the C++ op."""
    args, _ = make(rng, [2, 0, 3], ranks, K, 24, torch.float16, True)
    assert_routes(monkeypatch, "grouped_lowrank_linear", args, fast)


# ---------------------------------------------------------------- GPU

# decode (one row an expert of 8), a prefill (the packed map), two odd CPU cases
GPU_CASES = [([1, 0, 0, 1, 0, 0, 0, 0], [256, 512, 384, 200, 64, 8, 1, 512], 4096, 1536, 0),
             ([300, 0, 77, 1000, 5], [96, 128, 40, 512, 8], 1024, 2816, 9), CASES[1], CASES[3]]


@pytest.mark.gpu
@pytest.mark.parametrize("pivoted", [False, True])
@pytest.mark.parametrize("dtype,case", [(torch.float16, c) for c in range(len(GPU_CASES))] + [(torch.bfloat16, 0)])
def test_gpu_matches_float64(rng, pivoted, dtype, case):
    counts, ranks, K, N, tail = GPU_CASES[case]
    args, want = make(rng, counts, ranks, K, N, dtype, pivoted, tail=tail, device="cuda")
    y = rk.ops.grouped_lowrank_linear(*args)
    assert rel_err(y, want) <= TOL[dtype]
    assert not y[sum(counts):].any()


# ranks in multiples of 8 (row_align 8: the CUDA kernel's small-M loop) at decode with an expert of rank 0 (K split
# over CTAs), then the prefill case of GPU_CASES and two odd ones (its fallback)
CUDA_CASES = [([1, 0, 0, 1, 0, 0, 0, 0], [256, 512, 384, 208, 64, 8, 0, 512], 4096, 1536, 0), GPU_CASES[1],
              ([5, 0, 9, 30], [16, 8, 24, 8], 64, 40, 1), CASES[0]]


@pytest.mark.gpu
@pytest.mark.parametrize("pivoted", [False, True, "mixed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("small_m", ["1", "0"])
def test_gpu_cuda_kernel_paths(rng, monkeypatch, pivoted, dtype, small_m):
    """The C++ op itself (the wrapper sends row_align < 8 to Triton): the small-M loop and its fallback."""
    monkeypatch.setenv("REPARAM_GROUPED_SMALL_M", small_m)  # read by the C++ op at every call
    for counts, ranks, K, N, tail in CUDA_CASES:
        args, want = make(rng, counts, ranks, K, N, dtype, pivoted, tail=tail, device="cuda")
        y = torch.ops.reparam.grouped_lowrank_linear(*args)
        assert rel_err(y, want) <= TOL[dtype], (counts, ranks, K, N)
        assert not y[sum(counts):].any()


@pytest.mark.gpu
# one row tile (the CUDA loop, and the Triton kernel at row_align 1); the packed map; decode with K split over CTAs
# (the CUDA kernel's split-K counters: replayed twice)
@pytest.mark.parametrize("counts,last,k", [([2, 0, 3, 1], 8, 256), ([2, 0, 3, 1], 1, 256), ([40, 0, 33, 1], 8, 256),
                                           ([1, 0, 1, 0], 8, 4096)])
def test_gpu_cuda_graph_replays_new_routing(rng, counts, last, k):
    args, _ = make(rng, counts, [16, 8, 24, last], k, 128, torch.float16, True, device="cuda")
    x, offsets, *rest = args
    fn = rk.ops.grouped_lowrank_linear
    fn(x, offsets, *rest)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x, offsets, *rest)
    rows = sum(counts)
    offsets.copy_(torch.tensor([0, 0, rows, rows, rows]))  # every row to expert 1 now
    for _ in range(2):
        graph.replay()
        torch.testing.assert_close(y, reference.grouped_lowrank_linear(x, offsets, *rest), rtol=2e-2, atol=2e-2)
