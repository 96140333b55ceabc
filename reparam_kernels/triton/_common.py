import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1) computes tl.dot on bfloat16
# operands wrongly (checked with Triton 3.8: relative error ~1e9), so kernels
# upcast dot operands to fp32 there. On a GPU the native bf16 dot runs.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot_nt(acc, a, b, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b.T with fp32 accumulation. a and b share a dtype, except under
    DOT_F32 (the interpreter), where both are converted straight to fp32."""
    if DOT_F32:
        return acc + tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    elif IEEE:
        return acc + tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        return acc + tl.dot(a, tl.trans(b))


@triton.jit
def acc_init(BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GEMV: tl.constexpr):
    """The fp32 accumulator: [BN, BK] elementwise products for a GEMV (reduced once, by acc_result), else
    the [BM, BN] output tile."""
    if GEMV:
        return tl.zeros((BN, BK), dtype=tl.float32)
    else:
        return tl.zeros((BM, BN), dtype=tl.float32)


@triton.jit
def acc_step(acc, a, b, IEEE: tl.constexpr, DOT_F32: tl.constexpr, GEMV: tl.constexpr):
    """acc + a @ bᵀ for a [BM, BK] and b [BN, BK] tile (GEMV: a is x's one row, the products kept apart)."""
    if GEMV:
        return acc + b.to(tl.float32) * a.to(tl.float32)
    else:
        return dot_nt(acc, a, b, IEEE, DOT_F32)


@triton.jit
def acc_result(acc, GEMV: tl.constexpr):
    """The [BM, BN] output tile of an accumulator."""
    if GEMV:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return acc


@triton.jit
def tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """(row tile, column tile) of this program from a 1-D grid axis 0, in column bands of 8 row
    tiles: the programs running together share their weight (column) tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    band = 8 * tiles_n
    first_m = (pid // band) * 8
    rows = tl.minimum(tiles_m - first_m, 8)
    return first_m + (pid % band) % rows, (pid % band) // rows


@triton.jit
def split_k_tile(M, N, K, k_split, BM: tl.constexpr, BN: tl.constexpr):
    """This program's rows and columns (tile_ids), their masks, and its K range [k_lo, k_hi)
    (grid axis 1 = the split of K)."""
    pid_m, pid_n = tile_ids(M, N, BM, BN)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row × K or × N passes 2³¹ (long prefill × vocabulary)
    rn = pid_n * BN + tl.arange(0, BN)
    k_lo = tl.program_id(1) * k_split
    return rm, rn, rm[:, None] < M, rn < N, k_lo, tl.minimum(k_lo + k_split, K)


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, rm, rn, xmask, nmask, stride_ym, stride_ys, HAS_BIAS: tl.constexpr):
    """acc (+ bias) into y, or into this split's fp32 partial (y = the partials, stride_ys apart)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + tl.program_id(1) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=xmask & nmask[None, :])


@triton.jit
def code_f32(bits):
    """The low 4 bits of an int32 as fp32, through the exponent trick: OR-ing a code into the
    mantissa of 2²³ gives 2²³ + code exactly, one subtraction leaves the code (an integer → float
    conversion is a quarter-rate instruction; these are two full-rate ones)."""
    return ((bits & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def one_plus_code16(words, SHIFT: tl.constexpr, one_bits):
    """1 + c/16 as fp32 for the 4-bit code c at bit SHIFT of each int32: c moved to the top four
    bits of the mantissa of 1.0 (exact; a shift and one LOP3, no float arithmetic). one_bits is
    0x3F800000 (1.0's bits) passed in a register: a LOP3 takes one immediate, and with both the mask
    and 1.0 as immediates ptxas spent two."""
    if SHIFT <= 19:
        top = (words << (19 - SHIFT)) & 0x780000
    else:
        top = (words >> (SHIFT - 19)) & 0x780000
    return (top | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def nibbles_f32(p):
    """uint8 codes → (low nibble, high nibble) as fp32."""
    p = p.to(tl.int32)
    return code_f32(p), code_f32(p >> 4)


def rows_and_output(x, n, out_dtype=None):
    """x [..., K] -> (x2 [M, K] contiguous, y [M, n] empty in out_dtype, default x's)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=out_dtype or x.dtype, device=x.device)
    return x2, y
