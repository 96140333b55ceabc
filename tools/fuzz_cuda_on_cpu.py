"""Random cases for the CUDA-on-CPU harness (python_tests/cuda_on_cpu): every op of csrc/ at random
sizes, dtypes, path switches and fake GPUs, against float64, until the time is up. A longer search
than the test suite's fixed cases; prints every failure with what reproduces it.

    PYTHONPATH=. python tools/fuzz_cuda_on_cpu.py [--minutes 20] [--seed 1] [--ops block_circulant_cols_linear]
"""
import argparse
import collections
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
import cuda_on_cpu  # noqa: E402
import test_grouped_lowrank_op as grouped_lowrank  # noqa: E402
import test_grouped_ops as grouped  # noqa: E402
import test_lowrank_op as plain  # noqa: E402
import test_pivoted_lowrank as piv  # noqa: E402
import test_quant_ops as quant  # noqa: E402
import test_structured_op as structured  # noqa: E402
from conftest import TOL, rel_err  # noqa: E402
from test_cuda_on_cpu_vq import vq_case  # noqa: E402


def pick_m(r):
    return r.choice([1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 63, 64, 65, 100, 128, 129, 200, 255, 300, 511, 513])


OPS = ["int4_linear", "int8_linear", "lut_linear", "lowrank_linear", "pivoted_lowrank_linear",
       "block_circulant_linear", "block_circulant_linear", "toeplitz_linear", "block_circulant_cols_linear",
       "vq_linear", "vq_linear", "grouped_int4_linear", "grouped_int8_linear", "grouped_vq_linear",
       "grouped_lut_linear", "grouped_lowrank_linear", "grouped_lowrank_linear"]


def pick_counts(r, M):
    """Rows an expert for M routed rows over 1..9 experts (some without rows), and rows no expert takes."""
    E = r.randint(1, 9)
    cuts = sorted(r.randint(0, M) for _ in range(E - 1))
    counts = [b - a for a, b in zip([0] + cuts, cuts + [M])]
    tail = r.choice([0, 0, 0, 1, 5]) if M > 5 else 0
    return [max(0, c - (tail if i == E - 1 else 0)) for i, c in enumerate(counts)], tail


