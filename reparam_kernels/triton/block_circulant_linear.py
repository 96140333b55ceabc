"""Triton block-circulant linear: torch.fft for the transforms, a Triton kernel
for the frequency-domain block sum Z[m, i, f] = Σ_j S[i, j, f] · X[m, j, f].

That sum is where the torch.fft path loses its time (einsum materializes a
complex [M, p, q, h] product or runs a batched complex GEMM per frequency);
here each program owns a (rows × frequencies) tile of one output block, keeps
the complex accumulator in fp32 registers, and streams the q spectra once per
row tile. The single-launch kernel with the FFTs fused in is the CUDA one
(csrc/block_circulant_linear.cu).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _spectrum_products_kernel(x_ptr, w_ptr, z_ptr, M, P, Q, H,
                              BM: tl.constexpr, BF: tl.constexpr):
    # x: [M, Q, H, 2] fp32 (interleaved complex), w: [P, Q, 2, H] fp32 planes, z: [M, P, H, 2]
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    pid_f = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rf = pid_f * BF + tl.arange(0, BF)
    mask_m = rm < M
    mask_f = rf < H
    mask = mask_m[:, None] & mask_f[None, :]
    acc_r = tl.zeros((BM, BF), dtype=tl.float32)
    acc_i = tl.zeros((BM, BF), dtype=tl.float32)
    for j in range(0, Q):
        w_base = w_ptr + (i * Q + j) * 2 * H
        sr = tl.load(w_base + rf, mask=mask_f, other=0.0)[None, :]
        si = tl.load(w_base + H + rf, mask=mask_f, other=0.0)[None, :]
        x_off = ((rm[:, None] * Q + j) * H + rf[None, :]) * 2
        xr = tl.load(x_ptr + x_off, mask=mask, other=0.0)
        xi = tl.load(x_ptr + x_off + 1, mask=mask, other=0.0)
        acc_r += xr * sr - xi * si
        acc_i += xr * si + xi * sr
    z_off = ((rm[:, None] * P + i) * H + rf[None, :]) * 2
    tl.store(z_ptr + z_off, acc_r, mask=mask)
    tl.store(z_ptr + z_off + 1, acc_i, mask=mask)


def spectrum_products(xf, w_spectrum):
    """xf: complex64 [M, q, h]; w_spectrum: fp32 [p, q, 2, h] -> complex64 [M, p, h]."""
    m, q, h = xf.shape
    p = w_spectrum.shape[0]
    x_ri = torch.view_as_real(xf.contiguous())
    z = torch.empty((m, p, h, 2), dtype=torch.float32, device=xf.device)
    bm = 16 if m <= 16 else 32
    bf = 64
    grid = (triton.cdiv(m, bm), p, triton.cdiv(h, bf))
    _spectrum_products_kernel[grid](x_ri, w_spectrum.contiguous(), z, m, p, q, h, BM=bm, BF=bf)
    return torch.view_as_complex(z)


def block_circulant_linear(x, w_spectrum, block_size, out_features, bias=None):
    b = block_size
    p, q = w_spectrum.shape[0], w_spectrum.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if x2.shape[1] < q * b:
        x2 = torch.nn.functional.pad(x2, (0, q * b - x2.shape[1]))
    xf = torch.fft.rfft(x2.reshape(-1, q, b), dim=-1)
    z = spectrum_products(xf, w_spectrum.to(torch.float32))
    y = torch.fft.irfft(z, n=b, dim=-1).reshape(-1, p * b)[:, :out_features]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).contiguous().reshape(*lead, out_features)


toeplitz_linear = block_circulant_linear  # one L×L block (see ops/toeplitz_linear.py)
