"""A NumPy emulation of csrc/quant_gemm.cuh and the decoders in csrc/{int8,int4,lut}_linear.cu:
the same byte tricks (__byte_perm into 2^23 + b), 16-byte row loads with zero fill, the
GEMV's lane-major x staging, chunk/lane/row assignment and split-K partials, and the
tensor-core path's tile / A-chunk / split decomposition — checked against float64.

It validates index math and bit manipulation on machines without a GPU; it cannot catch a
transcription slip between this file and the .cu (the gpu-marked tests in
test_quant_ops.py do). Keep the two in step when either changes.
"""
import numpy as np
import pytest
import torch

from reparam_kernels.compress.quantize import pack_int4

KTILE, GEMV_WARPS, GEMV_ROWS = 1024, 8, 4
SMS = 132


def byte_perm(x, y, s):
    """CUDA __byte_perm: result byte i = byte ((s >> 4i) & 7) of the 8 bytes {y:x}."""
    src = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(s >> (4 * i)) & 7] << (8 * i) for i in range(4))


def byte_to_float(word, j):
    bits = byte_perm(word, 0x4B000000, 0x7440 + j)
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0]) - 8388608.0


def load_row_bytes(row, off, length):
    out = np.zeros(16, dtype=np.uint8)
    n = max(0, min(16, length - off))
    out[:n] = row[off:off + n]
    return out


def words(raw16):
    return [int(v) for v in raw16.view(np.uint32)]  # little-endian, raw.x = bytes 0..3


