"""What the grouped Triton kernels (a mixture-of-experts layer's experts in one launch) share: which rows a
program computes, and for which expert.

Axis 0 of the grid is the row tiles, in one of two maps (chosen from the static shapes, so a CUDA graph or
torch.compile sees one launch either way):

- per expert (few rows: decode): experts × row tiles of T. A program reads its expert's row range from
  the offsets and returns before any load when its tile starts past it, so an expert no row was routed to
  costs empty programs and none of its weight bytes.
- packed (more than two row tiles of T: prefill, batched decode): each expert's rows cut into tiles of its
  own, numbered one after the other — at most T/BM + E tiles instead of E·T/BM. ``tile_ends`` counts them
  on the device (a cumulative sum of each expert's tile count: four small torch ops) and a program finds
  its expert by bisection in those sums (log₂E loads).

Axis 1 is the column tiles. The tiles are the format's single-expert ones (``_tiles.choose``) for the mean
rows per expert, never split along K; a format with a GEMV form (int4) takes it where the rows are at most one
an expert on average (decode): one program an expert and column tile, the expert's rows one after the other.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET
from ._tiles import choose


@triton.jit
def expert_and_first_row(pid, off_ptr, ends_ptr, T, E, tiles_m, BM: tl.constexpr, PACKED: tl.constexpr,
                         SEARCH: tl.constexpr):
    """(expert, its first row in this program's tile, its end row); first ≥ end: nothing to do."""
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
        tile = pid - tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        tile = tl.where(lo_e < E, tile, T)  # past the last expert's tiles: a tile past every row
    else:
        e = pid // tiles_m
        tile = pid % tiles_m
    lo = tl.minimum(tl.maximum(tl.load(off_ptr + e), 0), T)  # clamped: bad offsets never read out of bounds
    hi = tl.minimum(tl.maximum(tl.load(off_ptr + e + 1), lo), T)
    return e, lo + tile * BM, hi


@triton.jit
def rows_and_cols(r0, hi, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's rows (from r0, before hi) and columns (axis 1's tile), with their masks."""
    rm = r0 + tl.arange(0, BM).to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    return rm, rn, rm[:, None] < hi, rn < N


class Plan:
    """The launch of a grouped kernel: tiles, row tiles of T, the map, bisection steps, programs on axis 0."""

    def __init__(self, rows, experts, n, k, bk_limit=128, fp32=False, packed=None, gemv=False):
        """gemv: the format has a GEMV form (one program an expert and column tile, the expert's rows one
        after the other): True takes it (per-expert map), "auto" where the rows are at most one an expert on
        average (decode)."""
        self.gemv = rows <= experts if gemv == "auto" else bool(gemv)
        per_expert = 1 if self.gemv else max(2, triton.cdiv(rows, max(experts, 1)))
        self.tiles = choose(per_expert, n, k, torch.device("cpu"), bk_limit=bk_limit, split=1, fp32=fp32)
        self.tiles_m = 1 if self.gemv else triton.cdiv(rows, self.tiles.bm)
        self.packed = False if self.gemv else self.tiles_m > 2 if packed is None else packed
        self.search = max(1, experts.bit_length())  # bisection steps over [0, E)
        self.programs = self.tiles_m + experts if self.packed else experts * self.tiles_m
        self.rows, self.n = rows, n

    def grid(self):
        return (self.programs, triton.cdiv(self.n, self.tiles.bn))

    def ends(self, expert_offsets):
        """The bisection's tile sums (packed), or any int64 tensor standing in for the unused pointer."""
        return tile_ends(expert_offsets, self.rows, self.tiles.bm) if self.packed else expert_offsets

    def constexprs(self):
        t = self.tiles
        return dict(BM=t.bm, BN=t.bn, BK=t.bk, PACKED=self.packed, SEARCH=self.search, num_warps=t.warps,
                    num_stages=t.stages)


def tile_ends(expert_offsets, rows, bm):
    """[E] int64 on the device: row tiles of experts 0..e (each expert's clamped rows cut into tiles of bm)."""
    off = expert_offsets.clamp(0, rows)
    counts = (off[1:] - off[:-1]).clamp_(min=0)
    return torch.cumsum(torch.div(counts + (bm - 1), bm, rounding_mode="floor"), 0)


def launch(kernel, plan, x, expert_offsets, weights, bias, n, k, format_ints=(), **constexprs):
    """y [T, n] of a grouped kernel whose arguments are (x, offsets, tile ends, *weights, bias, y, T, N, K, E,
    row tiles, x's row stride, y's row stride, *format_ints, constexprs…); rows no expert takes stay zero."""
    rows = x.shape[0]
    y = torch.zeros((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    x = x.contiguous()
    kernel[plan.grid()](
        x, expert_offsets, plan.ends(expert_offsets), *(w.contiguous() for w in weights),
        y if bias is None else bias.contiguous(), y, rows, n, k, weights[0].shape[0], plan.tiles_m, x.stride(0), n,
        *format_ints, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, DOT_F32=INTERPRET,
        **constexprs, **plan.constexprs())
    return y
