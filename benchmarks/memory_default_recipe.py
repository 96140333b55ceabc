"""Peak memory of compressing SmolLM2-135M with the default recipe, against the model's own size.

Reads the process's resident memory (Linux /proc) after loading the model and
at the end of `compress(..., inplace=True)`, so the Python/torch/transformers
runtime is measured separately from what compression adds.

    python benchmarks/memory_default_recipe.py [--calib-seqs 16 --calib-len 256]
"""
import argparse
import json
import resource
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    args = ap.parse_args()
    import torch  # noqa: F401  (runtime baseline first)
    import transformers  # noqa: F401

    from reparam_kernels.cli._models import load_any, read_text
    from reparam_kernels.compress import compress
    from reparam_kernels.compress.recipe import DEFAULT_RECIPE
    from reparam_kernels.evaluate import token_windows

    runtime = rss_bytes()
    model, tok = load_any("smollm2", "fp32")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = rss_bytes()
    calib = token_windows(tok, read_text("austen:emma"), args.calib_len, args.calib_seqs)
    t0 = time.perf_counter()
    compress(model, DEFAULT_RECIPE, calib=calib, inplace=True, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"model_bytes": model_bytes, "runtime_rss": runtime, "rss_after_load": loaded, "peak_rss": peak,
           "peak_over_runtime_vs_model": (peak - runtime) / model_bytes, "compress_seconds": seconds,
           "calib_tokens": args.calib_seqs * args.calib_len}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
