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


def block_m(m):
    """Rows of x per program: small for decode so masked rows waste little."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def rows_and_output(x, n, out_dtype=None):
    """x [..., K] -> (x2 [M, K] contiguous, y [M, n] empty in out_dtype, default x's)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=out_dtype or x.dtype, device=x.device)
    return x2, y
