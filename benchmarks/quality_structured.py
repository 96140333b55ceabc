"""Quality of block-circulant MLPs on SmolLM2-135M: perplexity on Pride and Prejudice after
projecting every MLP Linear (gate/up/down) to b×b circulant blocks, before and after distillation.

    python benchmarks/quality_structured.py [--blocks 64,128,256] [--windows 4] [--distill-steps 100]

Calibration/distillation text: Emma; evaluation text: Pride and Prejudice (kept apart).
The model's "dense" weights are de-quantized from a Q4_1 GGUF (see DESIGN.md): the
numbers are relative to the model as loaded. Writes
benchmarks/results/quality/structured.json. Runs on the CPU (slow) or a GPU.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_kernels as rk  # noqa: E402
from reparam_kernels import data, evaluate  # noqa: E402
from reparam_kernels.compress.distill import distill  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality", "structured.json")


def mlp_params(model):
    """Trainable parameter count of the MLP layers (dense or compressed)."""
    return sum(p.numel() for name, mod in model.named_modules() if ".mlp." in name and not list(mod.children())
               for p in mod.parameters(recurse=False))


def projection_errors(model):
    errs = [m.projection_error for name, m in model.named_modules() if getattr(m, "projection_error", None) is not None]
    return {"mean": sum(errs) / len(errs), "max": max(errs), "layers": len(errs)} if errs else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="64,128,256")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of --window tokens")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--distill-steps", type=int, default=100, help="0 skips distillation")
    p.add_argument("--distill-seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    teacher, tok = data.load_smollm2()
    teacher = teacher.to(args.device)
    eval_ids = evaluate.token_windows(tok, data.austen("prideprejudice"), args.window, args.windows)
    train_ids = evaluate.token_windows(tok, data.austen("emma"), args.distill_seq, max(8, args.distill_steps))
    base = evaluate.perplexity(teacher, windows=eval_ids, progress=False)
    print(f"dense: perplexity {base:.3f}", flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
        "eval": {"text": "Pride and Prejudice", "windows": eval_ids.shape[0], "window": args.window},
        "distill": {"text": "Emma", "steps": args.distill_steps, "seq_len": args.distill_seq, "lr": args.lr,
                    "alpha": 0.0, "temperature": 2.0},
        "device": args.device, "torch": torch.__version__,
        "dense": {"perplexity": base, "mlp_params": mlp_params(teacher)},
        "rows": [], "complete": False,
    }
    # For scale: the model with every MLP removed (down_proj zeroed: the MLP adds nothing).
    no_mlp = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, mod in no_mlp.named_modules():
            if name.endswith("mlp.down_proj"):
                mod.weight.zero_()
    result["mlp_removed"] = {"perplexity": evaluate.perplexity(no_mlp, windows=eval_ids, progress=False)}
    print(f"MLPs removed: perplexity {result['mlp_removed']['perplexity']:.3f}", flush=True)
    del no_mlp
    _write(result, args.out, t0)
    for b in [int(s) for s in args.blocks.split(",")]:
        recipe = {"rules": [{"match": "model.layers.*.mlp.*_proj", "method": "block_circulant", "block_size": b}]}
        student, _ = rk.compress(teacher, recipe, progress=False)
        row = {"method": "block_circulant", "block_size": b, "mlp_params": mlp_params(student),
               "projection_error": projection_errors(student)}
        row["perplexity"] = evaluate.perplexity(student, windows=eval_ids, progress=False)
        print(f"b={b}: MLP params {row['mlp_params']} (dense {result['dense']['mlp_params']}), "
              f"projection error {row['projection_error']['mean']:.3f}, perplexity {row['perplexity']:.3f}", flush=True)
        if args.distill_steps > 0:
            hist = distill(student, teacher, train_ids, steps=args.distill_steps, lr=args.lr,
                                    progress=False)
            row["distill_loss_first_last"] = [hist["loss"][0], hist["loss"][-1]] if hist["loss"] else None
            row["distill_seconds"] = hist["seconds"]
            row["perplexity_distilled"] = evaluate.perplexity(student, windows=eval_ids, progress=False)
            print(f"b={b}: after {args.distill_steps} distillation steps: perplexity "
                  f"{row['perplexity_distilled']:.3f}", flush=True)
        result["rows"].append(row)
        del student
        _write(result, args.out, t0)
    result["complete"] = True
    _write(result, args.out, t0)
    print(args.out)
    return 0


def _write(result, path, t0):
    """Atomic write after every row, so a run cut short still leaves what it measured."""
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
