"""Tile sizes, warps, pipeline stages and the split of K for the quantized Triton GEMMs.

Chosen by shape, not by autotuning: an autotuner would time configs at the first call, which
may be inside a CUDA-graph capture or torch.compile, and its choice would differ run to run.
The rules (measured against the compiler: docs/quant.md, the Triton paragraph):

- M = 1 (decode of one sequence): GEMV form. Each program keeps an fp32 accumulator of weight × x
  products ([BN, BK] or, for packed codes, a fraction of it) and reduces it once at the end, so the
  K loop has no tensor-core operand conversion and no shuffles: a load, the decode and one FMA
  per weight.
- M ≤ 64: tl.dot on [16/32/64, 64] tiles, BK = 128 (64 bytes of int4 codes per row and step).
- M > 64: 128 × 128 tiles, 8 warps, BK = 64, programs ordered in column bands of 8 row tiles
  so the weight tiles a band reads stay in L2.
- Split-K whenever the output tiles alone give fewer than two programs per SM (M ≤ 64; above,
  fewer than one): the decode shapes (M ≤ 16, N = 4096..8192) have 64–128 column tiles for 132
  SMs. Each split writes an fp32 partial [split, M, N]; one more launch (finish) adds them and
  the bias, and casts. K per split is a whole number of BK steps, at least four, so the
  pipeline has something to overlap.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Tiles(NamedTuple):
    bm: int
    bn: int
    bk: int
    split: int      # programs along K; 1 = no partial sums
    k_split: int    # K elements per split, a multiple of bk
    warps: int
    stages: int
    gemv: bool      # M = 1: elementwise products instead of tl.dot


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """SMs of x's GPU. Under the CPU interpreter a small stand-in (4), so that the tests'
    small shapes still take split-K."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose(m, n, k, device, bk_limit=128, split=None, fp32=False, gemv_bk=128, sms=None):
    """Tiles for an [m, k] × [n, k]ᵀ product. bk_limit: the largest K step the format allows
    (int4: a power of two dividing the group size, so a step reads one scale per row).
    split: force a split count (tests); None chooses. fp32: x is float32 (twice the shared memory
    a stage: two stages, so the tiles fit the 99 KB of sm_86 / sm_89). gemv_bk: the GEMV's K step
    (int8 and lut take 64: their [BN, BK]-shaped accumulators then hold 71 / 80 registers instead of
    168, so more programs fit an SM; the same instructions per byte, tools/triton_aot.py).
    sms: the SM count to split for (default: the device's)."""
    if m == 1:
        bm, bn, bk, warps, stages, gemv = 1, 64, gemv_bk, 4, 4, True
    elif m <= 64:
        bm, bn, bk, warps, stages, gemv = (16 if m <= 16 else 32 if m <= 32 else 64), 64, 128, 4, 4, False
    else:
        bm, bn, bk, warps, stages, gemv = 128, 128, 64, 8, 3, False
    bk = min(bk, bk_limit)
    if fp32 and not gemv:
        stages = 2
    steps = triton.cdiv(k, bk)
    if split is None:
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        sms = sms or sm_count(device)
        # big tiles: partials cost split × M × N × 4 bytes of traffic (M = 256, N = 8192: 8 MB a split against
        # 33 MB of int4 weights), so split only as far as one wave of programs
        want = triton.cdiv(2 * sms, tiles) if m <= 64 else max(1, sms // tiles)
        split = max(1, min(want, steps // 4, 16))
    split = max(1, min(split, steps))
    k_split = max(triton.cdiv(steps, split), 1) * bk
    split = max(triton.cdiv(k, k_split), 1)  # no empty split (K = 0: one program column, no K loop)
    return Tiles(bm, bn, bk, split, k_split, warps, stages, gemv)


def grid(t, m, n):
    """Axis 0: the output tiles (tile_ids orders them); axis 1: the splits of K."""
    return (triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn), t.split)


def output(t, y):
    """Where the kernel writes: y itself, or fp32 partials [split, M, N] to be summed by finish."""
    return y if t.split == 1 else y.new_empty((t.split, *y.shape), dtype=torch.float32)


def kernel_bias(t, bias, y):
    """(bias pointer, HAS_BIAS) for the GEMM kernel: it adds the bias only without a split — with one,
    finish adds it once to the summed partials. y stands in for the pointer when there is no bias."""
    return (bias if bias is not None else y), (bias is not None and t.split == 1)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, y_ptr, SPLIT, MN, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * MN + i, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)


def finish(t, out, y, bias):
    """y: the kernel's output as it is, or its fp32 partials summed, the bias added (kernel_bias) and
    cast into y — one launch, which in a CUDA graph costs ~2 µs against a decode kernel's ~20."""
    if t.split == 1:
        return out
    mn = y.numel()
    _sum_splits_kernel[(triton.cdiv(mn, 1024),)](out, bias if bias is not None else y, y, t.split, mn, y.shape[-1],
                                                 HAS_BIAS=bias is not None, BLOCK=1024)
    return y
