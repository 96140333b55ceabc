"""compressed-tensors checkpoints (llm-compressor's W4A16 / W8A16 models) onto Int4Linear / Int8Linear.

A compressed-tensors checkpoint (config.json ``quantization_config.quant_method`` "compressed-tensors") stores a
quantized Linear at PREFIX as:

* ``weight_packed`` int32 [N, ⌈K / f⌉] ("pack-quantized", f = 32 / bits values a word): input f i + j of
  output n at bits bits·j of word [n, i], each value the signed code + 2^(bits−1) (4-bit: 0..15);
  or ``weight`` int8 [N, K], the signed codes as they are ("naive-quantized", 8-bit);
* ``weight_scale`` [N, G] (strategy "group": G = K / group_size; "channel": G = 1; "tensor": one scale);
* ``weight_zero_point`` only for asymmetric layers: int32 [⌈N / f⌉, G] packed as the codes but along the
  outputs (output f c + j at bits bits·j of word [c, g]), the signed zero + 2^(bits−1); an int8 [N, G] of
  signed zeros in some older files;
* ``weight_g_idx`` int [K], the group of each input, where the layer was quantized with act order;
* ``weight_shape`` [2] = (N, K).

W[n, k] = (code − zero) · scale of k's group. With both shifted by 2^(bits−1) that is Int4Linear's
(q − z) · s for q, z the stored unsigned nibbles (a symmetric layer's z is 8), so a 4-bit layer converts by
unpacking its nibbles, exactly; act order becomes ``PermutedInputLinear`` as for GPTQ (``int4_checkpoints``).
An 8-bit layer maps onto Int8Linear (one scale a row, no zero) when it is symmetric and per channel.
Refused, with the reason: activation quantization (W8A8, W4A8: this package quantizes weights only), float
(FP8 / FP4) weights, other bit widths or formats (Marlin 2:4, sparse ones), 8-bit groups or zero points,
checkpoints not in the "compressed" state.
"""
import torch

from ..nn.quant import Int8Linear
from . import quantize as Q

FORMATS = ("pack-quantized", "naive-quantized")
SUFFIXES = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "bias")
MARKER = "weight_scale"  # a layer with this tensor is quantized


def check_config(qc):
    """Raise ValueError unless every config group of the compressed-tensors settings `qc` is one this module
    converts (module doc)."""
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"`path`: compressed-tensors checkpoint in state {status!r}: its weights are not stored "
                         f"compressed (load it as a dense model)")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")).lower() != "dense":
        raise ValueError(f"`path`: compressed-tensors sparsity format {sparsity.get('format')!r} is not taken")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("`path`: the compressed-tensors quantization_config has no config_groups")
    for name, group in groups.items():
        fmt = str(group.get("format") or qc.get("format", "")).lower()
        if fmt not in FORMATS:
            raise ValueError(f"`path`: config group {name!r} has format {fmt!r}; taken: {', '.join(FORMATS)}")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"`path`: config group {name!r} quantizes activations (W8A8 / W4A8); this package "
                             f"quantizes weights only")
        w = group.get("weights") or {}
        if str(w.get("type", "int")).lower() != "int":
            raise ValueError(f"`path`: config group {name!r} has {w.get('type')!r} weights; only int ones are taken")
        if w.get("num_bits") not in (4, 8):
            raise ValueError(f"`path`: config group {name!r} has {w.get('num_bits')!r}-bit weights; taken: 4, 8")
        strategy = str(w.get("strategy", "group")).lower()
        if strategy not in ("group", "channel", "tensor"):
            raise ValueError(f"`path`: config group {name!r} has strategy {strategy!r}; taken: group, channel, tensor")
        if w.get("num_bits") == 8 and (strategy == "group" or not w.get("symmetric", True)):
            raise ValueError(f"`path`: config group {name!r}: 8-bit weights map onto Int8Linear, which has one "
                             f"scale a row and no zero point (symmetric, per channel)")


