"""GGUF files (llama.cpp's Q4_0, Q4_1, Q4_K blocks) onto Int4Linear: a llama.cpp model run on this package's int4
kernels without re-quantizing it.

Every one of those formats is 4-bit codes q (0..15) with one scale and one offset per 32 weights of a row:

* Q4_0, 18 bytes a block of 32: fp16 d, 16 bytes of codes (weight j < 16 in the low nibble of byte j, weight
  16 + j in its high nibble); W = (q − 8) · d.
* Q4_1, 20 bytes: fp16 d, fp16 m, the codes as Q4_0's; W = q · d + m.
* Q4_K, 144 bytes a super-block of 256: fp16 d, fp16 dmin, 12 bytes holding eight 6-bit scales sc and mins mn,
  then 4 × 32 bytes of codes (bytes 32 c .. 32 c + 31: weights 64 c + j in the low nibbles, 64 c + 32 + j in the
  high ones); the 32 weights of sub-block i are W = d · sc_i · q − dmin · mn_i.

So a 32-weight group is Int4Linear's (q − z) · s with s = d (d · sc_i) and z = 8 (−m / d; dmin · mn_i / (d · sc_i)):
Q4_0 converts exactly, Q4_1 and Q4_K up to the rounding of z to the model's dtype (fp16: within 1% of a
quantization step; bf16: 6%; float32: exact to float rounding). A group whose scale is 0 is the constant offset:
it is stored as codes 1, zero 0, scale = that offset (exact).

The model itself is transformers' GGUF loader's (its architecture, tensor names, and the row order it undoes for
llama's q / k), de-quantized; then each Linear whose tensor is one of these formats is swapped for the Int4Linear
made from its blocks, its rows in the order the loader's own tensor processor gives them (found by passing it
the row numbers), and checked against the de-quantized weight (within 5% of a quantization step, else the dense
layer stays and a warning names it). Mixture-of-experts blocks' 3-D expert tensors (``ffn_{gate,up,down}_exps``)
go onto each expert's Int4Linear, the experts then grouped (``_experts_onto_int4``). Other tensor types (Q5 / Q6 /
Q8, IQ, F16 …), and 4-bit tensors of modules that are not Linears (the token embedding), stay as transformers
loads them: dense.
"""
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint_experts import INTERLEAVED
from .experts import fuse_dense_experts, group_experts, is_fused_experts, unfuse_experts
from .int4_checkpoints import _build

GROUP = 32
# block size in weights and in bytes
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}


def _f16(raw):
    """uint8 [..., 2] → float32 [...] (little-endian fp16)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _low_high(qs):
    """uint8 [..., 16·h] → uint8 [..., 32·h]: each run of bytes' low nibbles, then their high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def decode(raw, kind):
    """uint8 [N, bytes a row] of `kind` blocks → (codes uint8 [N, K], scale float32 [N, K / 32], offset float32
    [N, K / 32]): W = scale · q + offset for each group of 32 weights."""
    weights, size = BLOCKS[kind]
    n = raw.shape[0]
    b = raw.reshape(n, -1, size)
    if kind == "Q4_0":
        d = _f16(b[..., 0:2])
        return _low_high(b[..., 2:]).reshape(n, -1), d, -8 * d
    if kind == "Q4_1":
        return _low_high(b[..., 4:]).reshape(n, -1), _f16(b[..., 0:2]), _f16(b[..., 2:4])
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16].long())
    codes = _low_high(b[..., 16:].reshape(n, -1, 4, 32))  # [N, blocks, 4, 64]: sub-blocks 2 c, 2 c + 1
    return codes.reshape(n, -1), (d[..., None] * sc).reshape(n, -1), (-dmin[..., None] * mn).reshape(n, -1)


