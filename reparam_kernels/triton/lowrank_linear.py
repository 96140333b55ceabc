"""Triton low-rank linear: two NT GEMMs, the r-wide intermediate kept in fp32.

Triton has no grid-wide barrier, so this backend is two launches; the fused
single-launch kernel is the CUDA one (csrc/lowrank_linear.cu).
"""
import torch

from ._matmul_nt import matmul_nt


def lowrank_linear(x, u, v, bias=None):
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    t = matmul_nt(x2, v.contiguous(), out_dtype=torch.float32)
    y = matmul_nt(t, u.contiguous(), bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], u.shape[0])
