"""Benchmark result files, as DESIGN.md defines them, and the markdown made from them.

One file per op and GPU: ``<root>/<gpu>/<op>.json`` =
``{"gpu", "torch", "cuda", "date", "command", "rows": [...]}``, each row
``{"op", "mode": "graph"|"eager", "dtype", "M", "N", "K", "params": {...},
"ours_us", "cublas_us", "ratio": cublas_us / ours_us, "peers": {name: us}}``.

Optional extras (readers must tolerate them): top-level ``"ceilings"``
(copy TB/s and bf16 GEMM TFLOP/s measured in the same run) and ``"failures"``
(cases whose kernel failed the float64 check and so were not timed), ``"partial": true``
(the script was still running, or was cut short, when the file was written); per row
``"bytes"`` / ``"flops"`` (what the op must move / compute) from which achieved
TB/s and TFLOP/s follow, and ``"run"`` ({date, command, torch}: a row merged in from an earlier
run than the file's header names, ``merge()``).
"""
import datetime
import glob
import json
import os
import re
import shlex
import sys

import torch

REQUIRED_TOP = ("gpu", "torch", "cuda", "date", "command", "rows")
ROW_TYPES = {"op": str, "mode": str, "dtype": str, "M": int, "N": int, "K": int, "params": dict,
             "ours_us": (int, float), "cublas_us": (int, float), "ratio": (int, float), "peers": dict}
MODES = ("graph", "eager")
_SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# benchmarks/results of the source tree; for an installed package (no benchmarks/ beside it), of the cwd
DEFAULT_ROOT = os.path.join(_SOURCE_TREE if os.path.isdir(os.path.join(_SOURCE_TREE, "benchmarks")) else os.getcwd(),
                            "benchmarks", "results")
OUT_ENV = "REPARAM_BENCH_OUT"  # overrides the results root (e.g. a GPU runner's output folder)


def gpu_slug(name):
    """'NVIDIA H200' -> 'h200'; 'NVIDIA GeForce RTX 4090' -> 'rtx4090'; 'NVIDIA A100-SXM4-80GB' -> 'a100'."""
    words = [w for w in re.split(r"[\s_]+", name.lower()) if w not in ("nvidia", "geforce", "tesla", "")]
    if not words:
        raise ValueError(f"cannot make a GPU slug from {name!r}")
    if words[0] == "rtx" and len(words) > 1:
        return "rtx" + re.sub(r"[^a-z0-9]", "", words[1])
    return re.split(r"[^a-z0-9]", words[0])[0] or re.sub(r"[^a-z0-9]", "", words[0])


def environment(command=None):
    """The header fields of a result file, for the current process and GPU."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
    }


def make_row(op, mode, dtype, M, N, K, ours_us, cublas_us, params=None, peers=None, **extra):
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if not (ours_us > 0 and cublas_us > 0):
        raise ValueError(f"times must be positive, got ours_us={ours_us}, cublas_us={cublas_us}")
    row = {"op": op, "mode": mode, "dtype": dtype, "M": int(M), "N": int(N), "K": int(K),
           "params": dict(params or {}), "ours_us": float(ours_us), "cublas_us": float(cublas_us),
           "ratio": float(cublas_us) / float(ours_us), "peers": {k: float(v) for k, v in (peers or {}).items()}}
    row.update(extra)
    return row


def validate(data):
    """Raise ValueError naming the first field that breaks the DESIGN.md format."""
    if not isinstance(data, dict):
        raise ValueError(f"result file must be a JSON object, got {type(data).__name__}")
    for key in REQUIRED_TOP:
        if key not in data:
            raise ValueError(f"result file lacks the top-level field `{key}`")
    if not isinstance(data["rows"], list):
        raise ValueError("`rows` must be a list")
    for i, row in enumerate(data["rows"]):
        for key, typ in ROW_TYPES.items():
            if key not in row:
                raise ValueError(f"rows[{i}] lacks `{key}`")
            if not isinstance(row[key], typ) or isinstance(row[key], bool):
                raise ValueError(f"rows[{i}].{key} has type {type(row[key]).__name__}")
        if row["mode"] not in MODES:
            raise ValueError(f"rows[{i}].mode is {row['mode']!r}, expected one of {MODES}")
        if row["ours_us"] <= 0 or row["cublas_us"] <= 0:
            raise ValueError(f"rows[{i}] has a non-positive time")
        if abs(row["ratio"] - row["cublas_us"] / row["ours_us"]) > 1e-6 * max(1.0, row["ratio"]):
            raise ValueError(f"rows[{i}].ratio is not cublas_us / ours_us")
    return data


class Results:
    """Collects the rows of one op and writes ``<root>/<gpu slug>/<op>.json``."""

    def __init__(self, op, root=None, env=None, autosave=True):
        """autosave: rewrite the file (marked `"partial": true`) after every row, so a script
        cut short by a time limit still leaves what it measured; `write()` writes the final file."""
        self.op, self.autosave = op, autosave
        self.root = root or os.environ.get(OUT_ENV) or DEFAULT_ROOT
        self.env = env or environment()
        self.rows, self.failures, self.ceilings = [], [], None

    def add(self, **row_fields):
        row_fields.setdefault("op", self.op)
        row = make_row(**row_fields)
        self.rows.append(row)
        if self.autosave:
            self.write(partial=True)
        return row

    def fail(self, case, reason):
        """A case that was not timed (wrong result, unsupported): kept, visibly, in the file."""
        self.failures.append({"case": case, "reason": str(reason)})

    def to_dict(self, partial=False):
        data = dict(self.env)
        if partial:
            data["partial"] = True
        data["rows"] = list(self.rows)
        if self.ceilings is not None:
            data["ceilings"] = dict(self.ceilings)
        if self.failures:
            data["failures"] = list(self.failures)
        return validate(data)

    def path(self):
        return os.path.join(self.root, gpu_slug(self.env["gpu"]), f"{self.op}.json")

    def write(self, partial=False):
        return write_json(self.path(), self.to_dict(partial))


def write_json(path, data):
    """Write `data` as indented JSON to `path` (folders made), never leaving a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # atomic, even if killed mid-write
    return path


