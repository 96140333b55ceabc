"""tools/sass_budget.py: the hot-path search on hand-written SASS, and the instruction budget of
the built decode kernels as a regression guard (the per-stage counts below were 645 / 645 / 286 /
690 / 152 / 480 before the loops were reworked; see docs/benchmarks.md, "Instruction budget")."""
import functools
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import sass_budget  # noqa: E402

SO = os.path.join(ROOT, "reparam_kernels", "_C.abi3.so")


def ins(text):
    return [(int(a, 16), t) for a, t in sass_budget._INSTR.findall(text)]


# A loop 0x10..0x90 with a branch: the fall-through side has one HMMA and two more instructions,
# the taken side one HMMA; the full-stage path is the one with the 16-byte load.
LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/              @P0 BRA 0x60 ;
        /*0030*/                   IADD3 R8, R8, 0x1, RZ ;
        /*0040*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0050*/                   BRA 0x80 ;
        /*0060*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0070*/                   NOP ;
        /*0080*/                   ISETP.GE.AND P1, PT, R8, R9, PT ;
        /*0090*/             @!P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_hot_path_takes_the_side_with_fewer_instructions_when_mmas_tie():
    path = sass_budget.main_path(ins(LOOP))
    assert [a for a, _ in path] == [0x10, 0x20, 0x60, 0x70, 0x80, 0x90]


def test_hot_path_prefers_more_mmas_over_fewer_instructions():
    text = LOOP.replace("/*0030*/                   IADD3 R8, R8, 0x1, RZ ;",
                        "/*0030*/                   HMMA.16816.F32 R16, R4, R8, R16 ;")
    path = sass_budget.main_path(ins(text))
    assert [a for a, _ in path] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x80, 0x90]


