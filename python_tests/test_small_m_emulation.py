"""A NumPy emulation of csrc/small_m_gemm.cuh (the small-M tensor-core path of int4_linear,
int8_linear and, two phases in one launch, lowrank_linear: csrc/lowrank_small_m.cuh) with the
formats of csrc/int4_linear.cu (Int4Frag), csrc/int8_linear.cu (Int8Frag) and HalfFrag (plain
fp16/bf16 weights), lane by lane: the grid and split-K choice, each lane's 16-byte weight and x loads,
the bit tricks read back from their bit patterns (int4: 0x6400 | q = fp16 1024 + q, 0x4300 | q =
bf16 128 + q; int8: byte permutes into 0x64 | byte for fp16, 2^23 + byte for bf16), the
__byte_perm assembly of the A operand, mma.sync.m16n8k16 through the PTX fragment layouts of A,
B and C, the K-warp reduction and the last-CTA fixup of split partials — against float64.

It validates the slot -> k maps, the index math and the bit tricks without a GPU; it cannot catch
a transcription slip between this file and the .cu (the gpu-marked tests in
test_quant_small_m_gpu.py and test_lowrank_op.py do). Keep them in step. Arithmetic here is float64 (int4's scale and
-zero*scale are not rounded to x's dtype), so the tolerance is tight: any index error is O(1).
"""
import numpy as np
import pytest
import torch

from reparam_kernels.compress.quantize import pack_int4

WARPS_N, WARPS_K = 4, 2
G_OF_LANE, T_OF_LANE = np.arange(32) // 4, np.arange(32) % 4


def byte_perm(x, y, s):
    """CUDA __byte_perm on uint32 arrays: result byte i = byte ((s >> 4i) & 7) of {y:x}."""
    x, y = np.asarray(x, dtype=np.uint32), np.asarray(y, dtype=np.uint32)
    src = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(s >> (4 * i)) & 7] << np.uint32(8 * i) for i in range(4)).astype(np.uint32)


def halves(reg, dtype):
    """The (low, high) 16-bit halves of uint32 registers as float64 values of `dtype`."""
    reg = np.asarray(reg, dtype=np.uint32)
    lo, hi = (reg & 0xFFFF).astype(np.uint16), (reg >> 16).astype(np.uint16)
    if dtype == "float16":
        return lo.view(np.float16).astype(np.float64), hi.view(np.float16).astype(np.float64)
    as_f32 = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    return as_f32(lo), as_f32(hi)


def f32_bits(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32).astype(np.float64)


def word(v, i):
    return v[..., i]


