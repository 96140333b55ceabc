"""GPTQ and AWQ 4-bit checkpoints onto Int4Linear: a model quantized by another tool, run on this package's
int4 kernels without re-quantizing it.

Both formats store W[n, k] = (q[n, k] − z[n, g(k)]) · s[n, g(k)], 4-bit codes q and zero points z packed
eight to an int32 and scales s [G, N] — Int4Linear's own math (its zeros a number per group) — so a layer
converts by re-packing its codes, exactly:

* GPTQ (``quant_method`` "gptq": AutoGPTQ, GPTQModel, optimum): qweight int32 [K / 8, N], the code of input
  8 i + j of output n at bits 4 j of qweight[i, n]; qzeros int32 [G, N / 8], the zero of output 8 c + j at
  bits 4 j of qzeros[g, c]; scales [G, N]; g_idx int32 [K], the group of each input. ``checkpoint_format``
  "gptq" (v1, the default) stores each zero minus one: the zero is the stored nibble + 1 — 16 for a stored
  15, as the reference GPTQ kernels compute it —; "gptq_v2" stores it as it is.
* AWQ (``quant_method`` "awq", ``version`` "gemm": AutoAWQ, llm-awq): qweight int32 [K, N / 8] and qzeros
  int32 [G, N / 8], output 8 c + AWQ_ORDER[j] at bits 4 j; scales [G, N]; groups are runs of K / G inputs.

Act order (GPTQ ``desc_act`` with a g_idx other than k // group_size): a group is a set of scattered inputs.
Sorting the inputs by group makes each a run, so such a layer becomes ``PermutedInputLinear(Int4Linear)``: x's
columns gathered before the kernel (``nn/permuted.py``). A down_proj's gather is then folded into its MLP's
gate / up rows (``fold_orders.py``: the same outputs, one gather fewer an MLP).

compressed-tensors checkpoints (llm-compressor's W4A16 / W8A16) are converted by ``ct_checkpoints.py``.
Mixture-of-experts checkpoints' per-expert layers are placed into transformers 5's experts modules by
``checkpoint_experts.py``.
A ``.gguf`` file goes to ``gguf_int4.py`` (llama.cpp's Q4_0 / Q4_1 / Q4_K blocks).

``load_int4_pretrained(path)`` loads a Hugging Face checkpoint folder of any of these formats (config.json with its
``quantization_config``, one or several safetensors files) into the transformers architecture with every
quantized Linear an Int4Linear. Not taken (a ValueError says so): bits other than 4, AWQ's "gemv" / "marlin"
packings, GPTQ's Marlin-repacked or other checkpoint formats, groups that are not a multiple of 32 inputs.
"""
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..nn.permuted import PermutedInputLinear
from ..nn.quant import Int4Linear
from . import checkpoint_experts
from . import ct_checkpoints as CT
from . import quantize as Q
from .experts import group_experts
from .fold_orders import fold_act_order

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's packing: the j-th nibble of an int32 holds output 8 c + AWQ_ORDER[j]


def _nibbles(packed, name):
    """int32 [R, C] → uint8 [R, C, 8]: nibble j (bits 4 j .. 4 j + 3) of each word."""
    return Q.unpack_words(packed, 4, name).reshape(packed.shape[0], packed.shape[1], 8)


def _check_scales(scales, n, name="scales"):
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D floating tensor [groups, out_features]")
    if scales.shape[1] != n:
        raise ValueError(f"`{name}` has {scales.shape[1]} columns, the weight has out_features = {n}")
    return scales.shape[0]


def _group_size(k, groups):
    if groups < 1 or k % groups:
        raise ValueError(f"{groups} groups of scales do not split in_features = {k} evenly")
    g = k // groups
    if g % 32:
        raise ValueError(f"groups of {g} inputs: Int4Linear's kernels need a multiple of 32 (one 16-byte load of "
                         f"a row's codes stays in one group)")
    return g