def _scales(scale, n):
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise ValueError(f"`weight_scale` must be a floating tensor, got {getattr(scale, 'dtype', scale)}")
    scale = scale.cpu()
    if scale.numel() == 1:  # strategy "tensor": one scale for the layer
        return scale.reshape(1, 1).expand(n, 1).contiguous()
    if scale.dim() == 1:
        scale = scale[:, None]
    if scale.dim() != 2 or scale.shape[0] != n:
        raise ValueError(f"`weight_scale` must be [out_features = {n}, groups], got {tuple(scale.shape)}")
    return scale


def _zeros_unsigned(zp, n, groups, bits):
    """The zero points as the unsigned values the codes are stored as (2^(bits−1) where the layer has none)."""
    mid = 1 << (bits - 1)
    if zp is None:
        return torch.full((n, groups), float(mid))
    if zp.dtype == torch.int32:  # packed along the outputs: word [c, g] holds output f c + j
        vals = Q.unpack_words(zp.t().contiguous(), bits, "weight_zero_point")  # [G, ⌈N / f⌉ · f]
        if vals.shape[0] != groups or vals.shape[1] < n:
            raise ValueError(f"`weight_zero_point` must be int32 [⌈{n} / {32 // bits}⌉, {groups}], got "
                             f"{tuple(zp.shape)}")
        return vals[:, :n].t().double()
    if tuple(zp.shape) != (n, groups) or zp.is_floating_point():
        raise ValueError(f"`weight_zero_point` must be int32 (packed) or int8 [{n}, {groups}], got {zp.dtype} "
                         f"{tuple(zp.shape)}")
    return zp.cpu().double() + mid


def ct_to_linear(tensors, prefix, dtype=None):
    """Int4Linear (PermutedInputLinear for act order) or Int8Linear computing the compressed-tensors layer at
    `prefix` of the checkpoint's `tensors` exactly. dtype: that of scales, zeros and bias (default: the scales')."""
    from .int4_checkpoints import _act_order_perm, _build

    get = lambda s: tensors.get(f"{prefix}.{s}")  # noqa: E731
    packed, raw, shape = get("weight_packed"), get("weight"), get("weight_shape")
    if packed is not None:
        if shape is None or shape.numel() != 2:
            raise ValueError(f"`path`: packed layer {prefix!r} lacks weight_shape [2]")
        n, k = (int(v) for v in shape.reshape(-1))
        bits = 4 if packed.shape[-1] == -(-k // 8) else 8 if packed.shape[-1] == -(-k // 4) else None
        if packed.dim() != 2 or packed.shape[0] != n or bits is None:
            raise ValueError(f"`path`: {prefix}.weight_packed {tuple(packed.shape)} does not hold 4- or 8-bit "
                             f"values of a [{n}, {k}] weight")
        codes = Q.unpack_words(packed, bits, f"{prefix}.weight_packed")[:, :k]  # unsigned: signed code + 2^(bits−1)
    elif raw is not None and raw.dtype == torch.int8:
        bits, (n, k) = 8, raw.shape
        codes = (raw.cpu().to(torch.int16) + 128).to(torch.uint8)
    else:
        raise ValueError(f"`path`: quantized layer {prefix!r} has neither weight_packed nor an int8 weight")
    scales = _scales(get("weight_scale"), n)
    groups = scales.shape[1]
    if k % groups:
        raise ValueError(f"`path`: {prefix}: {groups} groups of scales do not split in_features = {k} evenly")
    zeros = _zeros_unsigned(get("weight_zero_point"), n, groups, bits)
    g_idx = get("weight_g_idx")
    perm = None if g_idx is None else _act_order_perm(g_idx, k, groups)
    bias = get("bias")
    if bits == 8:
        if groups != 1 or perm is not None or not torch.all(zeros == 128):
            raise ValueError(f"`path`: {prefix}: 8-bit weights map onto Int8Linear (symmetric, one scale a row)")
        layer = Int8Linear(k, n, bias=bias is not None, dtype=dtype or scales.dtype)
        with torch.no_grad():
            layer.qweight.copy_((codes.to(torch.int16) - 128).to(torch.int8))
            layer.scales.copy_(scales[:, 0])
            if bias is not None:
                layer.bias.copy_(bias)
        return layer
    if perm is not None:
        codes = codes[:, perm]  # column i of the layer's codes is x's column perm[i]: groups become runs
    return _build(codes, zeros.to(scales.dtype), scales, bias, dtype, perm)
