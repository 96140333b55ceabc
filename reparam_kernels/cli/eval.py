"""Perplexity of a model (original or compressed checkpoint) on a text.

    python -m reparam_kernels eval --model <DIR | HF folder | .gguf | smollm2> --text <file | austen:prideprejudice>
        [--window 1024] [--windows 4]
"""
import argparse
import json

from ._help import DTYPE_HELP, MODEL_HELP, TEXT_HELP


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m reparam_kernels eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help=MODEL_HELP)
    ap.add_argument("--text", required=True, help=TEXT_HELP)
    ap.add_argument("--window", type=int, default=1024, help="tokens a window (default 1024)")
    ap.add_argument("--windows", type=int, default=4, help="number of windows scored (0: all)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=DTYPE_HELP)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)

    from ..evaluate import perplexity
    from ._models import load_any, read_text

    model, tok = load_any(args.model, args.dtype)
    ppl = perplexity(model, tok, read_text(args.text), window=args.window, max_windows=args.windows or None)
    if args.json:
        print(json.dumps({"model": args.model, "text": args.text, "window": args.window,
                          "windows": args.windows, "perplexity": ppl}))
    else:
        print(f"perplexity {ppl:.4f}  ({args.windows or 'all'} windows of {args.window} tokens of {args.text})")
    return 0