def _build(codes_nk, zeros_ng, scales_ng, bias, dtype, perm=None):
    """Int4Linear from codes [N, K] (0..15), zeros and scales [N, G]; wrapped in PermutedInputLinear when the
    codes' columns are x's columns in order `perm`."""
    n, k = codes_nk.shape
    g = _group_size(k, scales_ng.shape[1])
    dtype = dtype or scales_ng.dtype
    layer = Int4Linear(k, n, group_size=g, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        layer.qweight.copy_(Q.pack_int4(codes_nk))
        layer.scales.copy_(scales_ng)
        layer.zeros.copy_(zeros_ng)
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ValueError(f"`bias` must be [out_features] = [{n}], got {tuple(bias.shape)}")
            layer.bias.copy_(bias)
    return layer if perm is None else PermutedInputLinear(layer, perm)


def _act_order_perm(g_idx, k, groups):
    """None when g_idx is k // (K / G) (groups are runs); else the order of x's columns that makes them runs."""
    g_idx = torch.as_tensor(g_idx).cpu().long()
    if g_idx.shape != (k,):
        raise ValueError(f"`g_idx` must be [in_features] = [{k}], got {tuple(g_idx.shape)}")
    size = k // groups
    if torch.equal(g_idx, torch.arange(k, device="cpu") // size):
        return None
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"`g_idx` has groups outside 0..{groups - 1}")
    if not torch.all(torch.bincount(g_idx, minlength=groups) == size):
        raise ValueError(f"`g_idx` must put {size} inputs in each of its {groups} groups (act order permutes whole "
                         f"groups; unequal groups have no Int4Linear layout)")
    return torch.sort(g_idx, stable=True).indices


def gptq_to_int4(qweight, qzeros, scales, g_idx=None, bias=None, checkpoint_format="gptq", dtype=None):
    """Int4Linear (or PermutedInputLinear around one, for act order) computing the GPTQ layer exactly.
    dtype: that of scales, zeros and bias (default: the scales')."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"`checkpoint_format` must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    q = _nibbles(qweight, "qweight")  # [K / 8, N, 8]: input 8 i + j at [i, n, j]
    k, n = 8 * q.shape[0], q.shape[1]
    codes = q.permute(1, 0, 2).reshape(n, k)
    groups = _check_scales(scales, n)
    z = _nibbles(qzeros, "qzeros")
    if z.shape[:2] != (groups, n // 8) or n % 8:
        raise ValueError(f"`qzeros` must be int32 [groups, out_features / 8] = [{groups}, {n // 8}], got "
                         f"{tuple(qzeros.shape)}")
    zeros = z.reshape(groups, n).to(torch.float32) + (1.0 if checkpoint_format == "gptq" else 0.0)
    _group_size(k, groups)  # (before _act_order_perm divides k by it: its error, not a ZeroDivisionError)
    perm = None if g_idx is None else _act_order_perm(g_idx, k, groups)
    if perm is not None:
        codes = codes[:, perm]  # column i of the layer's codes is x's column perm[i]: groups become runs
    return _build(codes, zeros.t().to(scales.dtype), scales.t().cpu(), bias, dtype, perm)


def awq_to_int4(qweight, qzeros, scales, bias=None, dtype=None):
    """Int4Linear computing the AWQ ("gemm" packing) layer exactly. dtype: as for gptq_to_int4."""
    order = torch.tensor(AWQ_ORDER, device="cpu").argsort()  # nibble holding output 8 c + o

    def unpack(t, name):  # int32 [R, N / 8] → uint8 [R, N]
        nib = _nibbles(t, name)
        return nib[..., order].reshape(nib.shape[0], -1)

    codes = unpack(qweight, "qweight")  # [K, N]
    k, n = codes.shape
    groups = _check_scales(scales, n)
    zeros = unpack(qzeros, "qzeros")
    if tuple(zeros.shape) != (groups, n):
        raise ValueError(f"`qzeros` must be int32 [groups, out_features / 8] = [{groups}, {n // 8}], got "
                         f"{tuple(qzeros.shape)}")
    return _build(codes.t().contiguous(), zeros.t().to(scales.dtype), scales.t().cpu(), bias, dtype)


# ------------------------------------------------------------------------------------- whole checkpoints

# Where tools write the settings: config.json's quantization_config (transformers' integration), or, in
# checkpoints made by the tools alone, a file of their own beside it (AutoGPTQ: quantize_config.json; AutoAWQ:
# quant_config.json, with its own key names).
METHODS = ("gptq", "awq", "compressed-tensors")
# per method: the tensor that marks a quantized layer, its scales (their dtype: the model's), every tensor of it
_LAYOUT = {"gptq": ("qweight", "scales", ("qweight", "qzeros", "scales", "g_idx", "bias")),
           "awq": ("qweight", "scales", ("qweight", "qzeros", "scales", "g_idx", "bias")),
           "compressed-tensors": (CT.MARKER, "weight_scale", CT.SUFFIXES)}
_OWN_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))
_AWQ_KEYS = {"w_bit": "bits", "q_group_size": "group_size"}


def raw_quant_config(path):
    """The quantization settings folder `path` records (None where it records none), unchecked."""
    path = Path(path)
    cfg_path = path / "config.json"
    qc = json.loads(cfg_path.read_text()).get("quantization_config") if cfg_path.is_file() else None
    for name, method in _OWN_FILES:
        if not isinstance(qc, dict) and (path / name).is_file():
            own = json.loads((path / name).read_text())
            qc = {"quant_method": method, **{_AWQ_KEYS.get(k, k): v for k, v in own.items()}}
    return qc if isinstance(qc, dict) else None


def read_quant_config(path):
    """The checkpoint's quantization settings, checked to be ones this module converts."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"`path`: {path} has no config.json")
    qc = raw_quant_config(path)
    if qc is None:
        raise ValueError(f"`path`: {path} has no quantization_config in config.json (nor a quantize_config.json / "
                         f"quant_config.json): not a GPTQ / AWQ / compressed-tensors checkpoint (a model saved by save_compressed loads "
                         f"with load_pretrained)")
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise ValueError(f"`path`: quant_method {qc.get('quant_method')!r} is not one this loader takes "
                         f"({', '.join(METHODS)})")
    if method == "compressed-tensors":
        CT.check_config(qc)
        return qc
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"`path`: {method} with bits = {bits!r}; only 4-bit checkpoints map onto Int4Linear")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"`path`: AWQ version {version!r}: only the 'gemm' packing is taken")
        if not qc.get("zero_point", True):
            raise ValueError("`path`: AWQ without zero points (zero_point = false) is not taken")
    else:
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"`path`: GPTQ checkpoint_format {fmt!r}: only 'gptq' and 'gptq_v2' are taken")
    return qc


