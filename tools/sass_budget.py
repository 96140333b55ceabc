"""Instruction budget of the decode kernels, read from their SASS (no GPU needed).

At M <= 64 the quantized and low-rank GEMMs must stream their weights at DRAM speed. A warp
instruction issues per scheduler per clock (4 per SM), so a kernel whose main loop spends I warp
instructions on B bytes of weights cannot read faster than

    B / I  x  4 issues/clock  x  SMs  x  clock

whatever the memory does. This script disassembles the built extension, finds the main loop of
each small-M and wgmma kernel (the loop with the most mma instructions), follows the path a full
stage takes through it (the most mmas and 16-byte loads, then the fewest instructions: the partial
last stage and the next-stage prefetch's bounds tests sit on other paths), and prints that
ceiling with the registers, CTAs per SM and weight bytes in flight per SM (docs/benchmarks.md,
"Instruction budget", sets it against what each speed target needs). A prediction, not a
measurement: real kernels also stall on latency; the ceiling says which targets are out of reach
before any stall.

    python tools/sass_budget.py [--so reparam_kernels/_C.abi3.so] [--arch sm_90a] [--filter REGEX]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

# H200 SXM: 132 SMs, 1.98 GHz boost; 4.27 TB/s is the device-to-device copy measured on it (DESIGN.md).
SMS, CLOCK_HZ, ISSUE_PER_CLK, COPY_TBS = 132, 1.98e9, 4, 4.27
WARP_BYTES_PER_LOAD = 32 * 16  # one 16-byte weight load per lane

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def find_cuobjdump() -> str:
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:  # Triton wheels ship one
        import triton

        cands += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.exists(c):
            return c
    sys.exit("cuobjdump not found: set CUDA_HOME or install a CUDA toolkit")


def demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except FileNotFoundError:  # no binutils: the mangled name (the filters still match its pieces)
        out = name
    return re.sub(r"reparam::|\(anonymous namespace\)::|__nv_|small_m::|lowrank_small_m::|grouped_lowrank::", "", out)


def functions(sass: str):
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = part.split("\n", 1)
        ins = [(int(a, 16), t) for a, t in _INSTR.findall(body)]
        yield name.strip(), ins


_MMA = {"HMMA", "HGMMA", "IMMA", "IGMMA", "BMMA", "DMMA", "QGMMA"}


def is_mma(text: str) -> bool:
    """A tensor-core matrix instruction (not HFMA2.MMA: an HFMA2 issued to the MMA pipe, used as a move)."""
    return opcode(text).split(".")[0] in _MMA


def opcode(text: str) -> str:
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]


# Opcodes of a format's decode (packed-half math, byte permutes, three-input logic): the wgmma loop
# decodes the next stage's weights in a branch that every stage but the last takes.
_DECODE = re.compile(r"^(HFMA2|HADD2|HMUL2|PRMT|LOP3)")


def hot_path(ins, lo: int, hi: int, decode_first: bool = False):
    """Instructions on the full-stage path of the loop [lo, hi] (hi: the back-edge branch).
    decode_first (the wgmma loops): among paths with as many mmas and 16-byte loads, the one with the
    most decode instructions, before the fewest instructions (which would skip the decode branch)."""
    body = [(a, t) for a, t in ins if lo <= a <= hi]
    leaders = {lo}
    for i, (a, t) in enumerate(body):
        m = _BRA.search(t)
        if m or opcode(t) in ("EXIT", "RET"):
            if i + 1 < len(body):
                leaders.add(body[i + 1][0])
            if m and lo <= int(m.group(1), 16) <= hi:
                leaders.add(int(m.group(1), 16))
    starts = sorted(leaders)
    blocks = {}
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else hi + 16
        blocks[s] = [(a, t) for a, t in body if s <= a < e]
    # best[s]: (mmas, 16-byte loads, -instructions, path) from block s to the back edge; forward edges only.
    best = {}
    for s in reversed(starts):
        blk = blocks[s]
        if not blk:
            continue
        last_a, last_t = blk[-1]
        mma = sum(is_mma(t) for _, t in blk)
        ld = sum(opcode(t).startswith("LDG") and ".128" in opcode(t) for _, t in blk)  # LDGSTS: the ring's copies
        dec = sum(bool(_DECODE.match(opcode(t))) for _, t in blk) if decode_first else 0
        here = (mma, ld, dec, -len(blk))
        if last_a == hi:  # the back edge
            best[s] = (*here, [s])
            continue
        succ = []
        m = _BRA.search(last_t)
        if m:
            tgt = int(m.group(1), 16)
            if s < tgt <= hi:
                succ.append(tgt)
        if not (m and not last_t.startswith("@")) and opcode(last_t) not in ("EXIT", "RET"):
            nxt = [x for x in starts if x > s]
            if nxt:
                succ.append(nxt[0])
        cands = [best[x] for x in succ if x in best]
        if cands:
            b = max(cands, key=lambda v: v[:4])
            best[s] = (*(h + v for h, v in zip(here, b[:4])), [s] + b[4])
    if lo not in best:
        return body
    return [it for s in best[lo][4] for it in blocks[s]]


def main_path(ins, decode_first: bool = False):
    """The hot path of the loop with the most mma instructions on it (then the densest), among
    loops that hold no other loop with mmas: an outer loop (a persistent CTA's loop over work units)
    would count its inner loop's body once per pass. (An inner loop without mmas, such as a staging
    loop, is counted once on the path.)"""
    edges = [(int(m.group(1), 16), a) for a, t in ins if (m := _BRA.search(t)) and int(m.group(1), 16) < a]
    paths = {e: hot_path(ins, *e, decode_first) for e in edges}
    mmas = {e: sum(is_mma(x) for _, x in p) for e, p in paths.items()}
    best = None
    for (lo, hi), path in paths.items():
        mma = mmas[(lo, hi)]
        nested = any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) and mmas[(l2, h2)] for l2, h2 in edges)
        key = (mma, mma / len(path))
        if mma and not nested and (best is None or key > best[0]):
            best = (key, path)
    return best[1] if best else None


# k per lane per 16-byte weight load of each small-M format (Frag::kLaneK)
LANE_K = {"Int4Frag": 32, "Int4PostFrag": 32, "LutFrag": 32, "VqPairFrag": 32, "Int8Frag": 16, "HalfFrag": 8,
          "PivotFrag": 8, "ExpertPivotFrag": 8}
# bits per weight of each format; the wgmma path's stage is 128 k of 16 weight rows per warp
BITS = {"Int4Frag": 4, "Int4PostFrag": 4, "LutFrag": 4, "VqPairFrag": 4, "Int8Frag": 8, "HalfFrag": 16, "PivotFrag": 16,
        "ExpertPivotFrag": 16}
# formats that scale after the mma (small_m_frag_traits.cuh, post_scales): one more mma a k-step, x against ones()
POST_SCALED = {"Int4PostFrag"}
WGMMA_STAGE_K, WGMMA_MMA_PER_STAGE = 128, 8


def stage_shape(name: str):
    """(mma per stage, weight bytes per warp per stage) of small_m_kernel<Frag, T, MT, NG> and
    wgmma_kernel<Frag, T, BM, groups>, or None."""
    m = re.search(r"(?:small_m_(?:ring_|grouped_)?|grouped_lowrank_)kernel<(?:small_m::)?(\w+)<.*?, (\d+), (\d+)"
                  r"(?:, (?:true|false))?>\(", name)
    if m and m.group(1) in LANE_K:
        mt, ng = int(m.group(2)), int(m.group(3))
        steps = LANE_K[m.group(1)] // 8 * 2  # mma k-steps per stage: kLaneK / 8 step pairs
        # MT = 0: the transposed tile (M <= 8), one mma per pair of n8-groups
        mmas = steps * ng // 2 if mt == 0 else steps * ng * mt
        mmas += steps if m.group(1) in POST_SCALED else 0
        return mmas, ng * WARP_BYTES_PER_LOAD
    m = re.search(r"wgmma_kernel<(?:small_m::)?(\w+)<", name)
    if m and m.group(1) in BITS:
        return WGMMA_MMA_PER_STAGE, 16 * WGMMA_STAGE_K * BITS[m.group(1)] // 8
    return None


_REG = re.compile(r"\bR(\d+)\b")


def _operands(text: str):
    """(opcode, destination register or None, source registers) of one instruction (opcode()'s
    predicate rule; instructions that write no register have only sources)."""
    o = opcode(text)
    words = text.split()[2 if text.startswith("@") else 1:]
    writes = not o.startswith(("ST", "BRA", "ISETP", "BSYNC", "BSSY", "WARPSYNC", "RED", "ATOM", "CCTL", "LDGSTS"))
    d = _REG.match(words[0]) if writes and words else None
    srcs = " ".join(words[1:] if writes else words)
    return o, int(d.group(1)) if d else None, {int(r) for r in _REG.findall(srcs)}


def prefetch_uses(ins):
    """Instructions that use a just-loaded value inside a prefetch branch: within each innermost
    BSSY .. BSYNC region that issues 16-byte global loads (the next stage's weights, loaded under
    `if (st + 1 < nst)`), those that read a register an LDG of that region wrote (on the same path:
    an unconditional BRA ends one). Such an instruction makes the warp wait there a full memory round
    trip before it computes the current stage, so the prefetch hides nothing: int4's scale permutes
    and -z*s multiply sat there until the first H200 run (2.2 TB/s at M = 1). Returns [(address, text)]."""
    out, stack = [], []
    for i, (_, t) in enumerate(ins):
        op = opcode(t)
        if op == "BSSY":
            stack.append(i)
        elif op == "BSYNC" and stack:
            region = ins[stack.pop():i + 1]
            if any(opcode(x) == "BSSY" for _, x in region[1:]) or not any(  # (LDGSTS: the ring's copies, no registers)
                    opcode(x).startswith("LDG") and not opcode(x).startswith("LDGSTS") and ".128" in opcode(x)
                    for _, x in region):
                continue
            loaded = set()
            for a, x in region:
                o, d, srcs = _operands(x)
                if o == "BRA" and not x.startswith("@"):
                    loaded = set()  # the end of one path of the branch
                    continue
                if o.startswith("LDG"):
                    if d is not None:
                        width = 4 if ".128" in o else 2 if ".64" in o else 1
                        loaded |= {d + k for k in range(width)}
                    continue
                if srcs & loaded:
                    out.append((a, x))
                if d is not None:
                    loaded.discard(d)
    return out


def early_uses(path):
    """On the hot path of a wgmma loop whose weights are loaded two stages ahead (int4, int8, lut):
    instructions that read a value a global load wrote before two more groups of wgmmas were issued
    (WARPGROUP.ARRIVE) — the path taken twice, for the back edge. Stage s loads stage s + 2's weights;
    its first read belongs in stage s + 1's decode, after stage s + 1's wgmmas. A read earlier makes
    every stage wait one memory round trip: until 2026-11-30 each stage ended copying the chunks in
    flight into the current ones (44 SELs), found in the SASS after the H200 timed M = 256 at ~3 µs
    a stage. Returns [(address, text)]."""
    out, seen = [], set()
    for i, (_, t) in enumerate(path):
        o, d, _ = _operands(t)
        if not o.startswith("LDG") or d is None:
            continue
        width = 4 if ".128" in o else 2 if ".64" in o else 1
        regs, arrives = {d + k for k in range(width)}, 0
        for a, x in (path + path)[i + 1:i + 1 + len(path)]:
            xo, xd, xs = _operands(x)
            if xo == "WARPGROUP.ARRIVE":
                arrives += 1
                if arrives == 2:
                    break
            if xs & regs and (a, x) not in seen:
                seen.add((a, x))
                out.append((a, x))
            if xd is not None:
                regs.discard(xd)
            if not regs:
                break
    return out


class Row(NamedTuple):
    kernel: str  # demangled
    inst: float  # warp instructions per stage on the hot path (per loop pass when shape is unknown)
    mma: float
    bytes_per_inst: float | None  # weight bytes per warp instruction
    ceiling_tbs: float | None  # the issue-rate ceiling on the H200
    regs: int | None
    ctas_per_sm: int | None  # by registers and shared memory
    inflight_kb: float | None  # weight bytes per SM loaded one stage ahead (small-M kernels), KB
    mix: collections.Counter
    prefetch_uses: int = 0  # instructions waiting on a just-loaded value (prefetch_uses; early_uses for wgmma)


def resources(cuobjdump: str, arch: str, so: str) -> dict:
    """{mangled name: (registers, static shared bytes)} from cuobjdump -res-usage."""
    out = subprocess.run([cuobjdump, "-res-usage", "-arch", arch, so], capture_output=True, text=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+).*SHARED:(\d+)", line)
        if m and name:
            res[name] = (int(m.group(1)), int(m.group(2)))
            name = None
    return res


def threads_of(name: str) -> int | None:
    """Threads per CTA: small-M kernels 256, wgmma kernels 128 per warpgroup (their last template argument)."""
    if SMALL_M.search(name):
        return 256
    m = re.search(r"wgmma_kernel<.*, (\d+), (\d+)>\(", name)
    return 128 * int(m.group(2)) if m else None


SMALL_M = re.compile(r"(?:small_m_(?:ring_|grouped_)?|grouped_lowrank_)kernel<")
LOOP_KERNELS = r"(?:small_m_(?:ring_|grouped_)?|grouped_lowrank_)kernel<|wgmma_kernel<"  # the kernels budget() reports by default
RING_STAGES = 4  # small_m_gemm.cuh kRingStages: the ring kernels' dynamic shared memory, stages in flight


def ring_bytes(name: str) -> int:
    """Dynamic shared memory of small_m_ring_kernel<Frag, T, MT, NG, kX> (kRingStages x NG x 256 threads x
    16 B of weights; with kX the x ring too: kRingStages x 2 K-warps x 16 MT rows x 4 kLaneK k x 2 bytes)
    and of lowrank_small_m_kernel<..., MT, NG, true>; 0 for the others."""
    m = re.search(r"small_m_ring_kernel<(?:small_m::)?(\w+)<.*, (\d+), (\d+), (true|false)>\(", name)
    if m:
        mt, ng = int(m.group(2)), int(m.group(3))
        x = RING_STAGES * 2 * 16 * mt * 4 * LANE_K.get(m.group(1), 0) * 2 if m.group(4) == "true" else 0
        return RING_STAGES * ng * 256 * 16 + x
    m = re.search(r"lowrank_small_m_kernel<.*, (\d+), (\d+), true>\(", name)
    return RING_STAGES * int(m.group(2)) * 256 * 16 if m else 0


def ctas_per_sm(regs: int, smem: int, threads: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = 65536 // (per_warp * (threads // 32))
    by_smem = (228 * 1024) // (smem + 1024) if smem else 32  # 1 KB per CTA reserved
    return max(0, min(by_regs, by_smem, 64 // (threads // 32), 32))


def disassemble(so: str, arch: str = "sm_90a") -> str:
    """The SASS of every kernel of `so` (an extension or a cubin) for `arch`."""
    return subprocess.run([find_cuobjdump(), "-sass", "-arch", arch, so], capture_output=True, text=True,
                          check=True).stdout


def budget(so: str, arch: str = "sm_90a", pattern: str = LOOP_KERNELS) -> list[Row]:
    """A Row per kernel of `so` whose demangled name matches `pattern` and that has an mma loop."""
    sass = disassemble(so, arch)
    res = resources(find_cuobjdump(), arch, so)
    per_inst = ISSUE_PER_CLK * SMS * CLOCK_HZ / 1e12  # TB/s per (byte / instruction)
    rows = []
    for name, ins in functions(sass):
        dem = demangle(name)
        path = main_path(ins, "wgmma_kernel<" in dem) if re.search(pattern, dem) else None
        if path is None:
            continue
        mma = sum(is_mma(t) for _, t in path)
        mix = collections.Counter(opcode(t).split(".")[0] for _, t in path)
        regs, smem = res.get(name, (None, 0))
        threads = threads_of(dem)
        # (the wgmma kernels' x tiles are dynamic shared memory, which -res-usage does not show)
        small = bool(SMALL_M.search(dem))
        ctas = ctas_per_sm(regs, smem + ring_bytes(dem), threads) if regs and threads and small else None
        shape = stage_shape(dem)
        two_ahead = re.search(r"wgmma_kernel<(?:small_m::)?(Int4Frag|Int8Frag|LutFrag)<", dem)
        # (the ring kernels hold no weights in registers ahead: nothing to wait on; -1, printed "-")
        waits = len(early_uses(path)) if two_ahead else -1 if ring_bytes(dem) else len(prefetch_uses(ins))
        if shape:
            stages = mma / shape[0]
            bpi = shape[1] * stages / len(path)
            ahead = RING_STAGES - 1 if ring_bytes(dem) else 1  # stages of weights in flight
            inflight = ctas * threads // 32 * shape[1] * ahead / 1024 if ctas and small else None
            rows.append(Row(dem, len(path) / stages, mma / stages, bpi, bpi * per_inst, regs, ctas, inflight, mix, waits))
        else:
            rows.append(Row(dem, len(path), mma, None, None, regs, ctas, None, mix, waits))
    return rows


class Loop(NamedTuple):
    lo: int  # the loop's first instruction (a back edge's target)
    hi: int  # the back edge
    size: int  # instructions between them, every branch side included
    path: int  # instructions on hot_path's way to the back edge (no mma or 16-byte load in it: the shortest)
    mix: collections.Counter  # opcodes of the body


def loops(ins) -> list[Loop]:
    """Every loop of a function (a backward branch), innermost first within an address range. For
    kernels without an mma main loop (the block-circulant FFT kernels): what a trip of each loop costs,
    to be weighed by its trip count (docs/structured.md counts the large-M kernel this way)."""
    out = []
    for a, t in ins:
        m = _BRA.search(t)
        if m and int(m.group(1), 16) <= a:
            lo = int(m.group(1), 16)
            body = [(x, u) for x, u in ins if lo <= x <= a]
            out.append(Loop(lo, a, len(body), len(hot_path(ins, lo, a)),
                            collections.Counter(opcode(u).split(".")[0] for _, u in body)))
    return sorted(out, key=lambda lp: (lp.hi - lp.lo, lp.lo))


def print_loops(so: str, arch: str, pattern: str) -> None:
    for name, ins in functions(disassemble(so, arch)):
        dem = demangle(name)
        if not re.search(pattern, dem):
            continue
        print(f"{dem[:110]}: {len(ins)} instructions")
        for lp in sorted(loops(ins), key=lambda x: x.lo):
            print(f"  {lp.lo:#07x}..{lp.hi:#07x} {lp.size:5d} (hot trip {lp.path:4d})  "
                  + " ".join(f"{k}:{v}" for k, v in lp.mix.most_common(8)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", default=os.path.join(os.path.dirname(__file__), "..", "reparam_kernels", "_C.abi3.so"))
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--filter", default=LOOP_KERNELS)
    ap.add_argument("--ops", action="store_true", help="also print the opcode mix of each hot path")
    ap.add_argument("--loops", action="store_true",
                    help="print every loop of the kernels --filter matches (size, hot trip, opcode mix) instead")
    args = ap.parse_args()
    if args.loops:
        print_loops(args.so, args.arch, args.filter)
        return
    print(f"{'inst':>5} {'mma':>4} {'B/inst':>6} {'ceiling TB/s':>12} {'regs':>4} {'CTA/SM':>6} {'KB in flight':>12}"
          f" {'pf-use':>6}  kernel (per stage on the hot path, {args.arch})")
    for r in budget(args.so, args.arch, args.filter):
        b = f"{r.bytes_per_inst:6.2f} {r.ceiling_tbs:12.2f}" if r.bytes_per_inst else f"{'':>6} {'':>12}"
        f = f"{r.inflight_kb:12.0f}" if r.inflight_kb else f"{'':>12}"
        c = f"{r.ctas_per_sm:6d}" if r.ctas_per_sm else f"{'-':>6}"
        w = f"{r.prefetch_uses:6d}" if r.prefetch_uses >= 0 else f"{'-':>6}"
        print(f"{r.inst:5.0f} {r.mma:4.0f} {b} {r.regs or 0:4d} {c} {f} {w}  {r.kernel[:100]}")
        if args.ops:
            print("      " + " ".join(f"{k}:{v}" for k, v in r.mix.most_common()))
    print(f"(ceiling: bytes per instruction x {ISSUE_PER_CLK} issues/clock x {SMS} SMs x {CLOCK_HZ / 1e9:.2f} GHz;"
          f" the H200's measured copy is {COPY_TBS} TB/s; pf-use: instructions in the next stage's load branch"
          f" that wait on its loads (wgmma int4 / int8 / lut: reads of the loads of two stages ahead before the"
          f" next stage's wgmmas), which should be 0)")


if __name__ == "__main__":
    main()
