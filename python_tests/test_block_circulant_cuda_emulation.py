"""A line-by-line NumPy emulation of csrc/block_circulant_linear.cu's algorithm
(thread loops vectorized; same buffers, stage schedule, indices, real-input
packing and DC/Nyquist handling), checked against the float64 reference.

It validates the kernel's index math on machines without a GPU; it cannot catch
a transcription slip between this file and the .cu (the gpu-marked tests in
test_structured_op.py do). Keep the two in step when either changes.
"""
import math

import numpy as np
import pytest
import torch

from reparam_kernels import reference

CAP = 4096      # kCap: complex elements per ping-pong buffer
MAX_TM = 16     # kMaxTm
MAX_PI = 8      # kMaxPi


def rows_per_cta(b):
    return max(1, min(MAX_TM, 4096 // b))


def smem_bytes(b, pi):  # two buffers, the twiddle table, the accumulators
    return (2 * CAP + b // 2 + pi * rows_per_cta(b) * (b // 2 + 1)) * 8


def choose_pi(M, p, b, sms, max_smem=227 * 1024):
    tiles = -(-M // rows_per_cta(b))
    pi = 1
    for c in range(2, min(MAX_PI, p) + 1):
        if p % c:
            continue
        if tiles * (p // c) < sms or smem_bytes(b, c) > max_smem:
            break
        pi = c
    return pi


def expipi(t):
    return np.cos(np.pi * t) + 1j * np.sin(np.pi * t)


def stockham_fft(buf_in, buf_out, H, nseq, inverse):
    sign = 1.0 if inverse else -1.0
    src_buf, dst_buf = buf_in, buf_out
    ns = 1
    while ns < H:
        R = 4 if H // ns >= 4 else 2
        nb = H // R
        t = np.arange(nseq * nb)
        s, j = t // nb, t % nb
        k = j & (ns - 1)
        base = s * H
        idx = (j // ns) * ns * R + k
        w = expipi(sign * 2.0 * k / (ns * R))
        if R == 4:
            w2 = w * w
            v0 = src_buf[base + j]
            v1 = src_buf[base + j + nb] * w
            v2 = src_buf[base + j + 2 * nb] * w2
            v3 = src_buf[base + j + 3 * nb] * (w2 * w)
            s02, d02, s13, d13 = v0 + v2, v0 - v2, v1 + v3, v1 - v3
            jd13 = 1j * d13 if inverse else -1j * d13
            for r, val in enumerate((s02 + s13, d02 + jd13, s02 - s13, d02 - jd13)):
                dst_buf[base + idx + r * ns] = val
        else:
            v0 = src_buf[base + j]
            v1 = src_buf[base + j + nb] * w
            dst_buf[base + idx] = v0 + v1
            dst_buf[base + idx + ns] = v0 - v1
        src_buf, dst_buf = dst_buf, src_buf
        ns *= R
    return src_buf


def emulate(x, w, b, N, bias, sms=132):
    """The kernel over its grid (row tiles × groups of pi output blocks), in complex128."""
    M, K = x.shape
    p, q = w.shape[:2]
    H, hb, tm = b // 2, b // 2 + 1, rows_per_cta(b)
    pi = choose_pi(M, p, b, sms)
    y = np.full((M, N), np.nan)
    for m0 in range(0, M, tm):            # blockIdx.x
        rows = min(tm, M - m0)
        nj_max = CAP // (rows * H)
        per_block = rows * hb
        for i0 in range(0, p, pi):        # blockIdx.y * pi
            n_out = min(pi, p - i0)
            buf_a = np.full(CAP, np.nan, complex)  # uninitialized shared memory
            buf_b = np.full(CAP, np.nan, complex)
            acc = np.zeros(n_out * per_block, complex)
            for j0 in range(0, q, nj_max):
                nj = min(nj_max, q - j0)
                nseq = nj * rows
                t = np.arange(nseq * H)
                s, n = t // H, t % H
                jj, mm = s // rows, s % rows
                col = (j0 + jj) * b + 2 * n
                re = np.where(col < K, x[m0 + mm, np.minimum(col, K - 1)], 0.0)
                im = np.where(col + 1 < K, x[m0 + mm, np.minimum(col + 1, K - 1)], 0.0)
                buf_a[s * H + n] = re + 1j * im
                res = stockham_fft(buf_a, buf_b, H, nseq, False)
                t = np.arange(per_block)
                mm, k = t // hb, t % hb
                wk = expipi(-k / H)
                sums = [acc[ii * per_block + t].copy() for ii in range(n_out)]
                for jj in range(nj):
                    z = (jj * rows + mm) * H
                    edge = (k == 0) | (k == H)
                    z0 = res[z]
                    xe = np.where(k == 0, z0.real + z0.imag, z0.real - z0.imag) + 0j
                    zk = res[z + np.where(edge, 0, k)]
                    c = np.conj(res[z + np.where(edge, 0, H - k)])
                    e = 0.5 * (zk + c)
                    o = -1j * (0.5 * (zk - c))
                    xk = np.where(edge, xe, e + wk * o)
                    for ii in range(n_out):
                        wij = w[i0 + ii, j0 + jj]
                        sums[ii] = sums[ii] + (wij[0, k] + 1j * wij[1, k]) * xk
                for ii in range(n_out):
                    acc[ii * per_block + t] = sums[ii]
            per_pass = max(1, CAP // (rows * H))
            for ib in range(0, n_out, per_pass):
                nbk = min(per_pass, n_out - ib)
                nseq = nbk * rows
                t = np.arange(nseq * H)
                s, k = t // H, t % H
                am = (ib * rows + s) * hb
                av = np.where(k == 0, acc[am].real + 0j, acc[am + k])
                cv = np.where(k == 0, acc[am + H].real + 0j, np.conj(acc[am + H - k]))
                e = 0.5 * (av + cv)
                o = 0.5 * (av - cv) * expipi(k / H)
                buf_a[s * H + k] = e + 1j * o
                res = stockham_fft(buf_a, buf_b, H, nseq, True)
                n = k
                ii, mm = ib + s // rows, s % rows
                z = res[s * H + n] / H
                col = (i0 + ii) * b + 2 * n
                for off, part in ((0, z.real), (1, z.imag)):
                    ok = col + off < N
                    y[m0 + mm[ok], col[ok] + off] = part[ok] + (bias[col[ok] + off] if bias is not None else 0.0)
    return y


@pytest.mark.parametrize("M,K,N,b,sms", [(1, 64, 64, 64, 132), (3, 100, 70, 64, 132), (2, 256, 300, 128, 132),
                                         (5, 1000, 600, 256, 132), (17, 600, 700, 512, 132),
                                         (2, 1500, 1024, 1024, 132), (1, 4096, 4096, 4096, 132),
                                         # few SMs: several output blocks per CTA (pi = 8, 4, 8, 8)
                                         (40, 300, 500, 64, 2), (40, 300, 1024, 64, 7), (33, 200, 1000, 128, 1),
                                         (70, 520, 1024, 128, 1)])
def test_kernel_algorithm_matches_reference(rng, M, K, N, b, sms):
    p, q = math.ceil(N / b), math.ceil(K / b)
    x = torch.randn(M, K, generator=rng, dtype=torch.float64)
    # arbitrary spectra: imaginary DC / Nyquist parts must be ignored like irfft does
    w = torch.randn(p, q, 2, b // 2 + 1, generator=rng, dtype=torch.float64)
    bias = torch.randn(N, generator=rng, dtype=torch.float64)
    y = emulate(x.numpy(), w.numpy(), b, N, bias.numpy(), sms)
    ref = reference.block_circulant_linear(x, w, b, N, bias).numpy()
    assert not np.isnan(y).any()  # every output written, no uninitialized buffer read
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-13


def test_pi_choice():
    assert choose_pi(1, 16, 256, 132) == 1            # decode: one CTA per output block
    assert choose_pi(2048, 16, 256, 132) == 8         # 128 row tiles x 2 groups >= 132 CTAs
    assert choose_pi(1024, 16, 256, 132) == 4         # 64 row tiles x 4 groups
    assert choose_pi(2048, 7, 256, 1) == 7            # a prime p: all of it, or 1
    assert choose_pi(40, 16, 64, 7) == 4