def _tensor_files(path):
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"`path`: {path} holds no .safetensors file")
    return files


def _read_tensors(path):
    from safetensors.torch import load_file

    tensors = {}
    for f in _tensor_files(path):
        for k, v in load_file(str(f)).items():
            if k in tensors:
                raise ValueError(f"`path`: tensor {k!r} is in more than one file")
            tensors[k] = v
    return tensors


def convert_layer(qc, tensors, prefix, dtype=None):
    """The Int4Linear (or PermutedInputLinear; Int8Linear for compressed-tensors' 8-bit layers) for the quantized
    Linear at `prefix` of a checkpoint."""
    if _method(qc) == "compressed-tensors":
        return CT.ct_to_linear(tensors, prefix, dtype)
    get = tensors.get
    missing = [s for s in ("qweight", "qzeros", "scales") if f"{prefix}.{s}" not in tensors]
    if missing:
        raise ValueError(f"`path`: quantized layer {prefix!r} lacks {', '.join(missing)}")
    args = (get(prefix + ".qweight"), get(prefix + ".qzeros"), get(prefix + ".scales"))
    bias = get(prefix + ".bias")
    if str(qc["quant_method"]).lower() == "awq":
        return awq_to_int4(*args, bias=bias, dtype=dtype)
    return gptq_to_int4(*args, g_idx=get(prefix + ".g_idx"), bias=bias, dtype=dtype,
                        checkpoint_format=str(qc.get("checkpoint_format", "gptq")).lower())


