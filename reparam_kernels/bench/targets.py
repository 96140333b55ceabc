"""The issues' speed targets, checked against result files: which are met, by how much the others miss, and which
a peer (a path the op did not take by default) would meet (``python -m reparam_kernels bench --targets DIR``;
run_gpu.sh writes it to targets.md).

Every target is transcribed here, in one place, from the issue that sets it (H200, fp16, against cuBLAS on the
dense weight measured in the same run unless it says otherwise). A target over a range of M ("M = 1..16") must
hold at every M the results timed in that range: the worst row decides, and the table names the M it timed.
A target no row covers reads "not measured"; nothing is inferred from a neighbouring shape or another dtype.
"""
import dataclasses
import json
import math
import sys

from .peers import BASELINES
from .results import load, result_files

COPY_TBPS_NEED = 0.7 * 4.27  # issue 2: 70% of the H200's measured copy ceiling (DESIGN.md)
DECODE_LAYERS = 32           # issue 6: the Llama-3-8B configuration (the runner's --quick times 4 layers)
DECODE_CONTEXT = 512


@dataclasses.dataclass(frozen=True)
class Target:
    issue: int
    op: str                  # a result file's op, or "decode"
    what: str                # the target as the issue words it
    need: float
    metric: str = "vs_cublas"  # vs_cublas: cublas_us / us ≥ need; us: us ≤ need; tbps: bytes / us ≥ need;
    #                           vs:<peer>: peer_us / us ≥ need; decode: tokens/s of the best variant of
    #                           `kinds` over dense ≥ need
    shape: tuple = None      # (N, K)
    params: tuple = ()       # (key, value) pairs the row's params must hold
    m_range: tuple = (1, 1)  # inclusive; decode: batch sizes
    mode: str = "graph"
    dtype: str = "fp16"
    kinds: tuple = ()        # decode: the variants' layer kinds that count (suffixes +fused / +head / :switches too)


def _sh(shape):
    return f"{shape[0]}²" if shape[0] == shape[1] else f"{shape[0]}×{shape[1]}"


def _int4(m, need, shape):
    return Target(3, "int4_linear", f"int4 g128 {_sh(shape)} M={m} ≥ {need}× cuBLAS", need, shape=shape,
                  params=(("group", 128),), m_range=(m, m))


def _both(make):
    return [make((8192, 8192)), make((28672, 8192))]


