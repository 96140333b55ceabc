"""Triton grouped W4A16: every expert of a mixture-of-experts layer in one launch (ops/grouped_int4_linear.py).

Axis 0 of the grid is the row tiles, in one of two maps (chosen from the static shapes, so a CUDA graph or
torch.compile sees one launch either way):

- per expert (few rows: decode): experts × row tiles of T. A program reads its expert's row range from
  the offsets and returns before any load when its tile starts past it, so an expert no row was routed to
  costs empty programs and none of its weight bytes.
- packed (more than two row tiles of T: prefill, batched decode): each expert's rows cut into tiles of its
  own, numbered one after the other — at most T/BM + E tiles instead of E·T/BM. The wrapper counts them on
  the device (a cumulative sum of each expert's tile count: four small torch ops) and a program finds its
  expert by binary search in those sums (log₂E loads).

Axis 1 is the column tiles. The K loop is int4_linear's tensor-core path (packed bytes → low and high
nibbles → q·s − z·s interleaved into a [BN, BK] tile in x's dtype, tl.dot). Not tuned on a GPU yet: no
GEMV form for one row an expert, no split of K.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_nt, nibbles_f32, store_tile
from ._tiles import choose


@triton.jit
def _expert_and_first_row(pid, off_ptr, ends_ptr, T, E, tiles_m, BM: tl.constexpr, PACKED: tl.constexpr,
                          SEARCH: tl.constexpr):
    """(expert, its first row, its end row) of this program's row tile; first ≥ end: nothing to do."""
    if PACKED:  # ends[e] = tiles of experts 0..e: the smallest e with ends[e] > pid, by bisection
        lo_e = pid * 0
        hi_e = lo_e + E
        for _ in tl.static_range(SEARCH):
            mid = (lo_e + hi_e) // 2
            v = tl.load(ends_ptr + mid, mask=mid < E, other=0)
            right = (v <= pid) & (mid < E)
            lo_e = tl.where(right, mid + 1, lo_e)
            hi_e = tl.where(right, hi_e, mid)
        e = tl.minimum(lo_e, E - 1)
        first_tile = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        tile = pid - first_tile  # (negative past the last expert's tiles: no rows, below)
        tile = tl.where(lo_e < E, tile, T)
    else:
        e = pid // tiles_m
        tile = pid % tiles_m
    lo = tl.minimum(tl.maximum(tl.load(off_ptr + e), 0), T)  # clamped: bad offsets never read out of bounds
    hi = tl.minimum(tl.maximum(tl.load(off_ptr + e + 1), lo), T)
    return e, lo + tile * BM, hi


@triton.jit
def _grouped_int4_kernel(x_ptr, off_ptr, ends_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, T, N, K, G, E, tiles_m,
                         stride_xm, stride_ym, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         IEEE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, PACKED: tl.constexpr, SEARCH: tl.constexpr):
    e, r0, hi = _expert_and_first_row(tl.program_id(0), off_ptr, ends_ptr, T, E, tiles_m, BM, PACKED, SEARCH)
    if r0 < hi:  # this expert has rows in this tile: only then are its weights read
        e64 = e.to(tl.int64)
        rm = r0 + tl.arange(0, BM).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        xmask, nmask = rm[:, None] < hi, rn < N
        rh = tl.arange(0, BK // 2)
        q_rows = q_ptr + e64 * N * (K // 2) + rn[:, None].to(tl.int64) * (K // 2)
        sz_rows = e64 * N * G + rn * G
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # BK | GROUP | K: every step is whole and in one group
            p = tl.load(q_rows + (k0 // 2 + rh)[None, :], mask=nmask[:, None], other=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + sz_rows + g, mask=nmask, other=0.0).to(tl.float32)[:, None]
            zs = tl.load(z_ptr + sz_rows + g, mask=nmask, other=0.0).to(tl.float32)[:, None] * s
            lo4, hi4 = nibbles_f32(p)
            w = tl.interleave((lo4 * s - zs).to(x_ptr.dtype.element_ty), (hi4 * s - zs).to(x_ptr.dtype.element_ty))
            x = tl.load(x_rows + (k0 + tl.arange(0, BK))[None, :], mask=xmask, other=0.0)
            acc = dot_nt(acc, x, w, IEEE, DOT_F32)
        store_tile(acc, bias_ptr + e64 * N, y_ptr, rm, rn, xmask, nmask, stride_ym, 0, HAS_BIAS)


def tiles(rows, experts, n, k, group_size, fp32=False):
    """int4_linear's tiles (``_tiles.choose``) for the mean rows per expert, never its GEMV form (one row per
    expert takes tl.dot's 16-row tile) and never split along K."""
    per_expert = max(2, triton.cdiv(rows, max(experts, 1)))
    return choose(per_expert, n, k, torch.device("cpu"), bk_limit=group_size & -group_size, split=1, fp32=fp32)


def launch_plan(rows, experts, n, k, group_size, fp32=False, packed=None):
    """(tiles, tiles_m, packed, search steps, programs on axis 0): packed once T spans more than two row tiles."""
    t = tiles(rows, experts, n, k, group_size, fp32)
    tiles_m = triton.cdiv(rows, t.bm)
    packed = tiles_m > 2 if packed is None else packed
    search = max(1, experts.bit_length())  # bisection steps over [0, E)
    return t, tiles_m, packed, search, (tiles_m + experts if packed else experts * tiles_m)


def tile_ends(expert_offsets, rows, bm):
    """[E] int64 on the device: row tiles of experts 0..e (each expert's clamped rows cut into tiles of bm)."""
    off = expert_offsets.clamp(0, rows)
    counts = (off[1:] - off[:-1]).clamp_(min=0)
    return torch.cumsum(torch.div(counts + (bm - 1), bm, rounding_mode="floor"), 0)


def grouped_int4_linear(x, expert_offsets, qweight, scales, zeros, group_size, bias=None, packed=None):
    """packed: force the row-tile map (tests); None chooses from the shapes."""
    experts, n, k = qweight.shape[0], qweight.shape[1], 2 * qweight.shape[2]
    rows = x.shape[0]
    y = torch.zeros((rows, n), dtype=x.dtype, device=x.device)  # rows no expert takes stay zero
    if rows == 0:
        return y
    t, tiles_m, packed, search, programs = launch_plan(rows, experts, n, k, group_size, x.dtype == torch.float32,
                                                       packed)
    ends = tile_ends(expert_offsets, rows, t.bm) if packed else expert_offsets
    x = x.contiguous()
    _grouped_int4_kernel[(programs, triton.cdiv(n, t.bn))](
        x, expert_offsets, ends, qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
        y if bias is None else bias.contiguous(), y, rows, n, k, k // group_size, experts, tiles_m, x.stride(0), n,
        GROUP=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET,
        BM=t.bm, BN=t.bn, BK=t.bk, PACKED=packed, SEARCH=search, num_warps=t.warps, num_stages=t.stages)
    return y