def load_int4_pretrained(path, dtype=None, progress=True):
    """The Hugging Face causal LM of a GPTQ, AWQ or compressed-tensors (llm-compressor W4A16 / W8A16) checkpoint
    folder `path`, every quantized Linear an Int4Linear (PermutedInputLinear for act-order layers; Int8Linear for
    compressed-tensors' 8-bit ones), in eval mode, on the CPU (``.to("cuda")`` it). A ``.gguf`` file: its Q4_0 /
    Q4_1 / Q4_K Linears on Int4Linear (``gguf_int4.py``).
    dtype: the model's floating dtype (default: that of the checkpoint's scales, usually float16); progress: a
    progress bar over the layers converted (an 8B model has 224).
    Everything is checked before the model is built: a missing tensor, a skeleton module that is not a Linear of
    the layer's shape, or a tensor the architecture has no place for raises ValueError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .serialize import empty_weights

    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from .gguf_int4 import load_gguf_int4

        return load_gguf_int4(path, dtype, progress)
    qc = read_quant_config(path)
    tensors = _read_tensors(path)
    marker, scales, suffixes = _LAYOUT[_method(qc)]
    prefixes = sorted(k[: -len(marker) - 1] for k in tensors if k.endswith("." + marker))
    if not prefixes:
        raise ValueError(f"`path`: no tensor named *.{marker} in {path}: nothing is quantized")
    if dtype is None:
        dtype = tensors[f"{prefixes[0]}.{scales}"].dtype
    from tqdm.auto import tqdm

    layers = {p: convert_layer(qc, tensors, p, dtype)
              for p in tqdm(prefixes, desc=f"{_method(qc)} layers", unit="layer", disable=not progress)}

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # (the skeleton is a plain model; the layers are swapped in below)
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = checkpoint_experts.place(model, layers)  # {module name: layer}: MoE experts split, gate / up stacked
    for p, layer in layers.items():
        try:
            old = model.get_submodule(p)
        except AttributeError:
            raise ValueError(f"`path`: quantized layer {p!r} has no module in the {type(model).__name__} "
                             f"architecture") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (layer.in_features,
                                                                                     layer.out_features):
            raise ValueError(f"`path`: layer {p!r} is [{layer.out_features}×{layer.in_features}] in the checkpoint, "
                             f"the architecture has {old}")
        if layer.bias is None and old.bias is not None:
            raise ValueError(f"`path`: the architecture's {p} has a bias the checkpoint lacks")
        if layer.bias is not None and old.bias is None:
            if torch.count_nonzero(layer.bias):
                raise ValueError(f"`path`: the checkpoint gives {p} a bias the architecture has no place for")
            layer.bias = None  # (some GPTQ exports store a zero bias for every layer)
        layer._reparam_method = _method(qc)  # marks it for distill() and save_compressed()
        layer._reparam_settings = {"group_size": getattr(_inner(layer), "group_size", None),
                                   "act_order": layer is not _inner(layer)}
        model.set_submodule(p, layer)

    quant_keys = {f"{p}.{s}" for p in prefixes for s in suffixes} | _dropped(qc, tensors)
    modules = {n for n, _ in model.named_modules()}
    rest = {checkpoint_experts.model_key(modules, k): v for k, v in tensors.items()
            if k not in quant_keys and not k.endswith("rotary_emb.inv_freq")}
    for p, layer in layers.items():
        rest.update({f"{p}.{k}": v for k, v in layer.state_dict().items()})
    own = model.state_dict()
    unexpected = sorted(set(rest) - set(own))
    if unexpected:
        raise ValueError(f"`path`: tensors the architecture has no place for: {unexpected[:5]}")
    for k, v in rest.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"`path`: {k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the "
                             f"architecture")
        if v.is_floating_point() and own[k].is_floating_point():
            rest[k] = v.to(own[k].dtype)
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()  # (an lm_head tied to the embeddings is not stored)
    for layer in layers.values():  # a quantized lm_head is not tied: tie_weights gave it the embeddings as `weight`
        layer._parameters.pop("weight", None)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"`path`: the checkpoint lacks {left[:5]}")
    model.reparam_recipe = {"imported": {k: qc.get(k) for k in ("quant_method", "bits", "group_size", "desc_act",
                                                                "sym", "checkpoint_format", "version", "format",
                                                                "config_groups", "ignore") if k in qc}}
    fold_act_order(model)  # act order: down_proj's gather becomes gate / up's row order (fold_orders.py)
    group_experts(model)  # quantized experts: one grouped launch a projection where their format allows
    return model.eval()


def _dropped(qc, tensors):
    """Tensors of settings this loader does not apply: compressed-tensors' KV-cache quantization scales (the
    cache stays in the model's dtype), said once."""
    if _method(qc) != "compressed-tensors" or not qc.get("kv_cache_scheme"):
        return set()
    keys = {k for k in tensors if k.endswith((".k_scale", ".v_scale", ".kv_scale"))}
    if keys:
        warnings.warn(f"load_int4_pretrained: the checkpoint quantizes the KV cache (kv_cache_scheme); its "
                      f"{len(keys)} scales are dropped and the cache stays in the model's dtype", RuntimeWarning,
                      stacklevel=3)
    return keys


def _method(qc):
    return str(qc["quant_method"]).lower()


def _inner(layer):
    return layer.inner if isinstance(layer, PermutedInputLinear) else layer
