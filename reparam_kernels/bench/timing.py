"""Timing of GPU callables, the way DESIGN.md asks: medians, kernel-only and eager.

* ``time_graph``: kernel-only time, the callable captured into a CUDA graph and
  replayed (``triton.testing.do_bench_cudagraph``): no launch gaps, no host cost.
* ``time_eager``: the time a user sees in eager PyTorch (``triton.testing.do_bench``,
  which flushes the L2 between calls), launch overheads included.
* ``time_host``: the CPU's cost of enqueuing one call (eager rows carry it as ``host_us``): do_bench's
  flush keeps the GPU busy while the CPU enqueues the next call, so an eager time is the kernel's
  unless the host cost exceeds the flush plus the kernel — ``host_us`` says which one a row measured.

The H200's L2 holds 60 MB. ``do_bench_cudagraph`` does not flush it, so a weight
that fits would be timed from the cache; ``rotation_count`` + ``cycling`` give
each call a different copy of the operands, enough copies to exceed the L2
several times over. Graph capture records every call of the Python callable,
so the rotation is baked into the captured graph.
"""
import itertools
import math

import torch

L2_BYTES = 60 * 1024 * 1024  # H200 (and H100) L2
ROTATE_FACTOR = 3  # operands in flight per timing >= 3x the L2
MAX_ROTATION_BYTES = 8 * 1024 ** 3  # never allocate more than this for copies

# DESIGN.md: the LLM (N, K) shapes and batch sizes M.
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
BATCHES = [1, 4, 16, 64, 256, 2048]
# --quick: the two shapes the targets name, decode and prefill batches.
QUICK_SHAPES = [(8192, 8192), (28672, 8192)]
QUICK_BATCHES = [1, 16, 64, 256, 2048]  # 256: the wgmma range, where issue 3 sets targets
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def shapes_and_batches(quick):
    return (QUICK_SHAPES, QUICK_BATCHES) if quick else (SHAPES, BATCHES)


def rotation_count(bytes_per_set, l2_bytes=L2_BYTES, factor=ROTATE_FACTOR, max_bytes=MAX_ROTATION_BYTES):
    """How many copies of a set of operands (of `bytes_per_set`) to cycle through so the
    copies together exceed `factor` x the L2; 1 when one set already does."""
    if bytes_per_set <= 0:
        raise ValueError(f"`bytes_per_set` must be positive, got {bytes_per_set}")
    want = math.ceil(factor * l2_bytes / bytes_per_set)
    cap = max(1, max_bytes // bytes_per_set)
    return max(1, min(want, cap))


def cycling(fn, arg_sets):
    """A no-argument callable that calls fn(*args) with the next set of `arg_sets` each time."""
    if not arg_sets:
        raise ValueError("`arg_sets` must not be empty")
    it = itertools.cycle(arg_sets)
    return lambda: fn(*next(it))


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def time_graph(fn, rep_ms=20):
    """Kernel-only median time of fn() in microseconds (CUDA-graph replay)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def time_eager(fn, warmup_ms=10, rep_ms=40):
    """Eager median time of fn() in microseconds (L2 flushed between calls)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def time_host(fn, calls=50):
    """Host time per call of fn() in microseconds: `calls` calls issued back to back after a sync, none between
    (few enough that the launch queue never fills). What the CPU spends enqueuing one call: an eager time near
    it rather than near the kernel-only time says the eager row was host-bound."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def time_mode(mode, fn):
    if mode == "graph":
        return time_graph(fn)
    if mode == "eager":
        return time_eager(fn)
    raise ValueError(f"`mode` must be 'graph' or 'eager', got {mode!r}")


def measure_copy_tbps(nbytes_each=2 * 1024 ** 3, device="cuda"):
    """Device-to-device copy bandwidth in TB/s (bytes read + written), timed eagerly as DESIGN.md's baseline
    (2 GiB each way, do_bench: one call lasts ~1 ms, so launch costs vanish). Not in a CUDA graph: captured,
    the copy ran at 2.71 TB/s on the H200 (run of 2026-12-04) against the baseline's 4.27 eager, below cuBLAS's
    own GEMV in the same run (4.45 TB/s, 28672 x 8192, M = 1), so it was no ceiling (likely the graph's memcpy
    node taking a slower route than the eager copy)."""
    n = nbytes_each // 2
    src = torch.randn(n, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    us = time_eager(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes_each / (us * 1e-6) / 1e12


def measure_gemm_tflops(n=8192, dtype=torch.bfloat16):
    """Dense GEMM throughput in TFLOP/s for an n^3 product, kernel-only."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    us = time_graph(lambda: a @ b)
    del a, b
    return 2 * n ** 3 / (us * 1e-6) / 1e12


def measure_ceilings():
    return {"copy_tbps": measure_copy_tbps(), "bf16_gemm_tflops": measure_gemm_tflops()}
