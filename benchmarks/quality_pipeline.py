"""The real-model report: SmolLM2-135M-Instruct compressed on Jane Austen, on the CPU.

Calibrate on Emma, distill on Persuasion, evaluate perplexity on Pride and
Prejudice (windows of 1024 tokens). Methods: low rank plain vs whitened at
10/20/40% fewer parameters in the attention + MLP Linears, quantization,
structured and combinations (whatever layers this installation has), with a
short CPU distillation for some. Writes benchmarks/results/quality/pipeline.json
(after every configuration, so a partial run keeps its rows; --resume skips
rows already there) and a Pareto plot (perplexity against bytes).

    python benchmarks/quality_pipeline.py [--windows 2] [--distill-steps 100] [--only name1,name2] [--resume]

Note: SmolLM2's "dense" weights here are de-quantized from a Q4_1 GGUF (the
only offline copy), so all numbers are relative to that model as loaded.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reparam_kernels as rk  # noqa: E402
from reparam_kernels import data, evaluate  # noqa: E402
from reparam_kernels.compress.methods import METHODS  # noqa: E402
from reparam_kernels.compress.recipe import parse_recipe  # noqa: E402

ATTN, MLP = "model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"


def lowrank(ratio, whiten):
    return {ATTN: {"method": "lowrank", "ratio": ratio, "whiten": whiten},
            MLP: {"method": "lowrank", "ratio": ratio, "whiten": whiten}}


def both(method, **s):
    return {ATTN: {"method": method, **s}, MLP: {"method": method, **s}}


def fisher_global(ratio, method="lowrank", **extra):
    """The default recipe's kind: Fisher-weighted whitened SVD, one global budget (compress/allocate.py)."""
    rule = {"method": method, "ratio": ratio, "whiten": True, "fisher": True, "allocate": "global", **extra}
    return {ATTN: rule, MLP: rule}


# name → (recipe or callable(model, calib) → recipe, distill?)
CONFIGS = {  # in run order: the headline rows first
    "lowrank-fisher-global-20": (fisher_global(0.2), True),
    "lowrank-fisher-global-40": (fisher_global(0.4), True),
    # the same with pivoted storage r·(out + in − r) (nn.PivotedLowRankLinear): larger ranks, same budget
    "lowrank-fisher-global-20-pivoted": (fisher_global(0.2, pivoted=True), True),
    "lowrank-fisher-global-40-pivoted": (fisher_global(0.4, pivoted=True), True),
    "combo-lowrank20-int4-fisher-global": (fisher_global(0.2, "lowrank_int4"), True),
    "lowrank-fisher-global-10": (fisher_global(0.1), False),
    "lowrank-whitened-20": (lowrank(0.2, True), True),
    "lowrank-whitened-40": (lowrank(0.4, True), True),
    "lowrank-plain-20": (lowrank(0.2, False), False),
    "lowrank-plain-40": (lowrank(0.4, False), False),
    "lowrank-whitened-10": (lowrank(0.1, True), False),
    "lowrank-plain-10": (lowrank(0.1, False), False),
    "int8-rtn": (both("int8"), False),
    "int4-rtn": (both("int4", weighted_grid=False), False),  # plain round to nearest, though calib is passed
    "combo-lowrank20-int4": (both("lowrank_int4", ratio=0.2), True),
    "combo-mlp-lowrank20-attn-int8": ({ATTN: {"method": "int8"}, MLP: {"method": "lowrank", "ratio": 0.2}}, False),
    "block-circulant-b64": (both("block_circulant", block_size=64), False),
    # issue 4: only the MLP Linears projected to b x b circulant blocks, then distilled
    "block-circulant-mlp-b64": ({MLP: {"method": "block_circulant", "block_size": 64}}, True),
    "block-circulant-mlp-b128": ({MLP: {"method": "block_circulant", "block_size": 128}}, True),
    "block-circulant-mlp-b256": ({MLP: {"method": "block_circulant", "block_size": 256}}, True),
    "int4-gptq": (both("int4", gptq=True), False),
    # GPTQ (act order) on the float-zero + clipping grid, then distillation of the int4 scales and zeros
    "int4-gptq-clip": (both("int4", gptq=True, integer_zero=False, clip_steps=10), True),
    # the int4 recipe's layers (grid weighted by Emma's input energies, polished), distilled: scales and zeros
    # train; and the same plus a rank-16 correction of each layer's error, whose factors train too (QLoRA-like)
    "int4-weighted": (both("int4"), True),
    "int4-weighted-c16": (both("int4", correction_rank=16), True),
    # per-row 16-entry tables (lut_linear), GPTQ codes + least-squares tables on Emma, then distillation of the
    # tables (codes frozen)
    "vq-row-gptq": (both("vq", rows_per_codebook=1, gptq=True), True),
    # GPTVQ: pairs of inputs, a 256-pair codebook per 64 output rows (vq_linear), GPTQ codes + least-squares
    # codebooks on Emma, then distillation of the codebooks (codes frozen)
    "vq-d2-r64-gptq": (both("vq", d=2, bits=8, rows_per_codebook=64, gptq=True), True),
}
DEFAULT_RUN = list(CONFIGS)


