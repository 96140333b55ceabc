"""Convert a model quantized elsewhere (GPTQ / AWQ / compressed-tensors folder, llama.cpp .gguf) to a checkpoint of this package.

    python -m reparam_kernels convert --model <GPTQ / AWQ / compressed-tensors folder | file.gguf> --out DIR [--dtype fp16]

The layers go onto Int4Linear (Int8Linear for compressed-tensors' 8-bit ones) as ``load_int4_pretrained`` makes
them — a .gguf file's Q4_0 / Q4_1 / Q4_K Linears, the rest of it dense — and DIR is a ``save_compressed``
folder: ``rk.load_pretrained(DIR)``, transformers' ``from_pretrained(DIR)`` (with reparam_kernels imported) and
the other commands' ``--model DIR`` load it without converting again.
"""
import argparse
from collections import Counter
from pathlib import Path

from ._help import DTYPE_HELP


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m reparam_kernels convert", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a GPTQ / AWQ / compressed-tensors Hugging Face folder, or a .gguf file")
    ap.add_argument("--out", required=True, help="folder to write the checkpoint to (with the tokenizer, where one loads)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                    help="the model's float type (default fp16; " + DTYPE_HELP.split("(")[0].strip() + ")")
    args = ap.parse_args(argv)

    from ..compress.int4_checkpoints import load_int4_pretrained
    from ..compress.serialize import save_compressed
    from ._models import DTYPES

    path = Path(args.model)
    if not (path.suffix == ".gguf" and path.is_file()) and not (path / "config.json").is_file():
        raise ValueError(f"`--model`: {path} is neither a .gguf file nor a checkpoint folder with config.json")
    model = load_int4_pretrained(path, DTYPES[args.dtype])
    tok = _tokenizer(path)
    save_compressed(model, args.out, tokenizer=tok)
    kinds = Counter(type(m).__name__ for m in model.modules() if getattr(m, "_reparam_method", None))
    print(", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f" layers; saved to {args.out}"
          + ("" if tok is not None else " (no tokenizer could be loaded from the model: none saved)"))
    return 0


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