def test_stage_shape_from_the_kernel_name():
    int4 = "void small_m::small_m_kernel<Int4Frag<__half>, __half, 1, 4>(small_m::Problem<Int4Frag<__half>, __half>)"
    assert sass_budget.stage_shape(int4) == (4 * 2 * 4 * 1, 4 * 512)  # 32 mma, 4 loads of 512 B per warp
    int8 = "void small_m::small_m_kernel<Int8Frag<bfloat16>, bfloat16, 4, 2>(small_m::Problem<...>)"
    assert sass_budget.stage_shape(int8) == (2 * 2 * 2 * 4, 2 * 512)
    # the transposed tile (M <= 8): one mma per pair of n8-groups, the same weight bytes
    assert sass_budget.stage_shape(int4.replace("1, 4>", "0, 4>")) == (4 * 2 * 4 // 2, 4 * 512)
    # ... with the scales after the mma: one more mma a k-step (x against the constant A of the sums)
    post = int4.replace("1, 4>", "0, 4>").replace("Int4Frag", "Int4PostFrag")
    assert sass_budget.stage_shape(post) == (4 * 2 * 4 // 2 + 8, 4 * 512)
    assert sass_budget.stage_shape("void quant_wgmma::wgmma_kernel<Int4Frag<__half>, __half, 64, 1>(...)") == (8, 1024)
    assert sass_budget.stage_shape("void other_kernel<float>()") is None
    # the ring kernels: the same stage; their dynamic shared memory (4 stages x NG x 256 threads x 16 B)
    ring = int4.replace("small_m_kernel<", "small_m_ring_kernel<").replace("1, 4>", "1, 4, {}>")
    assert sass_budget.stage_shape(ring.format("false")) == sass_budget.stage_shape(int4)
    assert sass_budget.ring_bytes(ring.format("false")) == 65536
    assert sass_budget.ring_bytes(ring.format("true")) == 65536 + 4 * 2 * 16 * 128 * 2  # + x: 4 stages x 2 x 16 x 128 k
    lowrank = "void lowrank_small_m::lowrank_small_m_kernel<HalfFrag<__half>, __half, 4, 2, {}>(Problem<...>)"
    assert sass_budget.stage_shape(lowrank.format("true")) == (2 * 2 * 4, 2 * 512)
    assert sass_budget.ring_bytes(lowrank.format("true")) == 32768 and sass_budget.ring_bytes(lowrank.format("false")) == 0
    # the grouped low-rank steps (the last argument: which step), a pivoted expert's gathered x among them
    grouped = "void grouped_lowrank_kernel<ExpertPivotFrag<__half>, __half, 1, 4, false>(Problem<...>)"
    assert sass_budget.stage_shape(grouped) == (2 * 4, 4 * 512) and sass_budget.threads_of(grouped) == 256
    assert sass_budget.ring_bytes(grouped) == 0
    assert sass_budget.ring_bytes(int4) == 0


def _cannot_read_extension():
    """Why the built extension's SASS cannot be read here (None: it can)."""
    if not os.path.exists(SO):
        return "the CUDA extension is not built"
    try:
        sass_budget.find_cuobjdump()
    except SystemExit:
        return "no cuobjdump"
    return None


@functools.lru_cache(maxsize=1)
def _rows_of_built_extension():
    """The small-M and wgmma kernels' rows, or a reason to skip."""
    return _cannot_read_extension() or sass_budget.budget(SO, "sm_90a") or "the extension has no sm_90a code"


def _built_rows():
    rows = _rows_of_built_extension()
    if isinstance(rows, str):
        pytest.skip(rows)
    return rows


# Warp instructions per stage of the M <= 8 / M <= 16 decode loops (MT = 0 / 1) and one wgmma loop, with ~5-10%
# slack for compiler versions: above these, a loop has regressed to recomputing row addresses or
# copying registers.
BUDGET = {
    # M <= 8: the transposed tile (half the mmas and x loads of the M <= 16 one)
    "small_m_kernel<Int4Frag<__half>, __half, 0, 4>": 345,
    # ... with the scales after the mma (REPARAM_SMALL_M_POST_SCALE=1): one LOP3 a weight pair (223 / 247 now)
    "small_m_kernel<Int4PostFrag<__half>, __half, 0, 4>": 240,
    "small_m_kernel<Int4PostFrag<bfloat16>, bfloat16, 0, 4>": 265,
    "small_m_kernel<LutFrag<__half>, __half, 0, 4>": 425,
    "small_m_kernel<Int4Frag<__half>, __half, 1, 4>": 395,
    "small_m_kernel<Int4Frag<bfloat16>, bfloat16, 1, 4>": 425,
    "small_m_kernel<Int8Frag<__half>, __half, 1, 4>": 170,
    "small_m_kernel<LutFrag<__half>, __half, 1, 4>": 480,
    # the grouped ops' loop (csrc/grouped_quant.cuh): run_unit as above, one expert's rows (330 / 374 / 152 now)
    "small_m_grouped_kernel<Int4Frag<__half>, __half, 0, 4>": 345,
    "small_m_grouped_kernel<Int4Frag<__half>, __half, 1, 4>": 395,
    "small_m_grouped_kernel<Int8Frag<__half>, __half, 1, 4>": 170,
    # ... and VQ pairs with each CTA's codebooks of its expert in shared memory (257 / 304 now; vq_linear: 256 / 302)
    "small_m_grouped_kernel<VqPairFrag<__half>, __half, 0, 4>": 275,
    "small_m_grouped_kernel<VqPairFrag<__half>, __half, 1, 4>": 320,
    # ... and 4-bit LUT, the row's table in registers (396 / 443 now; lut_linear: 396 / 442)
    "small_m_grouped_kernel<LutFrag<__half>, __half, 0, 4>": 425,
    "small_m_grouped_kernel<LutFrag<__half>, __half, 1, 4>": 480,
    # ... and the low-rank experts' two steps (csrc/grouped_lowrank_linear.cu), each CTA's shape its expert's: plain
    # rows 62 / 60 at step 1 and 68 / 68 at step 2 now (lowrank_linear's decode loop: 48 / 47); a pivoted expert's first step gathers x through its
    # perm, 8 columns a step pair read once for every row (154 / 206 now; 210 / 266 gathering per row)
    "grouped_lowrank_kernel<HalfFrag<__half>, __half, 0, 4, false>": 68,
    "grouped_lowrank_kernel<HalfFrag<__half>, __half, 1, 4, true>": 75,
    "grouped_lowrank_kernel<ExpertPivotFrag<__half>, __half, 0, 4, false>": 170,
    "grouped_lowrank_kernel<ExpertPivotFrag<__half>, __half, 1, 4, false>": 225,
    # VQ pairs: a PRMT, an IMAD and an LDS per code (256 / 302 now)
    "small_m_kernel<VqPairFrag<__half>, __half, 0, 4>": 275,
    "small_m_kernel<VqPairFrag<__half>, __half, 1, 4>": 320,
    "lowrank_small_m_kernel<HalfFrag<__half>, __half, 1, 4, false>": 54,
    # the same loops with the weights through the shared-memory ring (REPARAM_SMALL_M_RING=1; 348 and 70 now)
    "small_m_ring_kernel<Int4Frag<__half>, __half, 0, 4, false>": 365,
    # ... and x (REPARAM_SMALL_M_RING=2) at M <= 16: 416 now
    "small_m_ring_kernel<Int4Frag<__half>, __half, 1, 4, true>": 440,
    # lut's x as 16-byte vectors (a_consecutive) instead of word loads: 594 now, against 442 (the L1 trade)
    "small_m_ring_kernel<LutFrag<__half>, __half, 1, 4, true>": 625,
    "lowrank_small_m_kernel<HalfFrag<__half>, __half, 1, 4, true>": 76,
    # M = 33-64 (four m16 tiles), where int4's 2.0x target at M = 64 needs ~2.1 TB/s (422 now: 2.5)
    "small_m_kernel<Int4Frag<__half>, __half, 4, 2>": 450,
    # Hopper, 64 < M < 512: per 128-k stage, the next stage's decode included (counted since 2026-11-30:
    # 389 then, 353 once the stages stopped copying registers into each other; before, the tool's path
    # skipped the decode branch: 480 -> 275 while the x tile's copy stopped recomputing every chunk's
    # row, shared-memory slot and bounds)
    "wgmma_kernel<Int4Frag<__half>, __half, 128, 2>": 375,
}


@pytest.mark.parametrize("kernel", list(BUDGET))
def test_decode_loop_stays_within_its_instruction_budget(kernel):
    rows = [r for r in _built_rows() if kernel in r.kernel]
    assert rows, kernel
    for r in rows:
        assert r.inst <= BUDGET[kernel], (r.kernel, r.inst, dict(r.mix))


# The next stage's loads in their branch, then a use of a loaded value inside it (the warp waits there
# for memory before computing the current stage) or, in the second form, after the branch.
PREFETCH = """
        /*0000*/                   BSSY B0, 0x60 ;
        /*0010*/              @P0 BRA 0x60 ;
        /*0020*/                   LDG.E.U16.CONSTANT R20, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0040*/                   PRMT R21, R20, 0x1010, RZ ;
        /*0050*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0060*/                   BSYNC B0 ;
        /*0070*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0080*/                   EXIT ;
"""


def test_prefetch_uses_flags_a_loaded_value_used_inside_the_load_branch():
    assert [a for a, _ in sass_budget.prefetch_uses(ins(PREFETCH))] == [0x40]
    moved = PREFETCH.replace("PRMT R21, R20, 0x1010, RZ", "NOP").replace(
        "HMMA.16816.F32 R12, R4, R8, R12", "PRMT R21, R20, 0x1010, RZ")
    assert sass_budget.prefetch_uses(ins(moved)) == []
    # a register the branch reloads and then overwrites is no use of the load
    rewritten = PREFETCH.replace("PRMT R21, R20, 0x1010, RZ", "MOV R20, 0x1").replace(
        "IADD3 R2, R2, 0x10, RZ", "IADD3 R22, R20, 0x10, RZ")
    assert sass_budget.prefetch_uses(ins(rewritten)) == []


@pytest.mark.parametrize("frag", ["Int4Frag", "Int8Frag", "LutFrag", "VqPairFrag", "HalfFrag"])
def test_decode_loops_do_not_wait_on_their_prefetch(frag):
    """No small-M kernel computes on the next stage's weights inside the branch that loads them: the
    first H200 run found int4's scale handling there (tools/sass_budget.py, prefetch_uses)."""
    rows = [r for r in _built_rows() if "small_m_kernel<" + frag in r.kernel and not sass_budget.ring_bytes(r.kernel)]
    assert rows, frag
    for r in rows:
        assert r.prefetch_uses == 0, (r.kernel, r.prefetch_uses)


# One wgmma loop trip: stage s loads stage s + 2's chunk into R4..R7, issues its wgmmas, then a read of
# R4 — before the next stage's wgmmas: the warp would wait a memory round trip every stage.
WGMMA_TRIP = """
        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x128x16.F32 R24, R88, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   HFMA2 R88, R8, R9, R10 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   SEL R8, R4, R8, !P4 ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
"""


def test_early_uses_flags_a_load_read_before_the_next_stage_wgmmas():
    assert [a for a, _ in sass_budget.early_uses(ins(WGMMA_TRIP))] == [0x50]
    # the same read after a second group of wgmmas (the next stage's) waits for nothing
    later = WGMMA_TRIP.replace("SEL R8, R4, R8, !P4", "NOP").replace(
        "BAR.SYNC.DEFER_BLOCKING 0x0", "WARPGROUP.ARRIVE ;\n        /*0070*/                   SEL R8, R4, R8, !P4")
    assert sass_budget.early_uses(ins(later)) == []


@pytest.mark.parametrize("frag", ["Int4Frag", "Int8Frag", "LutFrag"])
def test_wgmma_loops_do_not_wait_on_loads_of_two_stages_ahead(frag):
    """The wgmma loop's weights, loaded two stages ahead, are first read in the next stage's decode
    (tools/sass_budget.py, early_uses: 12-14 reads too early per kernel until 2026-11-30)."""
    rows = [r for r in _built_rows() if "wgmma_kernel<" + frag in r.kernel]
    assert rows, frag
    for r in rows:
        assert r.prefetch_uses == 0, (r.kernel, r.prefetch_uses)


def test_loops_finds_each_backward_branch_with_its_hot_trip():
    found = sass_budget.loops(ins(LOOP))
    assert [(lp.lo, lp.hi, lp.size) for lp in found] == [(0x10, 0x90, 9)]
    assert found[0].path == 6  # the taken side (0x60, 0x70) is shorter than the fall-through (0x30..0x50)


@functools.lru_cache(maxsize=1)
def _large_m_kernels():
    """{demangled name: instructions} of the block-circulant large-M kernels (sm_90a), or a reason to skip."""
    if reason := _cannot_read_extension():
        return reason
    return {d: i for n, i in sass_budget.functions(sass_budget.disassemble(SO, "sm_90a"))
            if "bc_large_m::kernel<" in (d := sass_budget.demangle(n))}


def test_large_m_block_circulant_kernel_stays_within_its_instruction_budget():
    """csrc/block_circulant_large_m.cuh was issue-bound (docs/structured.md): ~20-instruction integer
    divisions by the runtime block size in every per-element loop, 493 instructions a trip of the
    spectrum sums. One instance per block size removed the divisions from its loops (IMAD.HI is their
    mark) and the sums are 220 a trip (b = 256, fp16), with some slack for compiler versions."""
    kernels = _large_m_kernels()
    if isinstance(kernels, str):
        pytest.skip(kernels)
    assert len(kernels) == 21, sorted(kernels)  # 7 block sizes x 3 dtypes
    for name, body in kernels.items():  # (a loop's trip count may divide once, before it)
        assert not any(lp.mix["IMAD"] and any("IMAD.HI" in t for a, t in body if lp.lo <= a <= lp.hi)
                       for lp in sass_budget.loops(body)), name
    (body,) = [i for d, i in kernels.items() if "kernel<__half, 256," in d]
    sums = [lp for lp in sass_budget.loops(body) if lp.mix["LDG"] == 16 and lp.mix["FFMA"] >= 128]
    assert sums and max(lp.size for lp in sums) <= 240, sums