TARGETS = (
    # issue 2: the low-rank op, r = 512
    Target(2, "lowrank_linear", "low rank 8192² r=512 M=1..16 ≥ 6.4× cuBLAS", 6.4, shape=(8192, 8192),
           params=(("rank", 512),), m_range=(1, 16)),
    Target(2, "lowrank_linear", "low rank 28672×8192 r=512 M=1..16 ≥ 10× cuBLAS", 10.0, shape=(28672, 8192),
           params=(("rank", 512),), m_range=(1, 16)),
    *_both(lambda s: Target(2, "lowrank_linear", f"low rank {_sh(s)} r=512 M=1..16 ≥ 2.99 TB/s (70% of copy)",
                            COPY_TBPS_NEED, metric="tbps", shape=s, params=(("rank", 512),), m_range=(1, 16))),
    *_both(lambda s: Target(2, "lowrank_linear", f"low rank {_sh(s)} M≤256 eager ≥ 1.3× two cuBLAS calls",
                            1.3, metric="vs:two_cublas", shape=s, params=(("rank", 512),), m_range=(1, 256),
                            mode="eager")),
    *_both(lambda s: Target(2, "lowrank_linear", f"low rank {_sh(s)} M=2048 within 10% of two cuBLAS calls",
                            1 / 1.1, metric="vs:two_cublas", shape=s, params=(("rank", 512),),
                            m_range=(2048, 2048))),
    # issue 3: int4 g128, int8 per channel, 4-bit LUT
    *_both(lambda s: _int4(1, 3.5, s)),
    *_both(lambda s: _int4(16, 3.0, s)),
    *_both(lambda s: _int4(64, 2.0, s)),
    *_both(lambda s: _int4(256, 1.0, s)),
    *_both(lambda s: _int4(2048, 0.9, s)),
    *_both(lambda s: Target(3, "int8_linear", f"int8 {_sh(s)} M=1 ≥ 1.85× cuBLAS", 1.85, shape=s)),
    *_both(lambda s: Target(3, "int8_linear", f"int8 {_sh(s)} M=16 ≥ 1.75× cuBLAS", 1.75, shape=s,
                            m_range=(16, 16))),
    *_both(lambda s: Target(3, "int8_linear", f"int8 {_sh(s)} M≥256 ≥ 0.95× cuBLAS", 0.95, shape=s,
                            m_range=(256, 1 << 30))),
    *_both(lambda s: Target(3, "lut_linear", f"lut 4-bit {_sh(s)} M=1 ≥ 3.0× cuBLAS", 3.0, shape=s,
                            params=(("bits", 4),))),
    # issue 4: structured
    Target(4, "block_circulant_linear", "circulant n=4096 M=1 ≤ 3 µs", 3.0, metric="us", shape=(4096, 4096),
           params=(("block", 4096),)),
    Target(4, "block_circulant_linear", "block-circulant 4096² b=256 M=1..16 ≥ 5× cuBLAS", 5.0, shape=(4096, 4096),
           params=(("block", 256),), m_range=(1, 16)),
    Target(4, "block_circulant_linear", "block-circulant 4096² b=256 M=1..16 eager ≥ 10× torch.fft + einsum", 10.0,
           metric="vs:torch_fft", shape=(4096, 4096), params=(("block", 256),), m_range=(1, 16), mode="eager"),
    Target(4, "block_circulant_linear", "block-circulant 4096² b=256 M=2048 ≥ 2× cuBLAS", 2.0, shape=(4096, 4096),
           params=(("block", 256),), m_range=(2048, 2048)),
    Target(4, "block_circulant_linear", "block-circulant 14336×4096 b=512 M=1..16 ≥ 5× cuBLAS", 5.0,
           shape=(14336, 4096), params=(("block", 512),), m_range=(1, 16)),
    # issue 6: 32-layer Llama-3-8B decode, 512 tokens of context, tokens/s over dense fp16 in the same compile mode
    Target(6, "decode", "decode batch 1: int4 g128 ≥ 2.5× dense", 2.5, metric="decode", kinds=("int4_g128",)),
    Target(6, "decode", "decode batch 1: int8 ≥ 1.6× dense", 1.6, metric="decode", kinds=("int8",)),
    Target(6, "decode", "decode batch 1: low rank −40% ≥ 1.4× dense", 1.4, metric="decode",
           kinds=("lowrank_40", "lowrank_40_pivoted")),
    Target(6, "decode", "decode batch 16: int4 g128 ≥ 2.0× dense", 2.0, metric="decode", kinds=("int4_g128",),
           m_range=(16, 16)),
)


def _matches(t, row):
    params = row.get("params") or {}
    return (row.get("op") == t.op and row.get("mode") == t.mode and row.get("dtype") == t.dtype
            and (row["N"], row["K"]) == t.shape and t.m_range[0] <= row["M"] <= t.m_range[1]
            and all(params.get(k) == v for k, v in t.params))


def _value(t, row, us):
    """The target's metric for `row` had it taken `us` (higher is better except for metric "us")."""
    if t.metric == "vs_cublas":
        return row["cublas_us"] / us
    if t.metric == "us":
        return us
    if t.metric == "tbps":
        return row["bytes"] / us * 1e-6 if row.get("bytes") else None
    if t.metric.startswith("vs:"):
        ref = (row.get("peers") or {}).get(t.metric[3:])
        return ref / us if ref else None
    raise ValueError(f"target {t.what!r}: unknown metric {t.metric!r}")


def _meets(t, value):
    return value <= t.need if t.metric == "us" else value >= t.need


def _worst(t, items, key=None):
    """The worst of `items` by the target's metric (the longest time, else the lowest ratio or rate)."""
    return (max if t.metric == "us" else min)(items, key=key)


def _best(t, items, key=None):
    return (min if t.metric == "us" else max)(items, key=key)


def _good(us):
    return isinstance(us, (int, float)) and math.isfinite(us) and us > 0