def load(path):
    with open(path) as f:
        return validate(json.load(f))


NOT_GPU_RESULTS = ("cpu", "quality")  # folders of CPU smoke runs (bench_decode --tiny) and accuracy studies


def is_decode(path):
    """bench_decode's files (decode.json, decode_<model>.json): end-to-end rows, not an op's."""
    name = os.path.basename(path)
    return name == "decode.json" or (name.startswith("decode_") and name.endswith(".json"))


def result_files(path):
    """(op files, decode files): the GPU result files under folder `path` (any depth), or `path` itself if a
    file; CPU smoke runs and quality studies left out."""
    paths = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    paths = [p for p in paths if os.path.basename(os.path.dirname(p)) not in NOT_GPU_RESULTS]
    return [p for p in paths if not is_decode(p)], [p for p in paths if is_decode(p)]


def row_key(row):
    """What a row measures: two rows with the same key are the same case (of one run or of two)."""
    return (row["op"], row["mode"], row["dtype"], row["M"], row["N"], row["K"], json.dumps(row["params"], sort_keys=True))


def merge(old, new):
    """`new` (a later run of the same op, perhaps of fewer cases: one dtype, a few M) over `old`: new's
    header, ceilings and failures, all of its rows, and old's rows for the cases it did not measure —
    each of those keeps its own run's date, command and torch in a per-row "run" (the tables mark them).
    No row is dropped: a case is gone only when a later run measured it again."""
    validate(old), validate(new)
    ops = {r["op"] for r in old["rows"] + new["rows"]}
    if len(ops) > 1 or old["gpu"] != new["gpu"]:
        raise ValueError(f"merge: one op on one GPU per file, got ops {sorted(ops)} on {old['gpu']!r} / {new['gpu']!r}")
    measured = {row_key(r) for r in new["rows"]}
    earlier = {k: old[k] for k in ("date", "command", "torch")}
    kept = [dict(r, run=r.get("run", earlier)) for r in old["rows"] if row_key(r) not in measured]
    merged = {k: v for k, v in new.items() if k != "rows"}
    merged["rows"] = sorted(new["rows"] + kept, key=lambda r: (r["mode"] != "graph", r["dtype"], r["N"], r["K"],
                                                              json.dumps(r["params"], sort_keys=True), r["M"]))
    return validate(merged)


# What must match for two decode files' rows to sit in one table (bench_decode's header fields)
DECODE_SETUP = ("gpu", "model", "config", "dtype", "compile", "context", "new_tokens", "attn_implementation")


def merge_decode(old, new):
    """A later decode run (``bench_decode.py``) over an earlier one of the same setup (DECODE_SETUP): new's
    header and rows, and old's rows for the (variant, batch) pairs it did not time, each marked with its own run
    ("run": date, torch) — a row's speedup stays the one against its own run's dense. A run of another setup
    (4 layers against 32, another attention, …) replaces the file whole: its rows would not compare."""
    if any(old.get(k) != new.get(k) for k in DECODE_SETUP):
        return new
    measured = {(r["variant"], r["batch"]) for r in new["rows"]}
    earlier = {k: old.get(k) for k in ("date", "torch")}
    kept = [dict(r, run=r.get("run", earlier)) for r in old["rows"] if (r["variant"], r["batch"]) not in measured]
    rows = new["rows"] + kept
    timed = {r["variant"] for r in rows}
    # new's "not timed" notes (a spent budget, mostly) for variants an earlier run did time would mislead
    skipped = [s for s in new.get("skipped", []) if s.get("variant") not in timed]
    return dict(new, rows=rows, skipped=skipped)


def _fmt_params(params):
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def _fmt_us(us):
    return f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def achieved(row):
    """(TB/s, TFLOP/s) the op achieved on the bytes / flops it must move, or None where unknown."""
    t = row["ours_us"] * 1e-6
    tbps = row["bytes"] / t / 1e12 if row.get("bytes") else None
    tflops = row["flops"] / t / 1e12 if row.get("flops") else None
    return tbps, tflops


