"""A mixture-of-experts layer's compressed experts in one call (grouped_int4_linear, grouped_int8_linear,
grouped_vq_linear, grouped_lut_linear, grouped_lowrank_linear) vs the same experts dense through cuBLAS.

    python benchmarks/bench_moe.py [--quick] [--models mixtral,qwen3_moe] [--formats int4,int8,gptvq,log4,lowrank]
        [--dtypes fp16,bf16]

Each case is one projection (gate_up or down) of one MoE layer for T tokens, each routed to top_k distinct
experts drawn at random; M = T·top_k routed rows, sorted by expert (what UnfusedExperts' grouped forward
passes). Contenders, all on the same rows:

- ours: ``reparam.grouped_int4_linear`` (group 128), ``grouped_int8_linear``, ``grouped_vq_linear`` (GPTVQ's
  pairs, 256 a codebook per 64 rows), ``grouped_lut_linear`` (log 4-bit: a 16-entry table a row): one launch,
  the routing read on the device; or ``grouped_lowrank_linear``
  (pivoted factors of ragged ranks, 20/30/40% of min(N, K) rounded to 8 in turn, as a global allocation
  gives: two launches);
- cublas: the dequantized experts in x's dtype, one ``torch.matmul`` per expert that has rows, the
  routing known on the host when the call is recorded — the dense per-expert loop without its host sync,
  so a CUDA graph can hold it (generous to the baseline: a real forward must sync or pad);
- peer ``torch_grouped_mm``: ``torch._grouped_mm`` on the dense experts (one launch; where torch has it
  for the dtype and GPU — otherwise recorded as not timed);
- peer ``triton``: the op's Triton kernel, which the CUDA kernel (csrc/grouped_quant.cuh; for low rank
  csrc/grouped_lowrank_linear.cu, session 35) replaced untimed; the run says which is faster;
- peer ``cuda_fallback`` (M <= 128): the CUDA op with ``REPARAM_GROUPED_SMALL_M=0``, its
  warp-per-output fallback kernel — what the layouts off the loop would cost without the wrappers' routing to
  Triton.

Several routings (and x) rotate through the timed calls, so the experts one call reads are not left in L2
by the previous one. Checked against float64 before timing. Writes
benchmarks/results/<gpu>/grouped_{int4,int8,vq,lut,lowrank}_linear.json; rows carry params {model, projection, experts, top_k,
tokens, bits}, ``bytes`` (the routed experts' weights and scales at most — min(E, M) experts —, x and y, once)
and ``flops``. int4 only by default (``--formats``): the formats of issue 3's decode targets first.
"""
import torch

from common import (DTYPES, Contender, Results, bench_arg_parser, measure_ceilings, progress, require_cuda,
                    rotation_count, run_case, with_env)

import reparam_kernels
from reparam_kernels.compress.quantize import pack_int4
from reparam_kernels.reference.int4_linear import dequantize_int4

OPS = {"int4": "grouped_int4_linear", "int8": "grouped_int8_linear", "gptvq": "grouped_vq_linear",
       "log4": "grouped_lut_linear", "lowrank": "grouped_lowrank_linear"}
RANK_FRACTIONS = (0.2, 0.3, 0.4)  # lowrank: expert e's rank, a fraction (in turn) of min(N, K)
ROWS_PER_CODEBOOK = 64  # gptvq: the recipe's 256 pairs per 64 output rows

GROUP = 128
# model: (experts, top_k, hidden, expert ffn) — Mixtral-8x7B and Qwen3-30B-A3B
MODELS = {"mixtral": (8, 2, 4096, 14336), "qwen3_moe": (128, 8, 2048, 768)}
TOKENS, QUICK_TOKENS = [1, 4, 16, 64, 256], [1, 16, 64]


def projections(model):
    """(name, N, K) of a model's two expert projections."""
    _, _, hidden, ffn = MODELS[model]
    return [("gate_up", 2 * ffn, hidden), ("down", hidden, ffn)]