def check_op(t, rows):
    """{"status", "value", "ms", "date", "peer"} of one op target over `rows` (status: met / missed /
    not measured); "peer": (name, worst value) of the best non-baseline peer that meets a missed target on
    every one of its rows, or None."""
    rows = [r for r in rows if _matches(t, r)]
    values = [(_value(t, r, r["ours_us"]), r) for r in rows]
    values = [(v, r) for v, r in values if v is not None]
    if not values:
        return {"status": "not measured", "value": None, "ms": [], "date": None, "peer": None}
    worst, worst_row = _worst(t, values, key=lambda vr: vr[0])
    out = {"status": "met" if _meets(t, worst) else "missed", "value": worst,
           "ms": sorted({r["M"] for _, r in values}), "date": _row_date(worst_row), "peer": None}
    if out["status"] == "missed":
        peers = {}
        for name in set().union(*[(r.get("peers") or {}).keys() for _, r in values]) - BASELINES:
            times = [(r.get("peers") or {}).get(name) for _, r in values]
            got = [_value(t, r, us) if _good(us) else None for (_, r), us in zip(values, times)]
            if all(g is not None for g in got) and _meets(t, _worst(t, got)):
                peers[name] = _worst(t, got)
        if peers:
            out["peer"] = _best(t, peers.items(), key=lambda kv: kv[1])
    return out


def _row_date(row):
    return ((row.get("run") or {}).get("date") or row.get("_file_date") or "")[:10] or None


def check_decode(t, files):
    """The best variant of the target's kinds, over decode files whose setup is the issue's."""
    best, short = None, None
    for data in files:
        config = data.get("config") or {}
        full = config.get("num_hidden_layers") == DECODE_LAYERS and data.get("context") == DECODE_CONTEXT
        for row in data.get("rows", []):
            base = row["variant"].partition(":")[0].split("+")[0]
            if (base not in t.kinds or not t.m_range[0] <= row["batch"] <= t.m_range[1]
                    or not row.get("speedup_vs_dense")):
                continue
            cand = (row["speedup_vs_dense"], row["variant"], (data.get("date") or "")[:10],
                    config.get("num_hidden_layers"))
            if full:
                best = max(best, cand) if best else cand
            else:
                short = max(short, cand) if short else cand
    if best is None:
        note = (f"not measured ({short[3]}-layer run only: {short[1]} {short[0]:.2f}×)" if short
                else "not measured")
        return {"status": note, "value": None, "ms": [], "date": short[2] if short else None, "peer": None}
    return {"status": "met" if best[0] >= t.need else "missed", "value": best[0], "ms": [],
            "date": best[2], "peer": None, "variant": best[1]}


def load_dir(path):
    """(op rows, decode files) of the result files under `path` (results.result_files)."""
    op_files, decode_files = result_files(path)
    rows, decodes = [], []
    for p in op_files + decode_files:
        try:
            if p in decode_files:
                with open(p) as f:
                    decodes.append(json.load(f))
            else:
                data = load(p)
                rows += [dict(r, _file_date=data.get("date")) for r in data["rows"]]
        except (ValueError, KeyError, OSError) as e:  # not a results file: say so, go on
            print(f"targets: skipped {p}: {e}", file=sys.stderr)
    return rows, decodes


def check(path, targets=TARGETS):
    rows, decodes = load_dir(path)
    return [(t, check_decode(t, decodes) if t.op == "decode" else check_op(t, rows)) for t in targets]


def _fmt(t, v):
    if v is None:
        return "–"
    # two decimals, more where fewer would show a miss as the need itself (0.8996× of 0.9: "0.8996×")
    d = 2
    while d < 6 and v != t.need and round(v, d) == round(t.need, d):
        d += 1
    return {"us": f"{v:.{d}f} µs", "tbps": f"{v:.{d}f} TB/s"}.get(t.metric, f"{v:.{d}f}×")


def render(results):
    """The check as a markdown table, issue by issue, and a count."""
    lines = ["| issue | target | measured (worst row) | M timed | status | run |", "|---|---|---|---|---|---|"]
    met = 0
    for t, r in results:
        status = r["status"]
        met += status == "met"
        if r.get("peer"):
            status += f"; peer `{r['peer'][0]}` meets it ({_fmt(t, r['peer'][1])})"
        if r.get("variant"):
            status += f" (`{r['variant']}`)"
        ms = ",".join(map(str, r["ms"])) if r["ms"] else ("–" if t.op != "decode" else f"batch {t.m_range[0]}")
        lines.append(f"| {t.issue} | {t.what} | {_fmt(t, r['value'])} | {ms} | {status} | {r['date'] or '–'} |")
    lines.append(f"\n{met} of {len(results)} targets met.")
    return "\n".join(lines) + "\n"