def render_markdown(data):
    """One markdown table (with a header line naming GPU and versions) for one result file's dict."""
    validate(data)
    peer_names = sorted({p for r in data["rows"] for p in r["peers"]})
    lines = [f"**{data['rows'][0]['op'] if data['rows'] else '(no rows)'}** on {data['gpu']} "
             f"(torch {data['torch']}, CUDA {data['cuda']}, {data['date']}); `{data['command']}`"
             + (" — **partial: the run was cut short**" if data.get("partial") else ""), ""]
    if data.get("ceilings"):
        c = data["ceilings"]
        lines += [f"Ceilings measured in the same run: copy {c['copy_tbps']:.2f} TB/s, "
                  f"bf16 GEMM {c['bf16_gemm_tflops']:.0f} TFLOP/s.", ""]
    head = ["mode", "dtype", "M", "N", "K", "params", "ours µs", "cuBLAS µs", "ratio"]
    head += [f"{p} µs" for p in peer_names] + ["TB/s"]
    earlier = []  # the earlier runs that merged rows come from (merge()), numbered in the mode column
    for r in data["rows"]:
        if "run" in r and r["run"] not in earlier:
            earlier.append(r["run"])
    lines += [f"[{i + 1}]: rows from an earlier run, {run['date']} (torch {run['torch']}), `{run['command']}`"
              for i, run in enumerate(earlier)] + ([""] if earlier else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["rows"]:
        tbps, _ = achieved(r)
        mode = r["mode"] + (f" [{earlier.index(r['run']) + 1}]" if "run" in r else "")
        cells = [mode, r["dtype"], str(r["M"]), str(r["N"]), str(r["K"]), _fmt_params(r["params"]),
                 _fmt_us(r["ours_us"]), _fmt_us(r["cublas_us"]), f"{r['ratio']:.2f}×"]
        cells += [_fmt_us(r["peers"][p]) if p in r["peers"] else "-" for p in peer_names]
        copy = (data.get("ceilings") or {}).get("copy_tbps")
        cells.append(("-" if not tbps else f"{tbps:.2f}" + (f" ({100 * tbps / copy:.0f}% of copy)" if copy else "")))
        lines.append("| " + " | ".join(cells) + " |")
    for fail in data.get("failures", []):
        lines.append(f"\nNot timed: {fail['case']} — {fail['reason']}")
    return "\n".join(lines) + "\n"


def render_files(paths):
    """Markdown for several result files, one section each, in path order."""
    return "\n".join(render_markdown(load(p)) for p in sorted(paths))


def render_decode(data):
    """Markdown table for a decode.json (end-to-end tokens/s, written by benchmarks/bench_decode.py)."""
    for key in ("gpu", "torch", "rows", "compile", "context"):
        if key not in data:
            raise ValueError(f"decode file lacks `{key}`")
    cfg = data.get("config", {})
    lines = [f"**decode** on {data['gpu']} (torch {data['torch']}, {data.get('model', '')}, "
             f"{cfg.get('num_hidden_layers', '?')} layers, {data.get('dtype', '')}, compile `{data['compile']}`, "
             f"{data['context']} tokens of context, {data.get('new_tokens', '?')} timed tokens"
             + (f", attention `{data['attn_implementation']}`" if data.get("attn_implementation") else "")
             + f"; {data.get('date', '')})"
             + (" — **partial**" if data.get("partial") else ""), "",
             "| variant | batch | tokens/s | × dense | weight GB |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        speed = f"{r['speedup_vs_dense']:.2f}×" if r.get("speedup_vs_dense") else "-"
        variant = (r["variant"] + (f" (experts: {r['experts']})" if r.get("experts") else "")
                   + (f" (run of {str(r['run'].get('date'))[:10]})" if r.get("run") else ""))
        lines.append(f"| {variant} | {r['batch']} | {r['tokens_per_s']:.1f} | {speed} | "
                     f"{r.get('weight_bytes', 0) / 1e9:.2f} |")
    for s in data.get("skipped", []):
        lines.append(f"\nNot timed: {s.get('variant')} batch {s.get('batch', '-')} — {s.get('reason')}")
    lines += _decode_profile_table(data["rows"])
    return "\n".join(lines) + "\n"


def _decode_profile_table(rows):
    """Where a decode step's time goes, for the rows bench_decode --profile measured (µs a step)."""
    rows = [r for r in rows if r.get("profile")]
    if not rows:
        return []
    cats = []
    for r in rows:
        cats += [c for c in r["profile"]["us_per_step"] if c not in cats]
    out = ["", f"Decode step by kernel category (µs a step, {rows[0]['profile'].get('source', '')}; "
               "wall − sum: the gaps between kernels):", "",
           "| variant | batch | " + " | ".join(cats) + " | sum | wall | kernels |",
           "|---|---|" + "---|" * (len(cats) + 3)]
    for r in rows:
        p = r["profile"]
        out.append(f"| {r['variant']} | {r['batch']} | "
                   + " | ".join(f"{p['us_per_step'].get(c, 0.0):.1f}" for c in cats)
                   + f" | {p['sum_us_per_step']:.1f} | {p['wall_us_per_step']:.1f} | {p['count_per_step']:.0f} |")
    return out
