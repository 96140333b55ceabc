"""Every op of ``torch.ops.reparam``: its schema, in this one place.

The schemas live in Python (not in ``csrc/``) because the package must define
the ops even when the CUDA extension was not built: the reference and Triton
backends register against these same definitions. ``csrc/torch_bindings.cpp``
only *implements* them for the CUDA dispatch key.

To add an op: add its schema here, its reference in ``reference/<op>.py``,
its wrapper + fake in ``ops.py``, and optionally ``triton/<op>.py`` and
``csrc/<op>.cu`` (listed in ``csrc/sources.txt``, bound in torch_bindings.cpp).
"""
import torch

SCHEMAS = {
    # y = x @ v.T @ u.T + bias ; u [N, r], v [r, K]
    "lowrank_linear": "lowrank_linear(Tensor x, Tensor u, Tensor v, Tensor? bias) -> Tensor",
    # y = (x[..., perm[:r]] + x[..., perm[r:]] @ w.T) @ u.T + bias ; u [N, r], w [r, K - r], perm int64 [K]
    # (W = u @ [I | w] @ P: low rank stored with r pivot columns of v as the identity, nn/pivoted.py)
    "pivoted_lowrank_linear": "pivoted_lowrank_linear(Tensor x, Tensor u, Tensor w, Tensor perm, Tensor? bias) -> Tensor",
    # y_i = irfft(Σ_j S_ij ⊙ rfft(x_j)) + bias ; w_spectrum [p, q, 2, b//2+1] fp32 (compress/structured.py)
    "block_circulant_linear": "block_circulant_linear(Tensor x, Tensor w_spectrum, int block_size, int out_features, Tensor? bias) -> Tensor",
    # the same product from the blocks' first columns: W[i b + n, j b + m] = w_cols[i, j, (n - m) mod b] ;
    # w_cols [p, q, b] fp32 (the decode path: tensor cores on the time-domain weights, csrc/block_circulant_cols_linear.cu)
    "block_circulant_cols_linear": "block_circulant_cols_linear(Tensor x, Tensor w_cols, int out_features, Tensor? bias) -> Tensor",
    # Toeplitz N×K through its circulant embedding of size fft_size; t_spectrum [1, 1, 2, fft_size//2+1]
    "toeplitz_linear": "toeplitz_linear(Tensor x, Tensor t_spectrum, int fft_size, int out_features, Tensor? bias) -> Tensor",
    # y = (x @ qweight.T) * scales + bias ; qweight int8 [N, K], scales [N] (x's dtype)
    "int8_linear": "int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor",
    # W[n,k] = (q[n,k] - zeros[n,g]) * scales[n,g], g = k // group_size ; qweight uint8 [N, K/2] (low nibble = even k)
    "int4_linear": "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor",
    # rows expert_offsets[e]:expert_offsets[e+1] of x [T, K] through int4_linear with qweight[e] [N, K/2],
    # scales[e] / zeros[e] [N, K // group_size], bias[e] [N]; other rows give 0 (one MoE layer's experts, no host sync)
    "grouped_int4_linear": "grouped_int4_linear(Tensor x, Tensor expert_offsets, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor",
    # the same for int8 experts: qweight[e] int8 [N, K], scales[e] [N] (int8_linear's layout), bias[e] [N]
    "grouped_int8_linear": "grouped_int8_linear(Tensor x, Tensor expert_offsets, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor",
    # the same for vector-quantized experts: codes[e] uint8 [N, K/d], codebooks[e] [L, C <= 256, d] (vq_linear's
    # layout), bias[e] [N]
    "grouped_vq_linear": "grouped_vq_linear(Tensor x, Tensor expert_offsets, Tensor codes, Tensor codebooks, Tensor? bias) -> Tensor",
    # the same for 4-bit lookup-table experts: codes[e] uint8 [N, K/2] (low nibble = even k), lut[e] [L, 16]
    # (lut_linear's layout), bias[e] [N]
    "grouped_lut_linear": "grouped_lut_linear(Tensor x, Tensor expert_offsets, Tensor codes, Tensor lut, Tensor? bias) -> Tensor",
    # the same for low-rank experts of ragged ranks r_e (no padding): u flat, expert e's u[e] [N, r_e] at element
    # N·factor_offsets[0, e]; v flat, expert e's v[e] [r_e, K] (pivoted, perm [E, K] given: w[e] [r_e, K - r_e]) at
    # element factor_offsets[1, e]; factor_offsets int64 [2, E + 1]; max_rank >= every r_e; row_align divides every
    # rank and factor row length (ops/grouped_lowrank_linear.py)
    "grouped_lowrank_linear": "grouped_lowrank_linear(Tensor x, Tensor expert_offsets, Tensor u, Tensor v, Tensor? perm, Tensor factor_offsets, int out_features, int max_rank, int row_align, Tensor? bias) -> Tensor",
    # W[n,k] = lut[n // (N/L), code[n,k]] ; codes uint8 [N, K/2] 4-bit (low nibble = even k), lut [L, 16] (x's dtype)
    "lut_linear": "lut_linear(Tensor x, Tensor codes, Tensor lut, Tensor? bias) -> Tensor",
    # W[n,k] = codebooks[n // (N/L), codes[n, k // d], k % d] ; codes uint8 [N, K/d], codebooks [L, E <= 256, d]
    # (x's dtype): vector quantization of d-element sub-vectors (GPTVQ's pairs), log 8-bit as d = 1
    "vq_linear": "vq_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor? bias) -> Tensor",
}

LIB = torch.library.Library("reparam", "DEF")
for _name, _schema in SCHEMAS.items():
    LIB.define(_schema)
