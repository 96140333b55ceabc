"""Quantized linears (int8_linear, int4_linear, lut_linear, vq_linear) vs cuBLAS fp16/bf16 F.linear, in one run.

    python benchmarks/bench_quant.py [--quick] [--ops int8_linear,int4_linear,lut_linear,vq_linear] [--dtypes fp16,bf16]

Peers in the same run: torch's int4 "tinygemm" (``torch._weight_int4pack_mm``,
group 128, bf16 only: it takes no fp16) for int4_linear, our own Triton
kernel for every op, and the CUDA paths the op does not take at that M
(``other_paths``: the general GEMV / WMMA path, dequantize + cuBLAS, wgmma and
the small-M path, each where another one runs). cuBLAS runs the dequantized weight in x's dtype. Each
case is checked against float64 (x and the dequantized weight in float64)
before it is timed; a contender that fails the check is not timed (recorded in
the file's ``failures``). Writes benchmarks/results/<gpu>/{int8_linear,
int4_linear,lut_linear,vq_linear}.json in DESIGN.md's format, each row with ``bytes``
(the packed weight, its scales/tables, x and y moved once) and ``flops``.
"""
import os

import torch
import torch.nn.functional as F

from common import (DTYPES, Contender, Results, bench_arg_parser, check_rows, measure_ceilings, progress,
                    require_cuda, rotation_count, run_case, shapes_and_batches, with_env)

import reparam_kernels
from reparam_kernels import _dispatch
from reparam_kernels.cli.env import RING_X, cuda_paths, dequant_pieces
from reparam_kernels import triton as rk_triton
from reparam_kernels.compress.quantize import pack_int4
from reparam_kernels.reference.int4_linear import dequantize_int4
from reparam_kernels.reference.lut_linear import dequantize_lut
from reparam_kernels.reference.vq_linear import dequantize_vq

OPS = ("int4_linear", "int8_linear", "lut_linear", "vq_linear")  # int4 first: a time-capped run measures it first
GROUP = 128
LUT_TABLES = "per_row"  # one 16-entry table per output row, as log quantization uses