def _scale_min_k4(q):
    """The eight 6-bit (scale, min) pairs of a Q4_K block from its 12 bytes q [..., 12]: pairs 0..3 are the low 6
    bits of bytes 0..3 / 4..7; pairs 4..7 take 4 bits from bytes 8..11 and their top 2 from bytes 0..3 / 4..7."""
    lo, hi = q[..., 0:4], q[..., 4:8]
    top = q[..., 8:12]
    sc = torch.cat([lo & 63, (top & 15) | ((lo >> 6) << 4)], dim=-1).float()
    mn = torch.cat([hi & 63, (top >> 4) | ((hi >> 6) << 4)], dim=-1).float()
    return sc, mn


def to_int4(codes, scale, offset, dtype, bias=None):
    """Int4Linear (group 32) computing W = scale · q + offset per group: s = scale, z = −offset / scale; a group
    with scale 0 (the constant offset) as codes 1, zero 0, s = offset."""
    flat = scale == 0
    zeros = torch.where(flat, torch.zeros_like(offset), -offset / torch.where(flat, torch.ones_like(scale), scale))
    scales = torch.where(flat, offset, scale)
    if flat.any():
        codes = torch.where(flat.repeat_interleave(GROUP, dim=1), torch.ones_like(codes), codes)
    return _build(codes, zeros, scales, bias, dtype)  # (the group size follows: K / groups = 32)


def load_gguf_int4(path, dtype=None, progress=True):
    """transformers' model of GGUF file `path` (de-quantized, in `dtype`: default float16), every Linear stored
    as Q4_0 / Q4_1 / Q4_K an Int4Linear made from its blocks (module doc), in eval mode, on the CPU."""
    import gguf
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    path = Path(path)
    dtype = dtype or torch.float16
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.config.quantization_config = None  # (its weights are dense tensors now; swapped below)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    reader = gguf.GGUFReader(str(path))
    process, names = _tensor_names(model)
    todo = [t for t in reader.tensors if t.tensor_type.name in BLOCKS and len(t.shape) == 2]
    kept = []
    for t in tqdm(todo, desc="GGUF → Int4Linear", unit="layer", disable=not progress):
        n = int(t.data.shape[0])
        name, rows = process(t.name, n)
        owner = name[: -len(".weight")] if name is not None and name.endswith(".weight") else None
        old = _linear_or_none(model, owner)
        if old is None:  # (an embedding, or a tensor the model does not take: as transformers loaded it)
            continue
        if rows is None:
            kept.append(f"{owner} (its row order is unknown)")
            continue
        blocks = [part[rows] for part in decode(torch.from_numpy(t.data.copy()), t.tensor_type.name)]
        parent, _, attr = owner.rpartition(".")
        why = _swap_checked(model.get_submodule(parent), attr, old, blocks, t.tensor_type.name, dtype, owner)
        if why:
            kept.append(why)
    kept += _experts_onto_int4(model, reader, names, dtype)
    if kept:
        warnings.warn(f"load_int4_pretrained: {len(kept)} 4-bit GGUF tensor(s) stay dense Linears: "
                      f"{', '.join(kept[:5])}{' …' if len(kept) > 5 else ''}", RuntimeWarning, stacklevel=2)
    model.reparam_recipe = {"imported": {"gguf": path.name}}
    return model.eval()


def _linear_or_none(model, name):
    if name is None:
        return None
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return mod if type(mod) is nn.Linear else None


def _swap_checked(parent, attr, old, blocks, kind, dtype, where):
    """Swap parent.attr (the dense Linear `old`) for the Int4Linear of its decoded `blocks` (codes, scale, offset)
    where that gives old's de-quantized weight; else return why it stays dense (for the warning)."""
    codes, scale, offset = blocks
    if tuple(old.weight.shape) != tuple(codes.shape):
        return f"{where} (another shape)"
    layer = to_int4(codes, scale, offset, dtype, None if old.bias is None else old.bias.detach())
    if not _matches(layer, old.weight, scale):
        return f"{where} (its blocks do not give the de-quantized weight)"
    layer._reparam_method, layer._reparam_settings = "gguf", {"type": kind, "group_size": GROUP}
    setattr(parent, attr, layer)
    return None