class Int8Dec:
    KC = 16

    def __init__(self, q, s):
        self.q, self.s, self.K = q.view(np.uint8), s, q.shape[1]

    def load(self, n, k0):
        return load_row_bytes(self.q[n], k0, self.K)

    def params(self, n, k0):
        return self.s[n]

    def decode8(self, raw, s, j):
        wd = words(raw)
        ws = [wd[2 * j] ^ 0x80808080, wd[2 * j + 1] ^ 0x80808080]
        return np.array([(byte_to_float(ws[i // 4], i % 4) - 128.0) * s for i in range(8)])


class Int4Dec:
    KC = 32

    def __init__(self, qp, s, z, group):
        self.q, self.s, self.z, self.group, self.K = qp, s, z, group, 2 * qp.shape[1]

    def load(self, n, k0):
        return load_row_bytes(self.q[n], k0 // 2, self.K // 2)

    def params(self, n, k0):
        g = k0 // self.group
        s = self.s[n, g]
        return s, -self.z[n, g] * s

    def decode8(self, raw, prm, j):
        s, zs = prm
        word = words(raw)[j]
        lo, hi = word & 0x0F0F0F0F, (word >> 4) & 0x0F0F0F0F
        w = np.zeros(8)
        for b in range(4):
            w[2 * b] = byte_to_float(lo, b) * s + zs
            w[2 * b + 1] = byte_to_float(hi, b) * s + zs
        return w


class LutDec:
    KC = 32

    def __init__(self, codes, lut):
        self.c, self.lut, self.K = codes, lut, 2 * codes.shape[1]
        self.rpt = codes.shape[0] // lut.shape[0]

    def load(self, n, k0):
        return load_row_bytes(self.c[n], k0 // 2, self.K // 2)

    def params(self, n, k0):
        return self.lut[n // self.rpt]

    def decode8(self, raw, tab, j):
        word = words(raw)[j]
        w = np.zeros(8)
        for b in range(4):
            byte = (word >> (8 * b)) & 0xFF
            w[2 * b], w[2 * b + 1] = tab[byte & 15], tab[byte >> 4]
        return w


def decode_chunk(dec, raw, n, k0):
    """The tensor-core loader's full-chunk decode: params once, then KC / 8 sub-vectors."""
    prm = dec.params(n, k0)
    return np.concatenate([dec.decode8(raw, prm, j) for j in range(dec.KC // 8)])


def emulate_gemv(dec, x, bias, MM):
    M, K = x.shape
    N = dec.q.shape[0] if hasattr(dec, "q") else dec.c.shape[0]
    KC, NCH, SUB = dec.KC, KTILE // dec.KC, dec.KC // 8
    splits = -(-K // KTILE)
    gx = -(-N // (GEMV_WARPS * GEMV_ROWS))
    part = np.full((splits, M, N), np.nan)
    y = np.full((M, N), np.nan)
    for by in range(splits):
        kb = by * KTILE
        kl = min(KTILE, K - kb)
        xs = np.full(MM * KTILE, np.nan)
        for i in range(MM * KTILE):  # staging loop, all threads together
            m, k = divmod(i, KTILE)
            c, j, e = k // KC, (k % KC) // 8, k % 8
            xs[((m * SUB + j) * NCH + c) * 8 + e] = x[m, kb + k] if (m < M and k < kl) else 0.0
        for bx in range(gx):
            for warp in range(GEMV_WARPS):
                n0 = (bx * GEMV_WARPS + warp) * GEMV_ROWS
                acc = np.zeros((32, MM, GEMV_ROWS))
                rows = min(GEMV_ROWS, N - n0)
                for lane in range(32):
                    c = lane
                    while c * KC < kl:
                        k0 = kb + c * KC
                        raw = [dec.load(n0 + r, k0) if r < rows else np.zeros(16, np.uint8) for r in range(GEMV_ROWS)]
                        prm = [dec.params(n0 + r, k0) if r < rows else None for r in range(GEMV_ROWS)]
                        for j in range(SUB):
                            xf = np.stack([xs[((m * SUB + j) * NCH + c) * 8:][:8] for m in range(MM)])
                            for r in range(GEMV_ROWS):
                                if r >= rows:
                                    break
                                w = dec.decode8(raw[r], prm[r], j)
                                acc[lane, :, r] += xf @ w
                        c += 32
                tot = acc.sum(0)  # the warp shuffle reduction
                for m in range(min(MM, M)):
                    for r in range(GEMV_ROWS):
                        n = n0 + r
                        if n < N:
                            if splits == 1:
                                y[m, n] = tot[m, r] + (bias[n] if bias is not None else 0.0)
                            else:
                                part[by, m, n] = tot[m, r]
    if splits > 1:
        y = part.sum(0) + (bias if bias is not None else 0.0)
    return y


def emulate_mma(dec, x, bias, BP, BQ, BL, threads):
    M, K = x.shape
    N = dec.q.shape[0] if hasattr(dec, "q") else dec.c.shape[0]
    KC = dec.KC
    CPR, TOTAL = BL // KC, BP * (BL // KC)
    CPT = -(-TOTAL // threads)
    tp, tq, kblocks = -(-N // BP), -(-M // BQ), -(-K // BL)
    splits = 1
    if tp * tq < 2 * SMS:
        splits = max(1, min(-(-2 * SMS // (tp * tq)), kblocks // 4))
    kchunk = -(-kblocks // splits) * BL
    splits = -(-K // kchunk)
    part = np.full((splits, M, N), np.nan)
    y = np.full((M, N), np.nan)
    for bx in range(tp):
        for byq in range(tq):
            for bz in range(splits):
                p0, q0, lb = bx * BP, byq * BQ, bz * kchunk
                le = min(K, lb + kchunk)
                acc = np.zeros((BP, BQ))
                nblk = -(-(le - lb) // BL) if lb < le else 0
                for b in range(nblk):
                    l0 = lb + b * BL
                    A = np.full((BP, BL), np.nan)
                    for tid in range(threads):  # ALoader.fetch + store
                        for i in range(CPT):
                            c = tid + i * threads
                            if c >= TOTAL:
                                break
                            row, col = c // CPR, (c % CPR) * KC
                            n, k0 = p0 + row, l0 + col
                            if n < N and k0 < K:
                                A[row, col:col + KC] = decode_chunk(dec, dec.load(n, k0), n, k0)
                            else:
                                A[row, col:col + KC] = 0.0
                    B = np.zeros((BQ, BL))  # load_tile: zero outside rows < M, l < le
                    for r in range(BQ):
                        for l in range(BL):
                            if q0 + r < M and l0 + l < le:
                                B[r, l] = x[q0 + r, l0 + l]
                    acc += A @ B.T
                for pl in range(BP):  # emit_unit
                    for ql in range(BQ):
                        p, q = p0 + pl, q0 + ql
                        if p < N and q < M:
                            if splits == 1:
                                y[q, p] = acc[pl, ql] + (bias[p] if bias is not None else 0.0)
                            else:
                                part[bz, q, p] = acc[pl, ql]
    if splits > 1:
        y = part.sum(0) + (bias if bias is not None else 0.0)
    return y


def make(op, rng, N, K, group=32, tables=1):
    if op == "int8":
        q = torch.randint(-128, 128, (N, K), generator=rng, dtype=torch.int8)
        s = torch.rand(N, generator=rng).double() + 0.5
        w = q.double() * s[:, None]
        return Int8Dec(q.numpy(), s.numpy()), w
    q = torch.randint(0, 16, (N, K), generator=rng, dtype=torch.uint8)
    packed = pack_int4(q).numpy()
    if op == "int4":
        g = K // group
        s = torch.rand(N, g, generator=rng).double() + 0.5
        z = torch.randint(0, 16, (N, g), generator=rng).double() + 0.5 * (torch.rand(N, g, generator=rng) > 0.5)
        w = (q.double().reshape(N, g, group) - z[..., None]) * s[..., None]
        return Int4Dec(packed, s.numpy(), z.numpy(), group), w.reshape(N, K)
    lut = torch.randn(tables, 16, generator=rng).double()
    w = lut.repeat_interleave(N // tables, 0).gather(1, q.long())
    return LutDec(packed, lut.numpy()), w


CASES = [("int8", 37, 200, {}), ("int8", 9, 1040, {}), ("int4", 35, 64, {"group": 32}),
         ("int4", 33, 1088, {"group": 64}), ("lut", 36, 70, {"tables": 4}), ("lut", 5, 1100, {"tables": 5})]


@pytest.mark.parametrize("op,N,K,kw", CASES)
@pytest.mark.parametrize("M,MM", [(1, 1), (3, 4)])
def test_gemv_emulation_matches_float64(rng, op, N, K, kw, M, MM):
    dec, w = make(op, rng, N, K, **kw)
    x = torch.randn(M, K, generator=rng).double()
    bias = torch.randn(N, generator=rng).double()
    y = emulate_gemv(dec, x.numpy(), bias.numpy(), MM)
    ref = (x @ w.t() + bias).numpy()
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 1e-9 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("op,N,K,kw", CASES[::2] + [CASES[3]])
@pytest.mark.parametrize("cfg", [(64, 16, 64, 128), (128, 128, 32, 256)])
def test_mma_emulation_matches_float64(rng, op, N, K, kw, cfg):
    dec, w = make(op, rng, N, K, **kw)
    M = 19
    x = torch.randn(M, K, generator=rng).double()
    y = emulate_mma(dec, x.numpy(), None, *cfg)
    ref = (x @ w.t()).numpy()
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 1e-9 * max(1.0, np.abs(ref).max())


def emulate_dequantize(dec, N, K):
    """quant_dequant_mm.cuh's dequantize_kernel: chunk c -> (n, k0), KC/8 sub-vectors, the row's tail cut."""
    w = np.full((N, K), np.nan)
    chunks = -(-K // dec.KC)
    for c in range(N * chunks):
        n, k0 = c // chunks, (c % chunks) * dec.KC
        raw, prm = dec.load(n, k0), dec.params(n, k0)
        for j in range(dec.KC // 8):
            k = k0 + 8 * j
            if k >= K:
                break
            v = dec.decode8(raw, prm, j)
            w[n, k: k + 8] = v[: min(8, K - k)]
    return w


@pytest.mark.parametrize("op,N,K,kw", CASES + [("int8", 5, 37, {}), ("lut", 3, 38, {"tables": 1})])
def test_dequantize_emulation_matches_float64(rng, op, N, K, kw):
    dec, w = make(op, rng, N, K, **kw)
    assert np.abs(emulate_dequantize(dec, N, K) - w.numpy()).max() <= 1e-12 * max(1.0, w.abs().max().item())


def test_byte_tricks():
    assert byte_perm(0x44332211, 0x88776655, 0x3210) == 0x44332211
    assert all(byte_to_float(0xF0 << 8 * j | 0x01, j) == ((0xF0 << 8 * j | 0x01) >> 8 * j & 0xFF) for j in range(4))
    w = 0x807F01FF  # int8 bytes (little-endian): -1, 1, 127, -128
    got = [byte_to_float(w ^ 0x80808080, j) - 128 for j in range(4)]
    assert got == [-1, 1, 127, -128]