def required_methods(recipe):
    return {s["method"] for s in recipe.values()}


def measure_default_recipe(out_dir):
    """Default-recipe compression in a fresh process (time, peak RSS vs the fp32 model)."""
    code = (
        "import resource, time, torch, json, sys; torch.set_num_threads(2)\n"
        "import reparam_kernels as rk; from reparam_kernels import data, evaluate\n"
        "m, tok = data.load_smollm2(); calib = evaluate.token_windows(tok, data.austen('emma'), 256, 16)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "fp32 = sum(p.numel() * 4 for p in m.parameters())\n"
        "t = time.perf_counter(); _, rep = rk.compress(m, 'reparam_kernels/recipes/default.yaml', calib=calib, "
        "inplace=True, progress=False); dt = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'seconds': dt, 'peak_rss_bytes': peak, 'rss_before_compress_bytes': base, "
        "'fp32_model_bytes': fp32, 'peak_over_fp32_model': peak / fp32, "
        "'param_reduction': rep.totals()['param_reduction']}))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        return {"error": res.stderr[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def linear_bytes(model, elements=False):
    """Bytes of the attention + MLP Linears (dense or compressed) and their dense weight count
    (and, with elements=True, the elements they store)."""
    import fnmatch

    from reparam_kernels.compress.report import state_bytes
    total, weights, stored = 0, 0, 0
    for name, mod in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in (ATTN, MLP)):
            n, b = state_bytes(mod)
            total, stored = total + b, stored + n
            weights += mod.in_features * mod.out_features
    return (total, weights, stored) if elements else (total, weights)