def make_experts(fmt, E, N, K, dtype, device, gen):
    """(the op's weight tensors [E, …] with outputs of O(1), a function giving expert e's dense weight in a dtype)."""
    amp = 1.0 / (4.0 * K ** 0.5)
    if fmt == "lowrank":
        from reparam_kernels.ops.grouped_lowrank_linear import stack_factors
        from reparam_kernels.reference.grouped_lowrank_linear import expert_factors
        from reparam_kernels.reference.pivoted_lowrank_linear import expand_right_factor

        ranks = [rank_of(e, N, K) for e in range(E)]
        us = [(torch.randn(N, r, device=device, generator=gen) / (4 * r ** 0.5)).to(dtype) for r in ranks]
        ws = [(torch.randn(r, K - r, device=device, generator=gen) / K ** 0.5).to(dtype) for r in ranks]
        perms = [torch.randperm(K, device=device, generator=gen) for _ in ranks]
        u, v, perm, fo, max_rank, row_align = stack_factors(us, ws, perms)
        bounds = fo.tolist()

        def dense(e, dt):
            ue, we, pe = expert_factors(u, v, perm, fo, N, K, e, bounds)
            return (ue.double() @ expand_right_factor(we, pe, torch.float64)).to(dt)
        return (u, v, perm, fo, N, max_rank, row_align), dense
    if fmt == "gptvq":
        from reparam_kernels.reference.vq_linear import dequantize_vq

        c = torch.randint(0, 256, (E, N, K // 2), device=device, dtype=torch.uint8, generator=gen)
        books = (torch.randn(E, N // ROWS_PER_CODEBOOK, 256, 2, device=device, generator=gen) * amp).to(dtype)
        return (c, books), lambda e, dt: dequantize_vq(c[e], books[e], dt)
    if fmt == "log4":  # a 16-entry table a row, as the log method stores
        from reparam_kernels.reference.lut_linear import dequantize_lut

        c = torch.randint(0, 256, (E, N, K // 2), device=device, dtype=torch.uint8, generator=gen)
        lut = (torch.randn(E, N, 16, device=device, generator=gen) * amp).to(dtype)
        return (c, lut), lambda e, dt: dequantize_lut(c[e], lut[e], dt)
    if fmt == "int8":
        q = torch.randint(-127, 128, (E, N, K), device=device, dtype=torch.int8, generator=gen)
        s = ((torch.rand(E, N, device=device, generator=gen) + 0.5) * amp / 64).to(dtype)
        return (q, s), lambda e, dt: q[e].to(dt) * s[e].to(dt)[:, None]
    q = torch.randint(0, 16, (E * N, K), device=device, dtype=torch.uint8, generator=gen)
    s = ((torch.rand(E, N, K // GROUP, device=device, generator=gen) + 0.5) * amp / 4).to(dtype)
    z = torch.randint(0, 16, (E, N, K // GROUP), device=device, generator=gen).to(dtype)
    q = pack_int4(q).view(E, N, K // 2)
    return (q, s, z, GROUP), lambda e, dt: dequantize_int4(q[e], s[e], z[e], GROUP, dt)


def rank_of(e, N, K):
    return max(8, int(min(N, K) * RANK_FRACTIONS[e % len(RANK_FRACTIONS)]) // 8 * 8)


def weight_bytes(fmt, N, K, elt):
    """One expert's weight and scales (codebooks); low rank: the largest expert's factors and perm."""
    if fmt == "lowrank":
        return max(r * (N + K - r) * elt + 8 * K for r in (rank_of(e, N, K) for e in range(len(RANK_FRACTIONS))))
    if fmt == "gptvq":
        return N * K // 2 + (N // ROWS_PER_CODEBOOK) * 256 * 2 * elt
    if fmt == "log4":
        return N * K // 2 + N * 16 * elt
    return N * K + N * elt if fmt == "int8" else N * K // 2 + 2 * N * (K // GROUP) * elt


def routing(E, top_k, T, device, gen):
    """expert_offsets int64 [E + 1] of T tokens' rows sorted by expert (top_k distinct experts a token)."""
    scores = torch.rand(T, E, device=device, generator=gen)
    ids = scores.topk(top_k, dim=1).indices.reshape(-1)
    counts = torch.bincount(ids, minlength=E)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def dense_loop(bounds):
    """The dense experts through cuBLAS, one matmul per expert with rows (bounds known on the host)."""
    def run(x, w):
        y = x.new_empty(x.shape[0], w.shape[1])
        for e, (lo, hi) in enumerate(bounds):
            if hi > lo:
                torch.matmul(x[lo:hi], w[e].t(), out=y[lo:hi])
        return y
    return run


def grouped_mm(x, w_t, ends):
    return torch._grouped_mm(x, w_t, offs=ends)


def bench_case(res, model, proj, N, K, T, dtype, modes, fmt="int4", device="cuda", count=None, seed=0):
    """Check, then time, one projection at T tokens; `device`/`count` let the CPU tests run it small."""
    E, top_k = MODELS[model][:2] if isinstance(model, str) else model
    gen = torch.Generator(device=device).manual_seed(seed)
    weights, dense = make_experts(fmt, E, N, K, dtype, device, gen)
    w = torch.stack([dense(e, dtype) for e in range(E)])
    M = T * top_k
    elt = torch.empty((), dtype=dtype).element_size()
    per_call = min(E, M) * weight_bytes(fmt, N, K, elt) + (M * K + M * N) * elt  # experts a call reads, at most
    n_sets = count or rotation_count(per_call)
    sets = []
    for _ in range(n_sets):
        offsets = routing(E, top_k, T, device, gen)
        sets.append((torch.randn(M, K, device=device, generator=gen).to(dtype), offsets))
    op = getattr(reparam_kernels.ops, OPS[fmt])
    ours = Contender(lambda x, o: op(x, o, *weights, None), sets)
    loops = [dense_loop(list(zip(o[:-1].tolist(), o[1:].tolist()))) for _, o in sets]
    cublas = Contender(lambda x, i, dense_w: loops[i](x, dense_w), [(x, i, w) for i, (x, _) in enumerate(sets)])
    peers = {}
    if hasattr(torch, "_grouped_mm") and device == "cuda":
        w_t = w.transpose(1, 2)
        peers["torch_grouped_mm"] = Contender(grouped_mm, [(x, w_t, o[1:].to(torch.int32)) for x, o in sets])
    if device == "cuda":  # the Triton kernel the CUDA one replaced, in the same run
        triton_fn = getattr(reparam_kernels.triton, OPS[fmt])
        peers["triton"] = Contender(lambda x, o: triton_fn(x, o, *weights, None), sets)
        # the CUDA op's fallback kernel (a warp per output), which layouts off its loop would take but for the
        # wrappers' routing to Triton (docs/quant.md): what that routing saves. Up to 128 rows: it reads the
        # weights once a row, so a prefill would spend the script's time budget on it
        if M <= 128:
            peers["cuda_fallback"] = Contender(with_env(lambda x, o: op(x, o, *weights, None),
                                                        "REPARAM_GROUPED_SMALL_M", "0"), sets)
    x0, o0 = sets[0]

    def reference():
        bounds = o0.tolist()
        y = torch.zeros(M, N, dtype=torch.float64, device=device)
        for e in range(E):
            if bounds[e + 1] > bounds[e]:
                y[bounds[e]:bounds[e + 1]] = x0[bounds[e]:bounds[e + 1]].double() @ dense(e, torch.float64).t()
        return y

    params = {"model": model if isinstance(model, str) else "custom", "projection": proj, "experts": E,
              "top_k": top_k, "tokens": T, "bits": {"int8": 8, "lowrank": 16}.get(fmt, 4)}
    if fmt == "lowrank":
        params.update(pivoted=True, rank_fractions=list(RANK_FRACTIONS))
    if fmt == "gptvq":
        params.update(d=2, rows_per_codebook=ROWS_PER_CODEBOOK)
    if fmt == "int4":
        params["group"] = GROUP
    rows = run_case(res, dtype=dtype, M=M, N=N, K=K, params=params, modes=modes, ours=ours, cublas=cublas,
                    peers=peers, reference=reference, bytes=per_call, flops=2 * M * N * K)
    del sets, w, peers
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = bench_arg_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ",".join(MODELS))
    p.add_argument("--formats", default="int4", help="comma-separated, from " + ",".join(OPS))
    args = p.parse_args(argv)
    require_cuda(__file__)
    models, formats = args.models.split(","), args.formats.split(",")
    for name, given, known in (("models", models, MODELS), ("formats", formats, OPS)):
        for g in given:
            if g not in known:
                raise SystemExit(f"--{name}: unknown {g!r}; choose from {', '.join(known)}")
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    modes = tuple(args.modes.split(","))
    tokens = QUICK_TOKENS if args.quick else TOKENS
    ceilings = measure_ceilings()
    results = {f: Results(OPS[f], root=args.out) for f in formats}
    for res in results.values():
        res.ceilings = ceilings
    cases = [(f, m, proj, N, K, T, d) for d in dtypes for T in tokens for m in models for proj, N, K in projections(m)
             for f in formats]
    for fmt, m, proj, N, K, T, dtype in progress(cases, "MoE experts"):
        for row in bench_case(results[fmt], m, proj, N, K, T, dtype, modes, fmt=fmt):
            peers = "  ".join(f"{k} {v:8.2f} us" for k, v in row["peers"].items())
            print(f"{OPS[fmt]} {row['mode']:5} {row['dtype']} {m} {proj} T={T:4} M={row['M']:5} N={N:5} K={K:5} "
                  f"ours {row['ours_us']:8.2f} us  cuBLAS loop {row['cublas_us']:8.2f} us  ratio {row['ratio']:5.2f}x  "
                  f"{peers}", flush=True)
    status = 0
    for res in results.values():
        for fail in res.failures:
            print(f"NOT TIMED {res.op} {fail['case']}: {fail['reason']}")
            status = 1
        print(res.write())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