class Int4Frag:
    lane_k = 32
    MAGIC = {"float16": (0x64006400, 1024.0), "bfloat16": (0x43004300, 128.0)}

    def __init__(self, qp, s, z, group, dtype):
        self.qp, self.s, self.z, self.group, self.dtype = qp, s, z, group, dtype

    def load(self, n, kt):
        gi = kt >> (self.group.bit_length() - 1)  # group_shift: the path takes power-of-two groups only
        return self.qp[n, kt // 2: kt // 2 + 16].view(np.uint32), (self.s[n, gi], -self.z[n, gi] * self.s[n, gi])

    def zero(self):
        return np.zeros(4, dtype=np.uint32), (0.0, 0.0)

    def pair(self, w, shift, prm):
        bits, magic = self.MAGIC[self.dtype]
        lo, hi = halves(((w >> shift) & 0x000F000F) | bits, self.dtype)
        s, nzs = prm
        return (lo - magic) * s + nzs, (hi - magic) * s + nzs

    def b(self, q, prm, i, h):
        w = word(q, i)
        return self.pair(w, 8 * h, prm), self.pair(w, 8 * h + 4, prm)

    @staticmethod
    def a(r0, r1, h):
        regs = [byte_perm(word(r0, h), word(r0, h + 2), 0x5410), byte_perm(word(r1, h), word(r1, h + 2), 0x5410),
                byte_perm(word(r0, h), word(r0, h + 2), 0x7632), byte_perm(word(r1, h), word(r1, h + 2), 0x7632)]
        return regs

    def out_scale(self, n):
        return 1.0


class Int8Frag:
    lane_k = 16

    def __init__(self, q, s, dtype):
        self.q, self.s, self.dtype = q.view(np.uint8), s, dtype

    def load(self, n, kt):
        return self.q[n, kt: kt + 16].view(np.uint32), None

    def zero(self):
        return np.zeros(4, dtype=np.uint32), None

    def b(self, q, prm, i, h):
        u = word(q, 2 * i + h) ^ np.uint32(0x80808080)
        if self.dtype == "float16":
            out = []
            for sel in (0x4140, 0x4342):
                lo, hi = halves(byte_perm(u, 0x64646464, sel), "float16")
                lo2, hi2 = halves(np.uint32(0x64806480), "float16")  # the subtracted pair: 1152
                out.append((lo - lo2, hi - hi2))
            return tuple(out)
        code = [f32_bits(byte_perm(u, 0x4B000000, 0x7440 + j)) - 8388736.0 for j in range(4)]
        return (code[0], code[1]), (code[2], code[3])  # exact integers: the bf16 conversion is exact

    @staticmethod
    def a(r0, r1, h):
        return [word(r0, 2 * h), word(r1, 2 * h), word(r0, 2 * h + 1), word(r1, 2 * h + 1)]

    def out_scale(self, n):
        return self.s[n]


class LutFrag:
    """lut_linear: codes as int4 nibbles, each row's 16-entry table (x's dtype) in 8 registers."""
    lane_k = 32

    def __init__(self, qp, lut_bits, rows_per_table, dtype):
        self.qp, self.lut, self.rpt, self.dtype = qp, lut_bits.astype(np.uint32), rows_per_table, dtype

    def row_state(self, n):
        e = self.lut[n // self.rpt]                      # 16 entries (bit patterns)
        t = [int(e[2 * j] | (e[2 * j + 1] << 16)) for j in range(8)]  # word j = entries 2j, 2j + 1
        lo = [byte_perm(t[2 * c], t[2 * c + 1], 0x6420) for c in range(4)]
        hi = [byte_perm(t[2 * c], t[2 * c + 1], 0x7531) for c in range(4)]
        return lo, hi

    def load(self, n, kt):
        return self.qp[n, kt // 2: kt // 2 + 16].view(np.uint32), self.row_state(n)

    def zero(self):
        z = [np.uint32(0)] * 4
        return np.zeros(4, dtype=np.uint32), (z, z)

    def b(self, q, prm, i, h):
        lo_r = [np.array([p[0][c] for p in prm], dtype=np.uint32) for c in range(4)]  # per lane
        hi_r = [np.array([p[1][c] for p in prm], dtype=np.uint32) for c in range(4)]
        w = (word(q, i) >> np.uint32(16 * h)) & np.uint32(0xFFFF)
        sel = w & np.uint32(0x7777)
        pick = np.uint32(0x3210) | ((w >> np.uint32(1)) & np.uint32(0x4444))
        lo = byte_perm_v(byte_perm_v(lo_r[0], lo_r[1], sel), byte_perm_v(lo_r[2], lo_r[3], sel), pick)
        hi = byte_perm_v(byte_perm_v(hi_r[0], hi_r[1], sel), byte_perm_v(hi_r[2], hi_r[3], sel), pick)
        return halves(byte_perm(lo, hi, 0x5140), self.dtype), halves(byte_perm(lo, hi, 0x7362), self.dtype)

    a = staticmethod(Int8Frag.a)

    def out_scale(self, n):
        return 1.0


def byte_perm_v(x, y, s):
    """__byte_perm with a per-lane selector array (prmt's default mode; selectors here never set bit 3)."""
    x, y, s = (np.asarray(v, dtype=np.uint32) for v in (x, y, s))
    src = [(x >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)] + \
          [(y >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
    out = np.zeros_like(x)
    for i in range(4):
        idx = (s >> np.uint32(4 * i)) & np.uint32(7)
        byte = np.choose(idx.astype(np.int64), src)
        out |= byte << np.uint32(8 * i)
    return out


class HalfFrag:
    lane_k = 8

    def __init__(self, w_bits, dtype):
        self.w, self.dtype = w_bits.astype(np.uint32), dtype  # uint16 bit patterns [N, K]

    def load(self, n, kt):
        e = self.w[n, kt: kt + 8]
        return e[0::2] | (e[1::2] << 16), None

    def zero(self):
        return np.zeros(4, dtype=np.uint32), None

    def b(self, q, prm, i, h):
        return halves(word(q, 2 * h), self.dtype), halves(word(q, 2 * h + 1), self.dtype)

    a = staticmethod(Int8Frag.a)

    def out_scale(self, n):
        return 1.0


class PivotFrag(HalfFrag):
    """w [r, K - r] as HalfFrag weights; x gathered through perm; the pivot columns added at the end."""

    def __init__(self, w_bits, x_bits, perm, r, dtype):
        super().__init__(w_bits, dtype)
        self.x, self.perm, self.r = x_bits.astype(np.uint32), perm, r

    def gather_x(self, m, k):
        return self.x[m, self.perm[self.r + k: self.r + k + 8]]  # 8 halves, as gather_x's scalar loads

    def out_add(self, m, n):
        return halves(self.x[m, self.perm[n]], self.dtype)[0]


def out_add(frag, m, n):
    return frag.out_add(m, n) if hasattr(frag, "out_add") else 0.0


def mma(acc, a, b, dtype):
    """acc[32, 4] += A @ B with A, B assembled from the lanes' registers (PTX m16n8k16 layouts)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    g, t = G_OF_LANE, T_OF_LANE
    for r, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
        A[row, col], A[row, col + 1] = halves(a[r], dtype)
    for r, krow in enumerate([2 * t, 2 * t + 8]):
        B[krow, g], B[krow + 1, g] = b[r]
    D = A @ B
    acc[:, 0] += D[g, 2 * t]
    acc[:, 1] += D[g, 2 * t + 1]
    acc[:, 2] += D[g + 8, 2 * t]
    acc[:, 3] += D[g + 8, 2 * t + 1]


def plan(M, N, K, lane_k, slots):
    """launch(): tile shape and the split of K (slots = resident CTAs on the GPU)."""
    MT, NG = (1, 4) if M <= 16 else (2, 4) if M <= 32 else (4, 2)
    BN, unit_k = WARPS_N * 8 * NG, WARPS_K * 4 * lane_k
    columns, units = -(-N // BN), -(-K // unit_k)
    splits = 1 if columns >= slots else max(1, min(units, slots // columns))
    per_split = -(-units // splits)
    return MT, NG, BN, columns, -(-units // per_split), per_split * unit_k


def emulate(frag, x_bits, bias, M, N, K, dtype, slots):
    """x_bits: uint16 [M, K] bit patterns of x; returns (y float64 [M, N], splits)."""
    MT, NG, BN, columns, splits, kchunk = plan(M, N, K, frag.lane_k, slots)
    step_k = 4 * frag.lane_k
    xw = x_bits.astype(np.uint32)
    y, part = np.zeros((M, N)), np.full((splits, M, N), np.nan)
    g, t = G_OF_LANE, T_OF_LANE
    for bx in range(columns):
        col0 = bx * BN
        for by in range(splits):
            kb, ke = by * kchunk, min(K, by * kchunk + kchunk)
            accs = {}
            for wk in range(WARPS_K):
                for wn in range(WARPS_N):
                    acc = np.zeros((MT, NG, 32, 4))
                    row0 = col0 + wn * 8 * NG + g
                    for st in range(kchunk // (WARPS_K * step_k)):
                        wkk = kb + (st * WARPS_K + wk) * step_k
                        if wkk >= ke:
                            break
                        kt = wkk + frag.lane_k * t
                        kin = kt < ke
                        chunks = []
                        for j in range(NG):
                            n = row0 + 8 * j
                            lanes = [frag.load(n[ln], kt[ln]) if (n[ln] < N and kin[ln]) else frag.zero()
                                     for ln in range(32)]
                            q = np.stack([c[0] for c in lanes])
                            if lanes[0][1] is None:
                                prm = None
                            elif isinstance(frag, LutFrag):
                                prm = [c[1] for c in lanes]  # per lane: (lo[4], hi[4])
                            else:
                                prm = tuple(np.array(v) for v in zip(*[c[1] for c in lanes]))
                            chunks.append((q, prm))
                        for i in range(frag.lane_k // 8):
                            xv = np.zeros((MT, 2, 32, 4), dtype=np.uint32)  # 16 bytes = 4 words per lane
                            for mt in range(MT):
                                for r in range(2):
                                    m = 16 * mt + 8 * r + g
                                    for ln in np.nonzero((m < M) & kin)[0]:
                                        k = kt[ln] + 8 * i
                                        e = frag.gather_x(m[ln], k) if hasattr(frag, "gather_x") else xw[m[ln], k: k + 8]
                                        xv[mt, r, ln] = e[0::2] | (e[1::2] << 16)
                            for h in range(2):
                                a = [frag.a(xv[mt, 0], xv[mt, 1], h) for mt in range(MT)]
                                for j in range(NG):
                                    b = frag.b(chunks[j][0], chunks[j][1], i, h)
                                    for mt in range(MT):
                                        mma(acc[mt, j], a[mt], b, dtype)
                    accs[wk, wn] = acc
            for wn in range(WARPS_N):
                acc = sum(accs[wk, wn] for wk in range(WARPS_K))  # wk = 0 plus red[] in order
                for mt in range(MT):
                    for j in range(NG):
                        for c in range(4):
                            m = 16 * mt + g + 8 * (c // 2)
                            n = col0 + wn * 8 * NG + 8 * j + 2 * t + c % 2
                            ok = (m < M) & (n < N)
                            if splits == 1:
                                y[m[ok], n[ok]] = (acc[mt, j, ok, c] * frag.out_scale(n[ok]) + bias[n[ok]]
                                                   + out_add(frag, m[ok], n[ok]))
                            else:
                                part[by, m[ok], n[ok]] = acc[mt, j, ok, c]
        if splits > 1:  # the last CTA of the column block: partials in split order, scale, bias
            cols = np.arange(col0, min(N, col0 + BN))
            y[:, cols] = (part[:, :, cols].sum(axis=0) * frag.out_scale(cols) + bias[cols]
                          + out_add(frag, np.arange(M)[:, None], cols[None, :]))
    return y, splits


def bits_of(t):
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def make(rng, fmt, M, N, K, group, dtype):
    tdt = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((M, K))).to(tdt)
    bias = torch.from_numpy(rng.standard_normal(N)).to(tdt)
    if fmt == "int4":
        q = torch.from_numpy(rng.integers(0, 16, size=(N, K), dtype=np.uint8))
        s = torch.from_numpy(rng.uniform(0.01, 0.05, size=(N, K // group))).to(tdt)
        z = torch.from_numpy(rng.uniform(0, 15, size=(N, K // group))).to(tdt)  # non-integer zero points too
        W = (q.double() - z.double().repeat_interleave(group, 1)) * s.double().repeat_interleave(group, 1)
        frag = Int4Frag(pack_int4(q).numpy(), s.double().numpy(), z.double().numpy(), group, dtype)
    elif fmt == "lut":
        q = torch.from_numpy(rng.integers(0, 16, size=(N, K), dtype=np.uint8))
        tables = group  # the `group` column carries the number of tables here
        lut = torch.from_numpy(rng.standard_normal((tables, 16)) * 0.1).to(tdt)
        W = lut.double().repeat_interleave(N // tables, 0).gather(1, q.long())
        frag = LutFrag(pack_int4(q).numpy(), bits_of(lut), N // tables, dtype)
    elif fmt == "half":
        w = torch.from_numpy(rng.standard_normal((N, K)) / K ** 0.5).to(tdt)
        W = w.double()
        frag = HalfFrag(bits_of(w), dtype)
    else:
        q = torch.from_numpy(rng.integers(-128, 128, size=(N, K), dtype=np.int8))
        s = torch.from_numpy(rng.uniform(0.001, 0.01, size=N)).to(tdt)
        W = q.double() * s.double()[:, None]
        frag = Int8Frag(q.numpy(), s.double().numpy(), dtype)
    ref = (x.double() @ W.T + bias.double()).numpy()
    return frag, bits_of(x), bias.double().numpy(), ref


# (fmt, M, N, K, group, dtype, slots, splits): odd M for each tile shape, N not a multiple of BN, K
# with a partial last stage, one column block or several, one split or several (a small `slots`,
# the resident CTAs, forces the split-K fixup).
CASES = [
    ("int4", 1, 70, 288, 32, "float16", 528, 2),
    ("int4", 2, 300, 544, 32, "bfloat16", 2, 1),
    ("int4", 3, 40, 512, 128, "bfloat16", 2, 2),
    ("int4", 16, 129, 256, 64, "float16", 1, 1),
    ("int4", 17, 33, 416, 32, "bfloat16", 4, 2),
    ("int4", 40, 70, 320, 64, "float16", 8, 2),
    ("int4", 64, 64, 544, 32, "bfloat16", 3, 3),
    ("int8", 1, 70, 144, None, "float16", 528, 2),
    ("int8", 5, 150, 272, None, "bfloat16", 1, 1),
    ("int8", 16, 33, 400, None, "bfloat16", 4, 4),
    ("int8", 20, 129, 128, None, "float16", 2, 1),
    ("int8", 33, 64, 208, None, "float16", 2, 2),
    ("int8", 63, 10, 96, None, "bfloat16", 4, 1),
    ("lut", 1, 70, 288, 70, "float16", 528, 2),      # lut: the group column is the number of tables
    ("lut", 5, 130, 512, 5, "bfloat16", 4, 2),
    ("lut", 33, 64, 320, 1, "float16", 1, 1),
    ("half", 1, 70, 200, None, "float16", 264, 4),
    ("half", 9, 40, 64, None, "bfloat16", 1, 1),
    ("half", 24, 129, 136, None, "bfloat16", 3, 1),
    ("half", 64, 33, 72, None, "float16", 2, 2),
]


@pytest.mark.parametrize("fmt,M,N,K,group,dtype,slots,splits", CASES)
def test_small_m_emulation_matches_float64(rng, fmt, M, N, K, group, dtype, slots, splits):
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    frag, x_bits, bias, ref = make(rng, fmt, M, N, K, group, dtype)
    y, used = emulate(frag, x_bits, bias, M, N, K, dtype, slots)
    assert used == splits
    assert np.abs(y - ref).max() <= 1e-9 * (1 + np.abs(ref).max())


@pytest.mark.parametrize("pivoted", [False, True])
@pytest.mark.parametrize("M,N,K,r,dtype,grid,splits", [(1, 70, 200, 24, "float16", 264, (4, 1)),
                                                        (5, 40, 136, 16, "bfloat16", 3, (3, 1)),
                                                        (33, 72, 200, 136, "float16", 4, (1, 2))])
def test_lowrank_two_phase_emulation(rng, pivoted, M, N, K, r, dtype, grid, splits):
    """lowrank_small_m.cuh: phase 1 t = x @ v^T (pivoted: x[:, perm[:r]] + x[:, perm[r:]] @ w^T through
    PivotFrag) written in x's dtype, phase 2 y = t @ u^T + bias, both planned for the same cooperative grid."""
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    tdt = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((M, K))).to(tdt)
    K1 = K - r if pivoted else K
    v = torch.from_numpy(rng.standard_normal((r, K1)) / K ** 0.5).to(tdt)  # pivoted: w [r, K - r]
    u = torch.from_numpy(rng.standard_normal((N, r)) / r ** 0.5).to(tdt)
    bias = torch.from_numpy(rng.standard_normal(N)).to(tdt)
    if pivoted:
        perm = torch.from_numpy(rng.permutation(K))
        frag1 = PivotFrag(bits_of(v), bits_of(x), perm.numpy(), r, dtype)
        t_ref = x.double()[:, perm[:r]] + x.double()[:, perm[r:]] @ v.double().T
    else:
        frag1 = HalfFrag(bits_of(v), dtype)
        t_ref = x.double() @ v.double().T
    t, s1 = emulate(frag1, bits_of(x), np.zeros(r), M, r, K1, dtype, grid)
    assert np.abs(t - t_ref.numpy()).max() <= 1e-9 * (1 + np.abs(t).max())
    t_T = torch.from_numpy(t).to(tdt)  # the fixup's from_f32<T>
    y, s2 = emulate(HalfFrag(bits_of(u), dtype), bits_of(t_T), bias.double().numpy(), M, N, r, dtype, grid)
    ref = (t_T.double() @ u.double().T + bias.double()).numpy()
    assert np.abs(y - ref).max() <= 1e-9 * (1 + np.abs(ref).max())
    if not pivoted:
        assert (s1, s2) == splits  # the cases exercise each phase's split fixup


def test_plan_splits_fill_one_wave():
    # int4 8192 x 8192 at M = 1 on 132 SMs with 2 resident CTAs each: 64 column blocks x 4 splits.
    MT, NG, BN, columns, splits, kchunk = plan(1, 8192, 8192, 32, 264)
    assert (BN, columns, splits, kchunk) == (128, 64, 4, 2048)
    # Wide N needs no split: one CTA per column block already covers the GPU.
    assert plan(1, 28672, 8192, 32, 132)[4] == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bit_tricks_are_exact(dtype):
    w = np.array([0x76543210, 0xFEDCBA98], dtype=np.uint32)
    f4 = Int4Frag(None, None, None, 32, dtype)
    for shift in (0, 4, 8, 12):
        lo, hi = f4.pair(w, shift, (np.ones(2), np.zeros(2)))
        assert np.array_equal(lo, (w >> shift) & 0xF) and np.array_equal(hi, (w >> (shift + 16)) & 0xF)
    codes = np.arange(-128, 128, dtype=np.int8)  # every int8 value once: 64 words
    f8 = Int8Frag(codes[None], None, dtype)
    got = []
    for w8 in codes.view(np.uint32):
        (b00, b01), (b10, b11) = f8.b(np.array([[w8, 0, 0, 0]], dtype=np.uint32), None, 0, 0)
        got += [b00[0], b01[0], b10[0], b11[0]]
    assert np.array_equal(np.array(got), codes.astype(np.float64))