def params(model):
    return sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--distill-steps", type=int, default=80)
    ap.add_argument("--distill-len", type=int, default=128)
    ap.add_argument("--distill-batch", type=int, default=2)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-text", default="persuasion",
                    help="comma-separated Austen novels to distill on (never prideprejudice, the evaluation text)")
    ap.add_argument("--distill-eval-every", type=int, default=0,
                    help="also evaluate perplexity every N distillation steps (the curve goes in the row)")
    ap.add_argument("--distill-bf16", action="store_true",
                    help="distill under bf16 autocast (fp32 parameters; ~1.6x faster on an AVX512-BF16 CPU)")
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--calib-when-needed", action="store_true",
                    help="pass calibration data only to recipes whose methods need it (faster; no output errors "
                         "reported for data-free methods)")
    ap.add_argument("--skip-default-timing", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="only redraw the plot and print the table from --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quality/pipeline.json"))
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (use 1 when another job shares the cores: oversubscribed threads thrash)")
    args = ap.parse_args()
    unknown = [n for n in (args.only or "").split(",") if n and n not in CONFIGS]
    if unknown:  # before minutes of loading and evaluating
        ap.error(f"--only: unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    novels = args.distill_text.split(",")
    if "prideprejudice" in novels:
        ap.error("--distill-text must not include prideprejudice: it is the evaluation text")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.report_only:
        result = json.loads(out.read_text())
        plot(result, out.with_name(out.stem + "_pareto.png"))
        print(table(result))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    result.update({"model": "SmolLM2-135M-Instruct (de-quantized from Q4_1 GGUF, fp32)",
                   "calib": f"Emma, {args.calib_seqs} x {args.calib_len} tokens",
                   "distill": f"{', '.join(n.capitalize() for n in novels)}, {args.distill_steps} steps x "
                              f"{args.distill_batch} x {args.distill_len} tokens, KL (T=1), lr {args.distill_lr} cosine"
                              + (", bf16 autocast" if args.distill_bf16 else ""),
                   "eval": f"Pride and Prejudice, first {args.windows} windows of 1024 tokens",
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                   "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])})
    rows = {r["name"]: r for r in result.get("rows", [])}

    def save():
        result["rows"] = list(rows.values())
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

    teacher, tok = data.load_smollm2()
    calib = evaluate.token_windows(tok, data.austen("emma"), args.calib_len, args.calib_seqs)
    eval_w = evaluate.token_windows(tok, data.austen("prideprejudice"), 1024, args.windows)
    n_distill = args.distill_steps * args.distill_batch
    dist_data = (torch.cat([evaluate.token_windows(tok, data.austen(n), args.distill_len) for n in novels])[:n_distill]
                 if n_distill > 0 else None)
    if dist_data is not None and dist_data.shape[0] < n_distill:
        print(f"distillation text has {dist_data.shape[0]} windows for {n_distill} sequences: it is cycled", flush=True)
    if "dense" not in rows:
        b, w = linear_bytes(teacher)
        rows["dense"] = {"name": "dense", "params": params(teacher), "linear_bytes": b, "bits_per_weight": 8 * b / w,
                         "param_reduction": 0.0, "ppl": evaluate.perplexity(teacher, windows=eval_w, desc="dense")}
        save()
    base = rows["dense"]["ppl"]
    print(f"dense perplexity {base:.3f}", flush=True)
    names = args.only.split(",") if args.only else DEFAULT_RUN
    for name in names:
        recipe, do_distill = CONFIGS[name]
        if name in rows and (not do_distill or "ppl_distilled" in rows[name]):
            continue
        missing = required_methods(recipe) - set(METHODS)
        row = {"name": name}
        try:
            t0 = time.perf_counter()
            needs = any(METHODS[r.method].needs_calib and METHODS[r.method].needs_calib(r.settings)
                        for r in parse_recipe(recipe))
            model, rep = rk.compress(teacher, recipe, calib=calib if needs or not args.calib_when_needed else None)
            row["compress_seconds"] = time.perf_counter() - t0
        except ValueError as e:  # a method whose layers this installation lacks
            print(f"{name}: skipped ({e})", flush=True)
            rows[name] = {"name": name, "skipped": str(e)[:300], "missing": sorted(missing)}
            save()
            continue
        t = rep.totals()
        b, w, n = linear_bytes(model, elements=True)
        # param_reduction: over ALL attention + MLP Linears (layers an allocation kept dense included)
        row.update(params=params(model), linear_bytes=b, bits_per_weight=8 * b / w, param_reduction=1 - n / w,
                   compressed_layers_param_reduction=t["param_reduction"], mean_output_error=t["mean_output_error"],
                   recipe=recipe if isinstance(recipe, dict) and len(json.dumps(recipe)) < 2000 else "generated")
        row["ppl"] = evaluate.perplexity(model, windows=eval_w, desc=name)
        row["ppl_rel"] = row["ppl"] / base - 1
        print(f"{name}: ppl {row['ppl']:.3f} ({100 * row['ppl_rel']:+.1f}%), -{100 * t['param_reduction']:.1f}% params, "
              f"{row['bits_per_weight']:.2f} bits/weight, {row['compress_seconds']:.0f} s", flush=True)
        rows[name] = row
        save()
        if do_distill and args.distill_steps > 0:
            curve = row.setdefault("ppl_distill_curve", [])

            def checkpoint(step, model=model, curve=curve):
                if args.distill_eval_every and (step + 1) % args.distill_eval_every == 0 and step + 1 < args.distill_steps:
                    curve.append([step + 1, evaluate.perplexity(model, windows=eval_w, progress=False)])
                    print(f"{name}: step {step + 1}: ppl {curve[-1][1]:.3f}", flush=True)
                    save()

            hist = rk.distill(model, teacher, dist_data, alpha=0.0, temperature=1.0, steps=args.distill_steps,
                              lr=args.distill_lr, batch_size=args.distill_batch,
                              amp_dtype=torch.bfloat16 if args.distill_bf16 else None, on_step=checkpoint)
            row["distill_seconds"] = hist["seconds"]
            row["distill_loss"] = [hist["loss"][0], hist["loss"][-1]]
            row["ppl_distilled"] = evaluate.perplexity(model, windows=eval_w, desc=name + "+KD")
            row["ppl_distilled_rel"] = row["ppl_distilled"] / base - 1
            print(f"{name} + distillation: ppl {row['ppl_distilled']:.3f} ({100 * row['ppl_distilled_rel']:+.1f}%), "
                  f"{hist['seconds']:.0f} s", flush=True)
            save()
        del model
    if not args.skip_default_timing and "default_recipe" not in result:
        del teacher
        result["default_recipe"] = measure_default_recipe(out.parent)
        print("default recipe:", result["default_recipe"], flush=True)
        save()
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    save()
    plot(result, out.with_name(out.stem + "_pareto.png"))
    print(table(result))


def table(result):
    base = next(r for r in result["rows"] if r["name"] == "dense")["ppl"]
    lines = ["| method | params removed (attn+MLP) | bits / original weight | perplexity | vs dense | + distillation | vs dense |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | not available in this installation | | | | | |")
            continue
        kd = f"{r['ppl_distilled']:.2f} | {100 * (r['ppl_distilled'] / base - 1):+.1f}%" if "ppl_distilled" in r else "— | —"
        lines.append(f"| {r['name']} | {100 * r['param_reduction']:.1f}% | {r['bits_per_weight']:.2f} | {r['ppl']:.2f} | "
                     f"{100 * (r['ppl'] / base - 1):+.1f}% | {kd} |")
    return "\n".join(lines)


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in result["rows"]:
        if "ppl" not in r:
            continue
        mb = r["linear_bytes"] / 2 ** 20
        ax.scatter(mb, r["ppl"], color="tab:blue" if r["name"] != "dense" else "black")
        ax.annotate(r["name"], (mb, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "ppl_distilled" in r:
            ax.scatter(mb, r["ppl_distilled"], color="tab:green", marker="^")
            ax.plot([mb, mb], [r["ppl"], r["ppl_distilled"]], color="tab:green", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("attention + MLP Linear bytes (MiB)")
    ax.set_ylabel("perplexity on Pride and Prejudice (log)")
    ax.set_title("SmolLM2-135M: perplexity vs size (blue: compressed, green ▲: + distillation)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