def make_weights(op, N, K, dtype, device, gen):
    """Random packed weights of `op` (codes uniform, scales so that outputs are O(1)) -> (args, params, bytes)."""
    amp = 1.0 / (4.0 * K ** 0.5)
    if op == "int8_linear":
        q = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=gen)
        s = ((torch.rand(N, device=device, generator=gen) + 0.5) * amp / 64).to(dtype)
        return (q, s), {"bits": 8, "group": "channel"}
    if op == "int4_linear":
        q = torch.randint(0, 16, (N, K), device=device, dtype=torch.uint8, generator=gen)
        s = ((torch.rand(N, K // GROUP, device=device, generator=gen) + 0.5) * amp / 4).to(dtype)
        z = torch.randint(0, 16, (N, K // GROUP), device=device, generator=gen).to(dtype)
        return (pack_int4(q), s, z, GROUP), {"bits": 4, "group": GROUP}
    if op == "vq_linear":  # GPTVQ's format: a byte a pair of inputs, one 256-pair codebook per layer
        q = torch.randint(0, 256, (N, K // 2), device=device, dtype=torch.uint8, generator=gen)
        books = (torch.randn(1, 256, 2, device=device, generator=gen) * amp).to(dtype)
        return (q, books), {"bits": 4, "d": 2, "codebooks": "per_layer"}
    q = torch.randint(0, 16, (N, K), device=device, dtype=torch.uint8, generator=gen)
    lut = (torch.randn(N, 16, device=device, generator=gen) * amp).to(dtype)
    return (pack_int4(q), lut), {"bits": 4, "tables": LUT_TABLES}


def dense_weight(op, wargs, dtype):
    """The dequantized weight [N, K] in `dtype` (float64 for the reference)."""
    if op == "int8_linear":
        q, s = wargs
        return (q.to(torch.float64) * s.to(torch.float64)[:, None]).to(dtype)
    if op == "int4_linear":
        return dequantize_int4(*wargs, torch.float64).to(dtype)
    if op == "vq_linear":
        return dequantize_vq(*wargs, torch.float64).to(dtype)
    return dequantize_lut(*wargs, torch.float64).to(dtype)


def tinygemm_args(x, wargs):
    """(x, packed, group, scales_and_zeros) for torch._weight_int4pack_mm, or None where it can't run.

    tinygemm computes W = (q − 8)·s + zt; ours is W = (q − z)·s, so zt = (8 − z)·s. It wants
    q packed two per byte with the EVEN k in the high nibble (torchao's layout), then
    re-tiled by _convert_weight_to_int4pack."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return None
    qpacked, s, z, group = wargs
    lo, hi = qpacked & 0xF, qpacked >> 4  # ours: low nibble = even k
    tg_bytes = ((lo << 4) | hi).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(tg_bytes, 8)
    sz = torch.stack((s.float(), ((8.0 - z.float()) * s.float())), dim=-1)  # [N, G, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
    return (x, packed, group, sz)


def tinygemm(x, packed, group, sz):
    return torch._weight_int4pack_mm(x, packed, group, sz)


# Ops whose small-M format keeps its codebooks in shared memory (csrc/vq_linear.cu): no wgmma path, no ring
SMEM_TABLE_OPS = ("vq_linear",)


def _sm_count():
    """SMs of the current GPU (the H200's 132 where none is visible: the CPU tests)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 132


# the dequantize + cuBLAS pieces' budget that the L2 holds (50 MB on an H100 / H200): each piece's dense rows
# stay there between their dequantization and their GEMM (peer cuda_dequant_l2)
L2_SCRATCH_MB = 16


def dequant_piece_peers(fn, M, N, K, elt):
    """{peer: fn} for dequantize + cuBLAS's pieces (csrc/quant_dequant_mm.cuh), where M takes that path: the
    weight a piece of ~16 MB at a time (``cuda_dequant_l2``, where that makes pieces the default does not) and
    the whole weight at once (``cuda_dequant_whole``, where the default budget makes pieces)."""
    sms, peers = _sm_count(), {}
    default = dequant_pieces(M, N, K, elt, sms)
    l2 = dequant_pieces(M, N, K, elt, sms, L2_SCRATCH_MB * 2**20)
    if l2[1] > 1 and l2 != default:
        peers["cuda_dequant_l2"] = with_env(fn, "REPARAM_DEQUANT_SCRATCH_MB", str(L2_SCRATCH_MB))
    if default[1] > 1:
        peers["cuda_dequant_whole"] = with_env(fn, "REPARAM_DEQUANT_SCRATCH_MB", "0")
    return peers


def other_paths(op, M, N=None, K=None, elt=2):
    """{peer name: fn}: `op` through the CUDA paths it does not take at this M, for A/B in one run:
    the general path (``cuda_general_path``: GEMV / WMMA tiles, every other path switched off)
    wherever another path runs, dequantize + cuBLAS (``cuda_dequant_cublas``) above M = 64 where it
    does not run, on Hopper wgmma (``cuda_wgmma``) where it does not run below M = 512 (M = 256
    included, which takes dequantize + cuBLAS by default) and the small-M path
    (``cuda_small_m``) where wgmma takes an M it could serve, wgmma with one warpgroup per CTA
    (``cuda_wgmma_bn64``) where it runs with two, the small-M path's register loop with the next stage's x
    prefetched into L1 (``cuda_x_ahead``, where the register loop runs), stream-K there (``cuda_stream_k``;
    ``cuda_stream_k_x_ahead`` with both), int4's scales applied after the mma at M <= 8 (``cuda_post_scale``;
    ``cuda_post_scale_x_ahead`` with the prefetch), without its shared-memory ring (``cuda_no_ring``, above the
    transposed tile's M, where x and the weights go through it by default; ``cuda_ring_x`` where rings
    are off), and wgmma without its L2
    prefetch of the weights (``cuda_wgmma_no_l2``, above M = 64) where it runs or is forced; given the shape (N,
    K, x's element size), dequantize + cuBLAS with its weight in other pieces (``dequant_piece_peers``). Where the
    crossovers lie is a measurement; the thresholds are the ones the ops read (`env`'s cuda_paths). (Toggling
    variables costs a little CPU time in eager mode; the graph numbers are kernel-only.)
    """
    paths = cuda_paths()
    fn = getattr(reparam_kernels.ops, op)  # the typed wrapper (bias optional), as `ours` is called
    dq = paths["dequant_cublas"]["min_m"] or float("inf")
    hopper = paths["wgmma"]["on"] and op not in SMEM_TABLE_OPS and torch.cuda.get_device_capability()[0] == 9
    takes_wgmma = hopper and paths["wgmma"]["min_m"] <= M < dq
    takes_small = not takes_wgmma and paths["small_m"]["on"] and M <= paths["small_m"]["max_m"]
    peers = {}
    if takes_wgmma or takes_small or M >= dq:
        peers["cuda_general_path"] = with_env(fn, "REPARAM_SMALL_M", "0", "REPARAM_WGMMA", "0",
                                              "REPARAM_DEQUANT_MIN_M", "0")
    if M > paths["small_m"]["max_m"] and M < dq:
        peers["cuda_dequant_cublas"] = with_env(fn, "REPARAM_DEQUANT_MIN_M", "1")
    if M >= dq and N is not None:
        peers.update(dequant_piece_peers(fn, M, N, K, elt))
    wgmma_env = () if takes_wgmma else None  # the variables that make the op take wgmma at this M
    if hopper and not takes_wgmma and M < 512:  # from the dequantize threshold on, with it moved away
        wgmma_env = ("REPARAM_WGMMA_MIN_M", "1", *(("REPARAM_DEQUANT_MIN_M", "0") if M >= dq else ()))
        peers["cuda_wgmma"] = with_env(fn, *wgmma_env)
    if takes_wgmma and M <= paths["small_m"]["max_m"]:
        peers["cuda_small_m"] = with_env(fn, "REPARAM_WGMMA", "0")
    if takes_wgmma and os.environ.get("REPARAM_WGMMA_BN", "") != "64":  # one warpgroup per CTA instead of two
        peers["cuda_wgmma_bn64"] = with_env(fn, "REPARAM_WGMMA_BN", "64")
    # wgmma without its L2 prefetch (below 3 stages the registers' loads are ahead of it: off anyway)
    if wgmma_env is not None and M > paths["small_m"]["max_m"] and paths["wgmma"]["l2_ahead"] > 2:
        peers["cuda_wgmma_no_l2"] = with_env(fn, *wgmma_env, "REPARAM_WGMMA_L2_AHEAD", "0")
    # (H200 run 3 timed the small-M path's M <= 16 tile at M <= 8, its L2 prefetch 2 and 4 stages ahead and its
    # weights' ring alone at M = 1, 16 and 64, fp16 8192^2: none beat the default anywhere, so their peers
    # cuda_small_m16, cuda_l2_ahead2 / 4 and cuda_ring left the run; the switches stay)
    if takes_small:
        # x of the next stage prefetched into L1 and stream-K (both off by default), where the register loop
        # runs: the transposed tile, and every tile with the rings off; an explicit 0, as run_gpu.sh sets
        # after a failed smoke run, skips them
        sm = paths["small_m"]
        ring, x_tile = sm["ring"], M > sm["transposed_max_m"]
        if not x_tile or ring == 0 or op in SMEM_TABLE_OPS:
            x_ok = not sm["x_ahead"] and not sm["x_ahead_vetoed"]
            s_ok = not sm["stream_k"] and not sm["stream_k_vetoed"]  # every slot an equal share of the stages
            if x_ok:
                peers["cuda_x_ahead"] = with_env(fn, "REPARAM_SMALL_M_X_AHEAD", "1")
            if s_ok:
                peers["cuda_stream_k"] = with_env(fn, "REPARAM_SMALL_M_STREAM_K", "1")
            if x_ok and s_ok:
                peers["cuda_stream_k_x_ahead"] = with_env(fn, "REPARAM_SMALL_M_STREAM_K", "1",
                                                          "REPARAM_SMALL_M_X_AHEAD", "1")
            # int4's scales after the mma (off by default): the transposed tile, groups of a multiple of 128
            if (op == "int4_linear" and GROUP % 128 == 0 and M <= sm["transposed_max_m"] and not sm["post_scale"]
                    and not sm["post_scale_vetoed"]):
                peers["cuda_post_scale"] = with_env(fn, "REPARAM_SMALL_M_POST_SCALE", "1")
                if x_ok:
                    peers["cuda_post_scale_x_ahead"] = with_env(fn, "REPARAM_SMALL_M_POST_SCALE", "1",
                                                                "REPARAM_SMALL_M_X_AHEAD", "1")
        # the shared-memory rings against what this M runs by default (x and the weights above the
        # transposed tile, none below: RING_X); an explicit 0, as run_gpu.sh sets after a failed smoke
        # run, skips them
        if not sm["ring_vetoed"] and op not in SMEM_TABLE_OPS:
            if ring == RING_X and x_tile:  # the register-fed loop the ring replaced
                peers["cuda_no_ring"] = with_env(fn, "REPARAM_SMALL_M_RING", "0")
            if ring == 0 and x_tile:  # x in the ring too (the tiles with x as A)
                peers["cuda_ring_x"] = with_env(fn, "REPARAM_SMALL_M_RING", "2")
    return peers


def weight_bytes(op, N, K, elt):
    if op == "int8_linear":
        return N * K + N * elt
    if op == "int4_linear":
        return N * K // 2 + 2 * N * (K // GROUP) * elt
    if op == "vq_linear":
        return N * K // 2 + 256 * 2 * elt
    return N * K // 2 + N * 16 * elt


def bench_shape(res, op, N, K, M, dtype, modes, device="cuda", count=None, seed=0):
    """Check, then time, one case; `device`/`count` exist so the CPU tests can run it small."""
    gen = torch.Generator(device=device).manual_seed(seed)
    elt = torch.empty((), dtype=dtype).element_size()
    io = (M * K + M * N) * elt
    must_move = weight_bytes(op, N, K, elt) + io
    ours_count = count or rotation_count(must_move)
    dense_count = count or rotation_count(N * K * elt + io)
    ours_sets, params = [], None
    for _ in range(ours_count):
        wargs, params = make_weights(op, N, K, dtype, device, gen)
        x = torch.randn(M, K, device=device, generator=gen).to(dtype)
        ours_sets.append((x, *wargs))
    dense_sets = [(ours_sets[i % ours_count][0], dense_weight(op, ours_sets[i % ours_count][1:], dtype))
                  for i in range(dense_count)]
    fn = getattr(reparam_kernels.ops, op)
    backend, why = _dispatch.backend_for(op, device, dtype)
    peers = {}
    tfn = getattr(rk_triton, op, None) if backend != "triton" else None  # (ours is the Triton kernel: no peer)
    if tfn is not None and (device == "cuda" or M * N * K <= 1 << 22):  # the CPU interpreter: small cases only
        peers["triton"] = Contender(tfn, ours_sets)
    if op == "int4_linear":
        tg = [tinygemm_args(s[0], s[1:]) for s in ours_sets]
        if all(a is not None for a in tg):
            peers["tinygemm"] = Contender(tinygemm, tg)
    if device == "cuda" and _dispatch.has_cuda_kernel(op):
        for name, other in other_paths(op, M, N, K, elt).items():  # (not `fn`: that is ours)
            peers[name] = Contender(other, ours_sets)
    x0, w0 = ours_sets[0][0], ours_sets[0][1:]
    rows = run_case(
        res, dtype=dtype, M=M, N=N, K=K, params=params, modes=modes,
        ours=Contender(fn, ours_sets), cublas=Contender(F.linear, dense_sets), peers=peers,
        reference=lambda: check_rows(x0).double() @ dense_weight(op, w0, torch.float64).t(),
        bytes=must_move, flops=2 * M * N * K, backend=backend,
    )
    del ours_sets, dense_sets, peers
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = bench_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated, from " + ",".join(OPS))
    args = p.parse_args(argv)
    require_cuda(__file__)
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    modes = tuple(args.modes.split(","))
    shapes, batches = shapes_and_batches(args.quick)
    ceilings = measure_ceilings()
    copy = ceilings["copy_tbps"]
    print(f"ceilings: copy {copy:.2f} TB/s, bf16 GEMM {ceilings['bf16_gemm_tflops']:.0f} TFLOP/s")
    status = 0
    results = {op: Results(op, root=args.out) for op in ops}
    for res in results.values():
        res.ceilings = ceilings
    for op, N, K, M, dtype in progress(case_list(ops, shapes, batches, dtypes), "quantized ops"):
        for row in bench_shape(results[op], op, N, K, M, dtype, modes):
            tbps = row["bytes"] / (row["ours_us"] * 1e-6) / 1e12
            peers = "  ".join(f"{k} {v:8.2f} us" for k, v in row["peers"].items())
            print(f"{op} {row['mode']:5} {row['dtype']} M={M:5} N={N:5} K={K:5} [{row['backend']}] "
                  f"ours {row['ours_us']:8.2f} us  cuBLAS {row['cublas_us']:8.2f} us  ratio {row['ratio']:5.2f}x  "
                  f"{peers}  {tbps:.2f} TB/s = {100 * tbps / copy:.0f}% of copy", flush=True)
    for op, res in results.items():
        for fail in res.failures:
            print(f"NOT TIMED {op} {fail['case']}: {fail['reason']}")
            status = 1
        print(res.write())
    return status


def case_list(ops, shapes, batches, dtypes):
    """(op, N, K, M, dtype) in the order they run: the first dtype first, then batch by batch and shape by
    shape, every op at each, so a run cut short by the GPU budget has each op's first (target) cases
    rather than all of the first op's, and the decode batch on every shape (the H200's third run, shape
    first, timed 8192^2 only) before the larger ones."""
    return [(op, N, K, M, d) for d in dtypes for M in batches for (N, K) in shapes for op in ops]


if __name__ == "__main__":
    raise SystemExit(main())