def grouped_case(r, gen, op, M, dtype):
    """A grouped op's case: the small-M loop's layouts mostly, the fallback's sometimes."""
    counts, tail = pick_counts(r, min(M, 200))
    bias = r.random() < 0.5
    if op == "grouped_lowrank_linear":
        fast = r.random() < 0.75  # ranks and K in multiples of 8 (row_align 8)
        K = r.choice([32, 64, 96, 136, 264, 1056]) if fast else r.choice([24, 45, 70, 100])
        ranks = [r.choice([0, 8, 16, 24, 40, 64, 136]) if fast else r.randint(0, 20) for _ in counts]
        ranks = [min(x, K) for x in ranks]
        N = r.choice([8, 24, 40, 72, 130, 264])
        args, want = grouped_lowrank.make(gen, counts, ranks, K, N, dtype, r.choice([False, True, "mixed"]),
                                          bias=bias, tail=tail)
        x, offsets, u, v, perm, fo, n, max_rank, align, b = args
        return {"op": op, "args": [x, offsets, u, v, perm, fo, b], "ints": [n, max_rank, align]}, want, dtype
    kw = {}
    if op == "grouped_int4_linear":
        kw["group"] = r.choice([32, 64, 128, 96])
        K = kw["group"] * r.randint(1, 8)
    elif op == "grouped_vq_linear":
        kw["d"] = 2 if r.random() < 0.7 else r.randint(1, 8)
        K = kw["d"] * r.choice([16, 32, 48, 50, 272])
    else:
        K = r.choice([32, 64, 96, 100, 256, 520, 1056])
    N = r.choice([8, 24, 40, 64, 72, 130, 192, 264])
    if op == "grouped_vq_linear":
        kw["books"] = r.choice([b for b in (1, 2, N // 64, N // 8) if b >= 1 and N % b == 0])
        kw["entries"] = r.choice([256, 256, 100, 17])
    if op == "grouped_lut_linear":
        K += K % 2
        kw["books"] = r.choice([b for b in (1, N // 8, N) if b >= 1 and N % b == 0])
    args, want = grouped.make(gen, counts, K, N, dtype, bias=bias, tail=tail, op=op, **kw)
    tensors = [a for a in args if not isinstance(a, int)]
    return {"op": op, "args": tensors, "ints": [a for a in args if isinstance(a, int)]}, want, dtype


def make_case(r, gen, ops=OPS):
    op = r.choice(ops)
    dtype = r.choice([torch.float16, torch.bfloat16])
    M = pick_m(r)
    if op.startswith("grouped_"):
        return grouped_case(r, gen, op, M, dtype)
    if op in ("int4_linear", "int8_linear", "lut_linear"):
        group = r.choice([32, 64, 128, 96])
        K = group * r.randint(1, 12) if op == "int4_linear" else r.choice([16, 32, 48, 64, 130, 256, 37, 96, 320, 1056])
        if op == "lut_linear" and K % 2:
            K += 1
        N = r.choice([8, 24, 33, 64, 72, 130, 200, 264])
        args, w = quant.make(op, gen, (M,), K, N, dtype, group=group if op == "int4_linear" else 32,
                             bias=r.random() < 0.5, tables=N // 8 if N % 8 == 0 and r.random() < 0.5 else 1)
        tensors = [a for a in args if not isinstance(a, int)]
        ints = [a for a in args if isinstance(a, int)]
        return {"op": op, "args": tensors, "ints": ints}, quant.exact(args, w), dtype
    if op == "vq_linear":  # pairs mostly (their small-M path with shared-memory codebooks), every d sometimes
        d = 2 if r.random() < 0.7 else r.randint(1, 8)
        K = d * r.choice([8, 16, 48, 64, 100, 272, 520, 1040]) if d != 2 else r.choice([32, 64, 96, 544, 1056, 2080, 34])
        N = r.choice([8, 24, 36, 64, 72, 130, 192, 264, 384])
        books = r.choice([b for b in (1, 2, 3, N // 64, N // 8, N // 4) if b >= 1 and N % b == 0])
        case, ref = vq_case(gen, M, K, N, dtype, d=d, entries=r.choice([256, 256, 100, 17]), books=books,
                            bias=r.random() < 0.5)
        return case, ref, dtype
    if op in ("lowrank_linear", "pivoted_lowrank_linear"):
        r_ = r.choice([8, 13, 16, 24, 40, 64])
        K = r_ + r.choice([8, 16, 40, 57, 96, 200])
        N = r.choice([16, 33, 72, 200])
        if op == "lowrank_linear":
            x, u, v, b = plain.make(gen, (M,), K, N, r_, dtype, bias=r.random() < 0.5)
            return {"op": op, "args": [x, u, v, b]}, plain.exact(x, u, v, b), dtype
        x, u, w, perm, b = piv.make(gen, (M,), K, N, r_, dtype, bias=r.random() < 0.5)
        return {"op": op, "args": [x, u, w, perm, b]}, piv.exact(x, u, w, perm, b), dtype
    if op == "block_circulant_linear":
        bs = r.choice([64, 128, 256, 512, 1024, 2048, 4096])
        most = 6 if bs <= 1024 else 2  # block counts kept small for the big blocks (cost)
        K, N = r.randint(1, most) * bs - r.choice([0, 0, 5]), r.randint(1, most) * bs - r.choice([0, 0, 3])
        M = M if bs <= 1024 else min(M, 17)
        dtype = r.choice([torch.float16, torch.bfloat16, torch.float32])
        x, spec, cols, bias = structured.make(gen, (min(M, 300),), K, N, bs, dtype, bias=r.random() < 0.5)
        return ({"op": op, "args": [x, spec, bias], "ints": [bs, N]}, structured.exact(x, cols, N, bias), dtype)
    if op == "block_circulant_cols_linear":  # the decode kernel on the blocks' columns: M <= 16 is its use
        bs = r.choice([64, 128, 256, 512, 1024, 2048, 4096])
        most = 6 if bs <= 512 else 2
        K, N = r.randint(1, most) * bs - r.choice([0, 0, 5]), r.randint(1, most) * bs - r.choice([0, 0, 3])
        x, _, cols, bias = structured.make(gen, (min(M, 40),), K, N, bs, dtype, bias=r.random() < 0.5)
        return ({"op": op, "args": [x, cols.float(), bias], "ints": [N]}, structured.exact(x, cols, N, bias), dtype)
    from reparam_kernels.nn import ToeplitzLinear
    K, N = r.randint(20, 300), r.randint(20, 300)
    layer = ToeplitzLinear.from_linear(torch.nn.Linear(K, N))
    if layer.fft_size < 64 or layer.fft_size > 4096 or layer.fft_size & (layer.fft_size - 1):
        return make_case(r, gen, ops)
    x = torch.randn(min(M, 64), K, generator=gen)
    bias = layer.bias.detach()
    ref = x.double() @ layer.to_dense().double().t() + bias.double()
    return {"op": "toeplitz_linear", "args": [x, layer.t_spectrum.detach(), bias],
            "ints": [layer.fft_size, N]}, ref, torch.float32


def random_env(r):
    env = {"RK_CPU_SMS": str(r.choice([1, 2, 4, 7, 16, 132])), "RK_CPU_BLOCKS_PER_SM": str(r.choice([1, 2, 3])),
           "RK_CPU_SEED": str(r.randint(1, 10**6)), "RK_CPU_CC_MAJOR": r.choice(["9", "9", "8"])}
    for var, values in (("REPARAM_SMALL_M", ["0"]), ("REPARAM_WGMMA", ["0"]), ("REPARAM_WGMMA_MIN_M", ["1", "33"]),
                        ("REPARAM_WGMMA_BN", ["64"]), ("REPARAM_DEQUANT_MIN_M", ["0", "100"]),
                        ("REPARAM_DEQUANT_SCRATCH_MB", ["0", "0.01", "0.05"]),
                        ("REPARAM_LOWRANK_CUBLAS_MIN_M", ["0", "100"]), ("RK_CPU_CP_ASYNC_EARLY", ["1"]),
                        ("REPARAM_BC_LARGE_M_MIN_M", ["1", "9", "0"]),
                        ("REPARAM_SMALL_M_X_AHEAD", ["1"]), ("REPARAM_SMALL_M_STREAM_K", ["1"]),
                        ("REPARAM_SMALL_M_POST_SCALE", ["1"]), ("REPARAM_BC_COLS_TILE_ROWS", ["8"]),
                        ("REPARAM_BC_COLS_WIDE", ["1"]), ("RK_CPU_SKEW", ["50", "5000"]),
                        ("RK_CPU_THREADS_PER_SM", ["512", "1024"]),
                        ("REPARAM_BC_COLS_SPLITS", ["1", "3", "32"]), ("REPARAM_PIVOTED_GATHER", ["0", "1"]),
                        ("REPARAM_LOWRANK_GEMV", ["1"]), ("REPARAM_LOWRANK_PREFETCH_U", ["1"]),
                        ("REPARAM_LOWRANK_GEMV_STAGE_ROWS", ["0", "1", "3"]),
                        ("REPARAM_SMALL_M_RING", ["0", "1", "2"]),
                        ("REPARAM_VQ_SMALL_M", ["0"]), ("REPARAM_GROUPED_SMALL_M", ["0"])):
        if r.random() < 0.25:
            env[var] = r.choice(values)
    # the low-rank ops take two cuBLAS products by default (plain factors at every M, pivoted from M = 2): mostly
    # keep the fused kernels
    # (what the fuzzer is for), sometimes the default routing
    env.setdefault("REPARAM_LOWRANK_CUBLAS_MIN_M", "0" if r.random() < 0.8 else "")
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--per-process", type=int, default=8)
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {sorted(set(OPS))}")
    args = p.parse_args(argv)
    r = random.Random(args.seed)
    end, runs, failures = time.time() + 60 * args.minutes, 0, 0
    kernels = collections.Counter()  # which kernels the cases reached (the paths covered)
    while time.time() < end:
        gen = torch.Generator().manual_seed(r.randint(0, 2**31))
        env = random_env(r)
        batch = [make_case(r, gen, args.ops.split(",") if args.ops else OPS) for _ in range(args.per_process)]
        try:
            results = cuda_on_cpu.run_cases([c for c, _, _ in batch], env)
        except cuda_on_cpu.KernelError as e:
            failures += 1
            print(f"FAIL (process) env={env} ops={[c['op'] for c, _, _ in batch]}: {str(e)[-1500:]}", flush=True)
            continue
        for (case, ref, dtype), (y, trace) in zip(batch, results):
            runs += 1
            for line in trace:  # "launch <kernel> [with P = {<first parameter type>, ...}] grid ..."
                line = line.replace("{anonymous}::", "")
                first = line.split("{", 1)[1].split("}]")[0].split(", ")[0].split("::")[-1] if "{" in line else ""
                kernels[line.split(" [with")[0].removeprefix("launch ") + f" ({first})"] += 1
            err = rel_err(y, ref)
            tol = {torch.float32: 1e-4}.get(dtype, TOL[dtype])
            if not (torch.isfinite(y).all() and err <= tol):
                failures += 1
                shapes = [tuple(a.shape) if a is not None else None for a in case["args"]]
                print(f"FAIL {case['op']} {dtype} shapes={shapes} ints={case.get('ints')} env={env} err={err:.3g} "
                      f"launches={trace}", flush=True)
        print(f"{runs} cases, {failures} failures", flush=True)
    print("kernels reached:", dict(kernels.most_common()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
