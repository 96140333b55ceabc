"""Versions, GPU, extension status, and which backend runs each op (and why).

    python -m reparam_kernels env [--json]
"""
import argparse
import json
import os
import platform
import re
import sys

import torch

from .._env import atoll as _atoll, min_m as _min_m

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _gpus():
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                    "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2 ** 30, 1)})
    return out


def pivoted_gather():
    """When pivoted factors on the two cuBLAS products gather x's columns instead of expanding w
    (csrc/lowrank_large_m.cuh gather_pays: unset = while 3 M <= 2 r, else atoi != 0 = always, 0 = never)."""
    if not os.environ.get("REPARAM_PIVOTED_GATHER", ""):
        return "while 3 M <= 2 r"
    return "always" if _atoll("REPARAM_PIVOTED_GATHER", 0) != 0 else "never"


def _atof(name, default):
    """Environment variable `name` read as the C++ side reads it (atof: a leading number, else 0), `default`
    when unset or empty."""
    v = os.environ.get(name, "")
    if not v:
        return default
    lead = re.match(r"\s*([+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)", v)
    return float(lead.group(1)) if lead else 0.0


def dequant_scratch_bytes():
    """The quantized ops' scratch budget for dequantize + cuBLAS in bytes (csrc/quant_dequant_mm.cuh
    dequant_scratch_bytes: REPARAM_DEQUANT_SCRATCH_MB, default 256; 0: none, the whole weight at once)."""
    mb = _atof("REPARAM_DEQUANT_SCRATCH_MB", 256.0)
    return mb * 1048576.0 if mb > 0 else 0.0


