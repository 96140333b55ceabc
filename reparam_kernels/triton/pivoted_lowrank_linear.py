"""Triton pivoted low-rank linear: one gather of x's columns, then the two NT GEMMs of the
low-rank op; the pivot columns of x are added to the fp32 intermediate between them.

No CUDA kernel yet: on a GPU this is the op's fastest backend (two GEMM launches plus the gather).
"""
import torch

from ._matmul_nt import matmul_nt


def pivoted_lowrank_linear(x, u, w, perm, bias=None):
    k, r = x.shape[-1], u.shape[1]
    xp = x.reshape(-1, k).index_select(1, perm)
    t = xp[:, :r].float()
    if k > r:
        t = t + matmul_nt(xp[:, r:].contiguous(), w.contiguous(), out_dtype=torch.float32)
    y = matmul_nt(t.contiguous(), u.contiguous(), bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], u.shape[0])
