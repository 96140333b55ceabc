"""Compress a model with a recipe (calibrating on a text) and save it.

    python -m reparam_kernels compress --model <HF folder | .gguf | smollm2> --recipe recipe.yaml \
        --calib <text file | austen:emma | random> --out DIR [--calib-seqs N --calib-len T] [--report report.json]
"""
import argparse
import json
import time

from ._help import DTYPE_HELP, MODEL_HELP


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m reparam_kernels compress", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help=MODEL_HELP)
    ap.add_argument("--recipe", default=None, help="YAML/JSON recipe, or a built-in one by name: default, int8, int4, int4-mixed, int4-gptq, gptvq "
                    "(reparam_kernels/recipes/; default: Fisher-weighted whitened low rank, 20%% fewer parameters in attention "
                    "+ MLP as a whole, ranks allocated globally)")
    ap.add_argument("--calib", default=None, help="calibration text (file or austen:<novel>), or 'random': random token ids (the int4 "
                    "weighted_grid statistics without data); none: data-free")
    ap.add_argument("--calib-seqs", type=int, default=None, help="calibration sequences (default 16)")
    ap.add_argument("--calib-len", type=int, default=None,
                    help="tokens a sequence (default 256 of text; 512 random, as compress(calib='random'))")
    ap.add_argument("--out", default=None, help="folder to write the compressed checkpoint to (with the tokenizer)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the recipe against the model and print which layers each rule takes; compress nothing")
    ap.add_argument("--report", default=None, help="also write the per-layer report as JSON here")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=DTYPE_HELP)
    ap.add_argument("--device", default=None, help="move each block here while compressing it (e.g. cuda)")
    ap.add_argument("--expert-prior", type=int, default=None,
                    help="mixture-of-experts: rows of prior in each expert's calibration statistics where a quantizer "
                    "reads them (default: its input width; 0: only the tokens routed to it)")
    args = ap.parse_args(argv)
    if not args.out and not args.dry_run:
        ap.error("--out is required (or --dry-run)")

    from ..compress import compress
    from ..compress.calib import random_tokens
    from ..compress.experts import unfuse_experts
    from ..compress.methods import calibration_would_weight
    from ..compress.pipeline import warn_random_calib
    from ..compress.recipe import DEFAULT_RECIPE, parse_recipe, plan
    from ..compress.serialize import save_compressed
    from ..evaluate import token_windows
    from ._models import load_any, read_text

    recipe = args.recipe or DEFAULT_RECIPE
    model, tok = load_any(args.model, args.dtype)
    unfuse_experts(model)  # what compress() does first (same outputs), so the plan below names the experts
    if args.dry_run:
        print(plan_table(model, recipe, has_calib=args.calib is not None))
        return 0
    seqs = args.calib_seqs or 16
    if args.calib == "random":
        calib = random_tokens(model, seqs, args.calib_len or 512)
        warn_random_calib(plan(model, recipe, has_calib=True))  # as compress(calib="random") does
    else:
        calib = token_windows(tok, read_text(args.calib), args.calib_len or 256, seqs) if args.calib else None
    t0 = time.perf_counter()
    model, report = compress(model, recipe, calib=calib, inplace=True, device=args.device,
                             expert_prior=args.expert_prior)
    print(report.table(max_rows=None if len(report.layers) <= 40 else 20))
    print(f"compressed in {time.perf_counter() - t0:.1f} s")
    save_compressed(model, args.out, tokenizer=tok)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    print(f"saved to {args.out}")
    if calib is None and any(calibration_would_weight(r) for r in parse_recipe(recipe)):
        print("note: without --calib the int4 / log / vq grids are not weighted by input energy; --calib random "
              "weights them without data (SmolLM2 int4 g128: +22.0% perplexity → +8.9%, docs/quant.md)")
    return 0


def plan_table(model, recipe, has_calib):
    """What compress would do, rule by rule: the layers each takes, their parameters; and what stays dense."""
    from torch import nn

    from ..compress.recipe import is_conv1d, linear_features, plan

    chosen = plan(model, recipe, has_calib=has_calib)  # raises as compress would
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    params = {n: int(m.weight.numel()) for n, m in linears.items()}
    by_rule = {}  # plan()'s Rule objects, in the order of their first layer
    for name, rule in chosen.items():
        by_rule.setdefault(id(rule), (rule, []))[1].append(name)
    lines = ["| rule | method | settings | layers | parameters | e.g. |", "|---|---|---|---|---|---|"]
    for rule, names in by_rule.values():
        settings = ", ".join(f"{k}={v}" for k, v in rule.settings.items()) or "-"
        in_f, out_f = linear_features(linears[names[0]])
        lines.append(f"| `{rule.pattern}` | {rule.method} | {settings} | {len(names)} | "
                     f"{sum(params[n] for n in names):,} | {names[0]} [{out_f}×{in_f}] |")
    dense = [n for n in linears if n not in chosen]
    lines.append(f"| (no rule, or skip) | dense | - | {len(dense)} | {sum(params[n] for n in dense):,} | "
                 f"{dense[0] if dense else '-'} |")
    lines.append(f"\n{len(chosen)} of {len(linears)} Linears would be compressed; nothing was written (--dry-run).")
    return "\n".join(lines)