def dequant_pieces(M, N, K, elem, sms, budget=None):
    """(rows a piece, pieces) that dequantize + cuBLAS takes W [N, K] in for M rows of x on `sms` SMs: the
    same rule as csrc/quant_dequant_mm.cuh dequant_chunk_rows (tested against it through the CUDA-on-CPU
    harness): the whole weight where it fits the budget, else equal pieces of a multiple of 128 rows, about
    the budget's, but never fewer than fill the SMs with 128 x 128 output tiles."""
    budget = dequant_scratch_bytes() if budget is None else budget
    row_bytes = K * elem
    if budget <= 0 or N * row_bytes <= budget:
        return N, 1
    budget_rows = max(128, int(budget / row_bytes) // 128 * 128)
    m_tiles = max(1, -(-M // 128))
    cap = max(budget_rows, 128 * -(-max(1, sms) // m_tiles))
    if cap >= N:
        return N, 1
    per = -(-N // -(-N // cap))  # equal pieces no larger than cap, rounded up to 128 rows
    rows = min(N, -(-per // 128) * 128)
    return rows, -(-N // rows)


def bc_cols_max_m(toeplitz=False):
    """Rows up to which BlockCirculantLinear (ToeplitzLinear: toeplitz=True) decodes through
    block_circulant_cols_linear in eval mode: REPARAM_BC_COLS_MAX_M, default 16 (<= 0: never, for both:
    run_gpu.sh's veto after a failed smoke run); Toeplitz REPARAM_TOEPLITZ_COLS_MAX_M, default 256 — run 3 timed
    the columns kernel 1.3-2.4x faster than the FFT paths for Toeplitz layers at M = 64 and 256 (1024^2 and
    4096^2), where block-circulant ones lose to the FFT kernels above M = 16. nn/structured.py reads them once,
    at import."""
    m = max(0, _atoll("REPARAM_BC_COLS_MAX_M", 16))
    if not toeplitz or m == 0:
        return m
    return max(0, _atoll("REPARAM_TOEPLITZ_COLS_MAX_M", 256))


RING_MODES = ("off", "weights", "weights and x", "x and weights above M = 8")
RING_WEIGHTS, RING_X = (1, 2), 3  # the modes with the weights' ring on every tile; the default (kRingX there)


def _ring_mode(value):
    """REPARAM_SMALL_M_RING as csrc/small_m_launch.cuh's ring_mode() reads it (unset or empty: RING_X)."""
    return RING_X if value == "" else {"1": 1, "2": 2}.get(value[:1], 0)


def cuda_paths():
    """Which CUDA path each batch size M takes, as the environment switches set it."""
    small = not os.environ.get("REPARAM_SMALL_M", "").startswith("0")
    return {"small_m": {"on": small, "max_m": 64, "switch": "REPARAM_SMALL_M",
                        "ops": "int4_linear, int8_linear, lut_linear, vq_linear (pairs), lowrank_linear, "
                               "pivoted_lowrank_linear",
                        # M <= 8: the transposed tile (csrc/small_m_gemm.cuh, MT = 0); off: the M <= 16 one
                        "transposed_max_m": 0 if os.environ.get("REPARAM_SMALL_M_T", "").startswith("0") else 8,
                        "transposed_switch": "REPARAM_SMALL_M_T",
                        # quantized ops' register loop: x of the next stage prefetched into L1 (off by default)
                        "x_ahead": os.environ.get("REPARAM_SMALL_M_X_AHEAD", "").startswith("1"),
                        "x_ahead_switch": "REPARAM_SMALL_M_X_AHEAD",
                        # quantized ops' register loop: stream-K where the even split leaves slots idle (off by default)
                        "stream_k": os.environ.get("REPARAM_SMALL_M_STREAM_K", "").startswith("1"),
                        "stream_k_switch": "REPARAM_SMALL_M_STREAM_K",
                        # int4 at M <= 8, groups of a multiple of 128: scales applied after the mma (off by default)
                        "post_scale": os.environ.get("REPARAM_SMALL_M_POST_SCALE", "").startswith("1"),
                        "post_scale_switch": "REPARAM_SMALL_M_POST_SCALE",
                        # an explicit 0 (run_gpu.sh after a failed smoke run): no script switches them on
                        "x_ahead_vetoed": os.environ.get("REPARAM_SMALL_M_X_AHEAD", "") == "0",
                        "stream_k_vetoed": os.environ.get("REPARAM_SMALL_M_STREAM_K", "") == "0",
                        "post_scale_vetoed": os.environ.get("REPARAM_SMALL_M_POST_SCALE", "") == "0",
                        # quantized ops: a shared-memory ring (csrc/small_m_launch.cuh ring_mode; 1: the
                        # weights, 2: x too where it fits, 3 = unset, the default measured on the H200: x and the
                        # weights above M = 8 only; anything else: off)
                        "ring": _ring_mode(os.environ.get("REPARAM_SMALL_M_RING", "")),
                        # an explicit 0 (run_gpu.sh after a failed smoke run): no script switches it on
                        "ring_vetoed": os.environ.get("REPARAM_SMALL_M_RING", "") == "0",
                        "ring_switch": "REPARAM_SMALL_M_RING",
                        # vq_linear's pairs have a switch of their own besides this path's (csrc/vq_linear.cu)
                        "vq_pairs": not os.environ.get("REPARAM_VQ_SMALL_M", "").startswith("0"),
                        "vq_pairs_switch": "REPARAM_VQ_SMALL_M",
                        # the grouped ops' small-M kernel (any T; csrc/grouped_quant.cuh): its own switch; off (or
                        # where a layout does not fit it) a plain fallback kernel
                        "grouped": not os.environ.get("REPARAM_GROUPED_SMALL_M", "").startswith("0"),
                        # (grouped_vq_linear's pairs obey the vq_pairs switch too)
                        "grouped_ops": "grouped_int4_linear, grouped_int8_linear, grouped_vq_linear, grouped_lut_linear, "
                                       "grouped_lowrank_linear (two launches)",
                        "grouped_switch": "REPARAM_GROUPED_SMALL_M"},
            "wgmma": {"on": not os.environ.get("REPARAM_WGMMA", "").startswith("0"),
                      "min_m": max(1, _atoll("REPARAM_WGMMA_MIN_M", 65)),  # csrc/quant_wgmma.cuh min_m()
                      # weights also prefetched into L2 this many stages ahead (csrc/quant_wgmma.cuh l2_ahead();
                      # <= 2: off, the registers' loads run 2 ahead)
                      "l2_ahead": min(16, max(0, _atoll("REPARAM_WGMMA_L2_AHEAD", 4))),
                      "l2_ahead_switch": "REPARAM_WGMMA_L2_AHEAD",
                      "switch": "REPARAM_WGMMA",
                      "ops": "int4_linear, int8_linear, lut_linear, lowrank_linear, pivoted_lowrank_linear; sm_90"},
            "dequant_cublas": {"min_m": _min_m("REPARAM_DEQUANT_MIN_M", 129), "switch": "REPARAM_DEQUANT_MIN_M",
                               "ops": "int8_linear, int4_linear, lut_linear, vq_linear",
                               # rows of W dequantized a piece at a time within this budget (0: the whole weight)
                               "scratch_mb": dequant_scratch_bytes() / 1048576.0,
                               "scratch_switch": "REPARAM_DEQUANT_SCRATCH_MB"},
            # plain factors at every M, pivoted ones from M = 2 (csrc/lowrank_large_m.cuh min_m; one variable sets both)
            "lowrank_cublas": {"min_m": _min_m("REPARAM_LOWRANK_CUBLAS_MIN_M", 1),
                               "pivoted_min_m": _min_m("REPARAM_LOWRANK_CUBLAS_MIN_M", 2),
                               "switch": "REPARAM_LOWRANK_CUBLAS_MIN_M",
                               "ops": "lowrank_linear, pivoted_lowrank_linear",
                               # the fused decode launch prefetches u into L2 (where u <= half the L2): off since
                               # run 3 timed it slower, on where the variable starts with 1
                               "prefetch_u": os.environ.get("REPARAM_LOWRANK_PREFETCH_U", "").startswith("1"),
                               "prefetch_u_switch": "REPARAM_LOWRANK_PREFETCH_U",
                               # pivoted factors on the two products: x's columns gathered while 3 M <= 2 r, else
                               # w expanded (csrc/lowrank_large_m.cuh gather_pays); 0 / 1: never / always
                               "pivoted_gather": pivoted_gather(),
                               "pivoted_gather_switch": "REPARAM_PIVOTED_GATHER",
                               # both forms at M <= 8 as two GEMVs in one launch before every route above
                               # (csrc/lowrank_gemv.cuh; off until timed: on only where the variable starts with 1)
                               "gemv": os.environ.get("REPARAM_LOWRANK_GEMV", "").startswith("1"),
                               "gemv_max_m": 8,
                               "gemv_vetoed": os.environ.get("REPARAM_LOWRANK_GEMV", "") == "0",  # (a failed smoke run)
                               "gemv_switch": "REPARAM_LOWRANK_GEMV"},
            "bc_large_m": {"min_m": _min_m("REPARAM_BC_LARGE_M_MIN_M", 64),  # csrc/block_circulant_large_m.cuh
                           "switch": "REPARAM_BC_LARGE_M_MIN_M",
                           "ops": "block_circulant_linear, toeplitz_linear"},
            # BlockCirculantLinear in eval mode: block_circulant_cols_linear (tensor cores on the blocks' columns)
            "bc_cols": {"max_m": bc_cols_max_m(), "switch": "REPARAM_BC_COLS_MAX_M",
                        "toeplitz_max_m": bc_cols_max_m(toeplitz=True),
                        "toeplitz_switch": "REPARAM_TOEPLITZ_COLS_MAX_M",
                        "ops": "BlockCirculantLinear, ToeplitzLinear (eval mode) -> block_circulant_cols_linear",
                        # K split over at most this many CTAs (csrc/block_circulant_cols_linear.cu plan()); None:
                        # up to 32 where the output tiles leave SMs idle, else none
                        "max_splits": (max(1, _atoll("REPARAM_BC_COLS_SPLITS", 32))
                                       if os.environ.get("REPARAM_BC_COLS_SPLITS") else None),
                        "splits_switch": "REPARAM_BC_COLS_SPLITS",
                        # rows a CTA takes above M = 8 (16 unless the switch says 8; the same cu file's tile_rows())
                        "tile_rows": 8 if _atoll("REPARAM_BC_COLS_TILE_ROWS", 16) == 8 else 16,
                        "tile_rows_switch": "REPARAM_BC_COLS_TILE_ROWS",
                        "tile_rows_vetoed": os.environ.get("REPARAM_BC_COLS_TILE_ROWS", "") == "0",
                        # one wide CTA a tile (K split inside it) wherever those CTAs fit at once; off until timed
                        "wide": os.environ.get("REPARAM_BC_COLS_WIDE", "").startswith("1"),
                        "wide_switch": "REPARAM_BC_COLS_WIDE",
                        "wide_vetoed": os.environ.get("REPARAM_BC_COLS_WIDE", "") == "0"}}


def collect():
    """Everything `env` reports, as a dict (the --json output)."""
    import reparam_kernels
    from reparam_kernels import _dispatch, _extension

    backends = {}
    for op in sorted(_dispatch.REGISTRY):
        backends[op] = {}
        for device in ("cuda", "cpu"):
            for dname, dtype in DTYPES.items():
                backend, why = _dispatch.backend_for(op, device, dtype)
                backends[op][f"{device}/{dname}"] = {"backend": backend, "why": why}
    return {
        "reparam_kernels": reparam_kernels.__version__,
        "package_dir": os.path.dirname(os.path.abspath(reparam_kernels.__file__)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "gpus": _gpus(),
        "extension_loaded": bool(_extension.LOADED),
        "extension": _extension.REASON,
        "backends": backends,
        "cuda_paths": cuda_paths(),
    }


def render(info):
    lines = [f"reparam_kernels {info['reparam_kernels']}  ({info['package_dir']})",
             f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU-only build'}), "
             f"triton {info['triton'] or 'not installed'}"
             + (f", TRITON_INTERPRET={info['TRITON_INTERPRET']}" if info["TRITON_INTERPRET"] else "")]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"GPU {g['index']}: {g['name']}, {g['capability']}, {g['sms']} SMs, {g['memory_gib']} GiB")
    else:
        lines.append("GPU: none visible (the cuda rows below say what would run on one)")
    lines.append(f"CUDA extension: {'loaded' if info['extension_loaded'] else 'NOT loaded'} — {info['extension']}")
    paths = info["cuda_paths"]
    sm, dq, lr = paths["small_m"], paths["dequant_cublas"], paths["lowrank_cublas"]
    lines.append("CUDA paths by batch M (docs/quant.md, docs/lowrank_kernel.md, docs/structured.md):")
    lines.append(f"  M <= {sm['max_m']}: register-fed tensor cores ({sm['ops']}): "
                 f"{'on' if sm['on'] else 'OFF'} [{sm['switch']}]; M <= 8 on its transposed tile: "
                 f"{'on' if sm['transposed_max_m'] else 'OFF'} [{sm['transposed_switch']}]; x prefetched "
                 f"into L1 a stage ahead: {'on' if sm['x_ahead'] else 'off'} [{sm['x_ahead_switch']}]; stream-K where the even split "
                 f"leaves slots idle: {'on' if sm['stream_k'] else 'off'} [{sm['stream_k_switch']}]; "
                 f"int4 scales after the mma (M <= 8, groups of 128k): {'on' if sm['post_scale'] else 'off'} "
                 f"[{sm['post_scale_switch']}]; "
                 f"shared-memory ring: {RING_MODES[sm['ring']]} [{sm['ring_switch']}]; "
                 f"vq_linear pairs: {'on' if sm['vq_pairs'] else 'OFF'} [{sm['vq_pairs_switch']}]")
    lines.append(f"  any M, one expert's rows a CTA ({sm['grouped_ops']}): the same loop "
                 f"{'on' if sm['grouped'] else 'OFF (a plain fallback kernel)'} [{sm['grouped_switch']}]")
    wg = paths["wgmma"]
    lines.append(f"  {wg['min_m']} <= M < the cuBLAS thresholds below: warpgroup MMA ({wg['ops']}): "
                 f"{'on' if wg['on'] else 'OFF'} [{wg['switch']}, REPARAM_WGMMA_MIN_M]; L2 prefetch "
                 f"{str(wg['l2_ahead']) + ' stages ahead' if wg['l2_ahead'] > 2 else 'off'} [{wg['l2_ahead_switch']}]")
    for name, d in (("dequantize + cuBLAS", dq), ("two cuBLAS GEMMs", lr),
                    ("spectrum sums in registers", paths["bc_large_m"])):
        when = f"M >= {d['min_m']}" if d["min_m"] else "never"
        if d.get("pivoted_min_m") not in (None, d["min_m"]):
            when += f" (pivoted factors: M >= {d['pivoted_min_m']})"
        extra = ""
        if d["min_m"] and "scratch_mb" in d:
            extra = (f"; W a piece of rows at a time within {d['scratch_mb']:g} MB [{d['scratch_switch']}]"
                     if d["scratch_mb"] else f"; W whole [{d['scratch_switch']}]")
        lines.append(f"  {name} ({d['ops']}): {when} [{d['switch']}]{extra}")
    bc = paths["bc_cols"]
    lines.append(f"  block-circulant decode from the blocks' columns ({bc['ops']}): "
                 f"{'M <= ' + str(bc['max_m']) if bc['max_m'] else 'never'} [{bc['switch']}] (Toeplitz: "
                 f"{'M <= ' + str(bc['toeplitz_max_m']) if bc['toeplitz_max_m'] else 'never'} "
                 f"[{bc['toeplitz_switch']}]);"
                 " K split over "
                 + ("the warps of one wide CTA a tile wherever the wide CTAs fit at once" if bc["wide"]
                    else f"<= {bc['max_splits']} CTAs" if bc["max_splits"]
                    else "<= 32 CTAs where the output tiles leave SMs idle")
                 + f" [{bc['wide_switch']}, {bc['splits_switch']}]; {bc['tile_rows']} rows a CTA above M = 8 "
                 f"[{bc['tile_rows_switch']}]")
    lines.append(f"  pivoted factors on the two cuBLAS GEMMs: x's columns gathered {lr['pivoted_gather']}, else the "
                 f"right factor expanded [{lr['pivoted_gather_switch']}]")
    lines.append(f"  low rank (plain and pivoted) at M <= {lr['gemv_max_m']} as two GEMVs in one launch, u staged in shared memory: "
                 f"{'on' if lr['gemv'] else 'off'} [{lr['gemv_switch']}]")
    lines.append(f"  low-rank decode launch (M below that): u prefetched into L2 during phase 1: "
                 f"{'on' if lr['prefetch_u'] else 'off'} [{lr['prefetch_u_switch']}]")
    lines.append("")
    lines.append("backend per op (device/dtype: backend — why):")
    for op, cases in info["backends"].items():
        lines.append(f"  {op}")
        for case, b in cases.items():
            lines.append(f"    {case:10} {b['backend']:9} — {b['why']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reparam_kernels env", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
