"""Compile the quantized Triton kernels for a GPU architecture on a machine without one, and print
what the compiler made of each tile class: registers, spills, shared memory, the global loads'
widths, cp.async copies (the software pipeline) and the SASS instructions per weight byte in the
K loop, and the bandwidth that count allows. A CPU-side check of the Triton backend's code before a GPU
times it.

    python tools/triton_aot.py            # sm_80 and sm_90, every op and tile class
    python tools/triton_aot.py --arch 90 --op int4_linear
"""
import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reparam_kernels.triton import _tiles  # noqa: E402

(int4_linear, grouped_int4, grouped_int8, grouped_vq, grouped_lut, grouped_lowrank, int8_linear, lut_linear, vq_linear,
 matmul_nt, pivoted) = (importlib.import_module(f"reparam_kernels.triton.{op}")
                        for op in ("int4_linear", "grouped_int4_linear", "grouped_int8_linear", "grouped_vq_linear",
                                   "grouped_lut_linear", "grouped_lowrank_linear", "int8_linear", "lut_linear", "vq_linear", "_matmul_nt",
                        "pivoted_lowrank_linear"))

GROUPED_EXPERTS = 8
SHAPES = {"gemv": (1, 8192, 8192), "m16": (16, 8192, 8192), "m256": (256, 8192, 8192)}
COMMON = {"bias_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "k_split": "i32",
          "stride_qn": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_ys": "i32"}
# op: (kernel, argument types, constexprs, the GEMV's K step as the launcher asks, weight bytes per weight)
KERNELS = {
    "int4_linear": (int4_linear._int4_linear_kernel,
                    {"x_ptr": "*fp16", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "G": "i32", "one_bits": "i32"},
                    {"GROUP": 128}, 128, 0.5),
    # a MoE layer's int4 experts (8 here); SHAPES' M = the routed rows of all experts together
    "grouped_int4": (grouped_int4._grouped_int4_kernel,
                     {"x_ptr": "*fp16", "off_ptr": "*i64", "ends_ptr": "*i64", "q_ptr": "*u8", "s_ptr": "*fp16",
                      "z_ptr": "*fp16", "T": "i32", "G": "i32", "E": "i32", "tiles_m": "i32"}, {"GROUP": 128}, 128, 0.5),
    "grouped_int8": (grouped_int8._grouped_int8_kernel,
                     {"x_ptr": "*fp16", "off_ptr": "*i64", "ends_ptr": "*i64", "q_ptr": "*i8", "s_ptr": "*fp16",
                      "T": "i32", "E": "i32", "tiles_m": "i32"}, {}, 128, 1.0),
    "grouped_vq": (grouped_vq._grouped_vq_kernel,
                   {"x_ptr": "*fp16", "off_ptr": "*i64", "ends_ptr": "*i64", "c_ptr": "*u8", "book_ptr": "*fp16",
                    "T": "i32", "E": "i32", "tiles_m": "i32", "rows_per_book": "i32", "book_stride": "i32",
                    "books_per_expert": "i32"}, {"D": 2}, 128, 0.5),
    # log 4-bit experts: a table a row (rows_per_table = 1)
    "grouped_lut": (grouped_lut._grouped_lut_kernel,
                    {"x_ptr": "*fp16", "off_ptr": "*i64", "ends_ptr": "*i64", "c_ptr": "*u8", "lut_ptr": "*fp16",
                     "T": "i32", "E": "i32", "tiles_m": "i32", "rows_per_table": "i32", "tables_per_expert": "i32"},
                    {}, 128, 0.5),
    # low-rank experts of ragged ranks (max rank N/4 here): step 1 x·wᵀ, pivoted (x's columns gathered; N = the
    # max rank), step 2 h·uᵀ (h fp32; K = the max rank). The experts' row lengths are runtime values, so the
    # weight loads cannot be proved aligned: scalar loads (tools' report says how many)
    "grouped_lowrank_v": (grouped_lowrank._grouped_lowrank_kernel,
                          {"a_ptr": "*fp16", "off_ptr": "*i64", "ends_ptr": "*i64", "b_ptr": "*fp16", "fo_ptr": "*i64",
                           "perm_ptr": "*i64", "T": "i32", "E": "i32", "tiles_m": "i32", "stride_am": "i32",
                           "b_numel": "i64", "R": "i32"}, {"SECOND": False, "PIVOTED": True, "ALIGN": 8}, 128, 2.0),
    "grouped_lowrank_u": (grouped_lowrank._grouped_lowrank_kernel,
                          {"a_ptr": "*fp32", "off_ptr": "*i64", "ends_ptr": "*i64", "b_ptr": "*fp16", "fo_ptr": "*i64",
                           "perm_ptr": "*i64", "T": "i32", "E": "i32", "tiles_m": "i32", "stride_am": "i32",
                           "b_numel": "i64", "R": "i32"}, {"SECOND": True, "PIVOTED": False, "ALIGN": 8}, 128, 2.0),
    "int8_linear": (int8_linear._int8_linear_kernel, {"x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp16"},
                    {}, 64, 1.0),
    "lut_linear": (lut_linear._lut_linear_kernel,
                   {"x_ptr": "*fp16", "c_ptr": "*u8", "lut_ptr": "*fp16", "rows_per_table": "i32"}, {}, 64, 0.5),
    # GPTVQ's format: a byte a pair of inputs, one 256-pair codebook per layer (rows_per_book = N)
    "vq_linear": (vq_linear._vq_linear_kernel,
                  {"x_ptr": "*fp16", "c_ptr": "*u8", "book_ptr": "*fp16", "rows_per_book": "i32", "book_stride": "i32"},
                  {"D": 2}, 64, 0.5),
    # the low-rank ops' products (x·vᵀ, t·uᵀ): 16-bit weights, 2 bytes each
    "matmul_nt": (matmul_nt._matmul_nt_kernel,
                  {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "stride_am": "i32", "stride_bn": "i32",
                   "stride_cm": "i32", "stride_cs": "i32"}, {}, 128, 2.0),
    # pivoted low rank's first product t = x[:, perm[:r]] + x[:, perm[r:]]·wᵀ (N = r, K = K − r; x's columns gathered)
    "pivot_t": (pivoted._pivot_t_kernel,
                {"x_ptr": "*fp16", "w_ptr": "*fp16", "perm_ptr": "*i64", "t_ptr": "*fp32", "R": "i32", "KR": "i32",
                 "stride_wr": "i32", "stride_ts": "i32"}, {}, 128, 2.0),
}


def _bin(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(op, cls, arch, dtype="fp16"):
    fn, sig_extra, const_extra, gemv_bk, bytes_per_weight = KERNELS[op]
    bk_limit = const_extra.get("GROUP", 128)  # int4: the group size (a power of two here)
    m, n, k = SHAPES[cls]
    if op.startswith("grouped_lowrank"):
        n = n // 4 if op.endswith("_v") else n  # step 1's columns: the max rank
        k = n // 4 if op.endswith("_u") else k  # step 2's inner length: the max rank
        plan = grouped_lowrank.plans(m, GROUPED_EXPERTS, n, k, n, fp32=dtype == "fp32")[0]
    if op.startswith("grouped_") and not op.startswith("grouped_lowrank"):  # (m256: 256 rows of 8 experts ...
        plan = grouped_int4.plan(m, GROUPED_EXPERTS, n, k, bk_limit, fp32=dtype == "fp32") if op == "grouped_int4" \
            else {"grouped_int8": grouped_int8, "grouped_vq": grouped_vq, "grouped_lut": grouped_lut}[op].plan(
                m, GROUPED_EXPERTS, n, k, fp32=dtype == "fp32")
    if op.startswith("grouped_"):  # ... are 8 row tiles of 32, the packed map)
        t = plan.tiles
        const_extra = dict(const_extra, PACKED=plan.packed, SEARCH=plan.search)
        if plan.gemv:  # int4's GEMV form (one row an expert): its own kernel, the codes as int32 words
            fn, sig_extra = grouped_int4._grouped_int4_gemv_kernel, dict(sig_extra, q_ptr="*i32", one_bits="i32")
    else:
        t = _tiles.choose(m, n, k, torch.device("cpu"), bk_limit=bk_limit, fp32=dtype == "fp32", gemv_bk=gemv_bk,
                          sms=132)  # the splits an H200 gets
    sig = {name: sig_extra.get(name, COMMON.get(name)) for name in fn.arg_names}
    sig = {name: v.replace("fp16", dtype) if v else v for name, v in sig.items()}
    consts = dict(const_extra, HAS_BIAS=False, IEEE=dtype == "fp32", DOT_F32=False, BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv)
    # what the JIT specializes at a launch: integer arguments equal to 1 become constants, pointers and
    # integers divisible by 16 are marked so (how loads get vectorized)
    values = dict(M=m, N=n, K=k, k_split=t.k_split, stride_qn=k // 2, stride_xm=k, stride_ym=n, stride_ys=m * n,
                  G=k // const_extra.get("GROUP", 1), rows_per_table=1, stride_am=k, stride_bn=k, stride_cm=n,
                  stride_cs=m * n, one_bits=0x3F800000, R=n, KR=k, stride_wr=k, stride_ts=m * n, rows_per_book=n,
                  book_stride=512, T=m, tiles_m=triton.cdiv(m, t.bm), E=GROUPED_EXPERTS,
                  books_per_expert=n // 64,  # grouped_vq: GPTVQ's codebook per 64 rows
                  tables_per_expert=n,  # grouped_lut: log 4-bit's table a row
                  b_numel=GROUPED_EXPERTS * n * k)
    if op == "int4_linear" and t.gemv:  # the GEMV reads the codes as int32 words (int4_linear.py)
        sig["q_ptr"], values["stride_qn"] = "*i32", k // 8
    consts = {a: v for a, v in consts.items() if a in sig}  # (pivot_t has no bias)
    consts.update({a: 1 for a, v in values.items() if v == 1 and a in sig})
    for name in consts:
        sig[name] = "constexpr"
    missing = [a for a, v in sig.items() if v is None]
    assert not missing, f"{op}: no type for {missing}"
    aligned = [i for i, a in enumerate(fn.arg_names)
               if sig[a].startswith("*") or (sig[a] == "i32" and values[a] % 16 == 0)]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": t.warps, "num_stages": t.stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    loads = collections.Counter(re.findall(r"ld\.global(?:\.\w+)*?\.(v\d\.)?(b\d+|u\d+|f\d+|s\d+)", c.asm["ptx"]))
    cp_async = len(re.findall(r"cp\.async\.(?:ca|cg)", c.asm["ptx"]))
    loop = _loop_instructions(sass)
    weight_bytes = t.bn * t.bk * bytes_per_weight
    return dict(op=op, cls=cls, arch=arch, tiles=t._asdict(), regs=regs, spill_bytes=local,
                shared=c.metadata.shared, loads={f"{v or ''}{w}": cnt for (v, w), cnt in loads.items()},
                cp_async=cp_async, loop_instructions=loop,
                instructions_per_weight_byte=round(loop * t.warps / weight_bytes, 3) if loop else None)


def issue_ceiling_tbps(r, sms=132, clock_ghz=1.98):
    """Weight bytes a second the K loop can stream if issuing instructions is all it does: 4 warp
    instructions per SM per clock (as tools/sass_budget.py counts the CUDA kernels)."""
    per_byte = r["instructions_per_weight_byte"]
    return round(4 * sms * clock_ghz * 1e9 / per_byte / 1e12, 2) if per_byte else None


def _loop_instructions(sass):
    """Instructions of the longest backward branch's loop in the SASS (the K loop), per warp."""
    best = 0
    for ln in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/.*\bBRA\s+(?:`\()?0x([0-9a-f]+)", ln)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            best = max(best, (int(m.group(1), 16) - int(m.group(2), 16)) // 16 + 1)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="80, 90 (default both)")
    ap.add_argument("--op", action="append", choices=sorted(KERNELS))
    ap.add_argument("--cls", action="append", choices=sorted(SHAPES))
    ap.add_argument("--dtype", action="append", choices=["fp16", "bf16", "fp32"], help="x's dtype (default fp16)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for arch in a.arch or [80, 90]:
        for op in a.op or sorted(KERNELS):
            for cls, dtype in ((c, d) for c in a.cls or list(SHAPES) for d in a.dtype or ["fp16"]):
                r = compile_one(op, cls, arch, dtype)
                if a.json:
                    print(json.dumps(dict(r, dtype=dtype)), flush=True)
                    continue
                t = r["tiles"]
                print(f"sm_{arch} {op:12s} {cls:5s} {dtype} BM{t['bm']:>3} BN{t['bn']:>3} BK{t['bk']:>3} w{t['warps']} s{t['stages']}"
                      f" | regs {r['regs']:3d} spill {r['spill_bytes']:4d} B smem {r['shared']:6d}"
                      f" | loads {r['loads']} cp.async {r['cp_async']} | loop {r['loop_instructions']} instr/warp,"
                      f" {r['instructions_per_weight_byte']} warp-instr per weight byte"
                      f" (issue ceiling {issue_ceiling_tbps(r)} TB/s on an H200)")


if __name__ == "__main__":
    main()
