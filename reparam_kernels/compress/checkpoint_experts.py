"""Mixture-of-experts layers of GPTQ / AWQ / compressed-tensors checkpoints onto transformers 5's experts modules.

Those tools quantize each expert's projections as Linears of their own: ``<block>.experts.<e>.gate_proj`` /
``up_proj`` / ``down_proj`` (Qwen-MoE, DeepSeek, OLMoE, …), or Mixtral's ``<layer>.block_sparse_moe.experts.<e>.w1``
(gate) / ``w3`` (up) / ``w2`` (down). transformers 5 keeps a block's experts as one module of 3-D parameters
(gate and up stacked as ``gate_up_proj``, gate rows first), and Mixtral's block is ``<layer>.mlp``. The loader
splits such a module per expert (``experts.unfuse_experts``: ``<block>.experts.<e>.gate_up_proj`` / ``down_proj``
Linears), stacks each expert's converted gate and up rows into one layer of their format (``nn.fused``'s row
concatenation: exact), and after loading ``group_experts`` runs every projection's experts as one grouped launch
where their format allows it. An act-order expert's gate and up share GPTQ's input order (one input, one
Hessian), so they stack behind one gather; where they do not, the loader says so.
"""
import re

from ..nn.fused import _concat, _fuse_key
from .experts import UnfusedExperts, fused_experts_names, unfuse_experts

_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
# checkpoint names transformers 5 renamed (its conversion mapping), tried where the original names no module
RENAMES = ((".block_sparse_moe.", ".mlp."),)
# experts modules whose gate_up_proj alternates gate and up rows (this loader stacks gate's rows, then up's)
INTERLEAVED = ("GptOssExperts",)


def model_key(modules, key):
    """`key` (a module or tensor name of the checkpoint) as the model, whose module names are `modules`, calls
    it: renamed (RENAMES) where the model has no module of the original block's name but one of the new."""
    for old, new in RENAMES:
        i = key.find(old)
        if i >= 0 and key[: i + len(old) - 1] not in modules and key[:i] + new[:-1] in modules:
            return key[:i] + new + key[i + len(old):]
    return key


def place(model, layers):
    """{module name of `model`: layer} for the converted `layers` {checkpoint prefix: layer}: names renamed where
    the model renamed them, each expert's gate and up stacked into its gate_up_proj after the fused experts
    modules that hold them are split per expert (in place)."""
    modules = {n for n, _ in model.named_modules()}
    experts, out = {}, {}
    for prefix, layer in layers.items():
        name = model_key(modules, prefix)
        m = _EXPERT.match(name)
        if name in modules or m is None:
            out[name] = layer
            continue
        experts.setdefault((m["experts"], int(m["e"])), {})[_ROLE[m["proj"]]] = (prefix, layer)
    fused = set(fused_experts_names(model))
    unfuse_experts(model, sorted({path for path, _ in experts} & fused))
    for (path, e), parts in sorted(experts.items()):
        module = _experts_module(model, path, parts)
        if "down" in parts:
            out[f"{path}.{e}.down_proj"] = parts["down"][1]
        if "gate" in parts or "up" in parts:
            out[f"{path}.{e}.{module.up_name}"] = _gate_up(parts, module.has_gate)
    return out


def _experts_module(model, path, parts):
    some = next(iter(parts.values()))[0]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"`path`: quantized layer {some!r} has no module in the {type(model).__name__} "
                         f"architecture") from None
    if not isinstance(module, UnfusedExperts):
        raise ValueError(f"`path`: quantized expert layer {some!r}: the architecture's {path} is a "
                         f"{type(module).__name__}, not an experts module this loader splits")
    if type(module._fused).__name__ in INTERLEAVED:
        raise ValueError(f"`path`: {type(module._fused).__name__} interleaves gate and up rows in gate_up_proj; "
                         f"per-expert checkpoints of it are not taken")
    return module


def _gate_up(parts, has_gate):
    """The expert's gate and up layers as one with gate's rows first (transformers' gate_up_proj)."""
    if not has_gate:
        if "gate" in parts or "up" not in parts:
            raise ValueError(f"`path`: {next(iter(parts.values()))[0]}: these experts have an up_proj and no gate")
        return parts["up"][1]
    missing = [r for r in ("gate", "up") if r not in parts]
    if missing:
        prefix = next(iter(parts.values()))[0]
        raise ValueError(f"`path`: expert layer {prefix!r} has no quantized {missing[0]} projection beside it; "
                         f"the architecture stacks gate and up into one")
    (gate_name, gate), (_, up) = parts["gate"], parts["up"]
    key = _fuse_key(gate)
    if key is None or key != _fuse_key(up):
        raise ValueError(f"`path`: {gate_name} and its up projection differ in format, group size or (act order) "
                         f"input order, so they cannot be stacked into one gate_up_proj")
    merged, _, _ = _concat([gate, up])
    return merged