def _matches(layer, dense, scale):
    """The layer's weight within 5% of a quantization step of the de-quantized one (a wrong row order or block
    layout is off by whole steps)."""
    step = scale.abs().repeat_interleave(GROUP, dim=1)
    err = (layer.to_dense().float() - dense.detach().float()).abs()
    return bool((err <= 0.05 * step + 1e-6 * dense.detach().float().abs().amax()).all())


def _tensor_names(model):
    """process(gguf name, rows) → (the model's tensor name or None, the row order or None): transformers' own
    GGUF name map and tensor processor, run on the row numbers (llama's q / k come back in HF's order)."""
    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    config = model.config.to_dict()  # (the HF names the GGUF metadata was mapped to: what processors read)
    try:
        processor = hf_gguf.TENSOR_PROCESSORS.get(model.config.model_type, hf_gguf.TensorProcessor)(config=config)
        names = hf_gguf.get_gguf_hf_weights_map(model, processor)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"`path`: this transformers version's GGUF internals are not the ones this loader "
                         f"reads ({type(e).__name__}: {e})") from None

    def process(name, n):
        probe = np.arange(n, dtype=np.float64)[:, None]
        try:
            out = processor.process(weights=probe, name=name, tensor_key_mapping=names,
                                    parsed_parameters={"config": config, "tensors": {}})
        except Exception:  # noqa: BLE001 — a tensor the processor cannot take on row numbers stays dense
            return None, None
        rows = np.asarray(out.weights)
        if rows.shape != (n, 1) or sorted(rows[:, 0].tolist()) != list(range(n)):
            return names.get(out.name), None
        return names.get(out.name), torch.from_numpy(rows[:, 0].astype(np.int64))

    return process, names


_EXPS = re.compile(r"^(?P<blk>blk\.\d+)\.ffn_(?P<w>gate|up|down)_exps\.weight$")


def _experts_onto_int4(model, reader, names, dtype):
    """Mixture-of-experts blocks: 3-D `blk.L.ffn_{gate,up,down}_exps` tensors [E, rows, bytes] onto each expert's
    Int4Linear. transformers stacks an expert's gate rows, then its up rows, into the experts module's
    gate_up_proj, so the module is split per expert (``unfuse_experts``) and each expert's Linears swapped as the
    2-D ones are (checked the same way); the experts are then grouped (one launch a projection), and a module
    none of whose experts converted is fused back. Returns the "stays dense" entries."""

    blocks = {}
    for t in reader.tensors:
        m = _EXPS.match(t.name)
        if m and t.tensor_type.name in BLOCKS and len(t.data.shape) == 3:
            blocks.setdefault(m["blk"], {})[m["w"]] = t
    kept = []
    for blk, parts in blocks.items():
        down = names.get(f"{blk}.ffn_down_exps")
        path = down.rpartition(".")[0] if down else None
        module = model.get_submodule(path) if path else None
        if not is_fused_experts(module) or not module.has_gate or type(module).__name__ in INTERLEAVED \
                or set(parts) != {"gate", "up", "down"}:
            kept.append(f"{blk} experts (a layout this loader does not split)")
            continue
        unfuse_experts(model, [path])
        experts = model.get_submodule(path)
        decoded = {w: [decode(torch.from_numpy(t.data[e].copy()), t.tensor_type.name) for e in range(experts.num_experts)]
                   for w, t in parts.items()}
        for e in range(experts.num_experts):
            stacked = [torch.cat(z) for z in zip(decoded["gate"][e], decoded["up"][e])]
            for proj, blocks, w in (("gate_up_proj", stacked, "gate"), ("down_proj", decoded["down"][e], "down")):
                expert = experts.expert(e)
                why = _swap_checked(expert, proj, getattr(expert, proj), blocks, parts[w].tensor_type.name, dtype,
                                    f"{path}.{e}.{proj}")
                if why:
                    kept.append(why)
    group_experts(model)
    fuse_dense_experts(model)
    return kept
