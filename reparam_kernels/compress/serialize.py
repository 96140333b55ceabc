"""save_compressed / load_compressed: a compressed model as safetensors + a manifest.

Folder layout::

    DIR/model.safetensors   every tensor of the state dict (tied tensors stored once)
    DIR/manifest.json       format version, package and torch versions, recipe,
                            per compressed layer: class, constructor config, tensor
                            shapes/dtypes; tied-tensor aliases; sha256 of the tensors file

Saving writes into a temporary sibling folder and renames it into place, so a
failure never leaves a half-written checkpoint. Loading checks everything
(hash, layer classes, skeleton names and shapes, the exact set of tensors)
before it touches the skeleton, so a corrupted file, a missing tensor or a
mismatched skeleton raises ValueError and changes nothing.

The skeleton need not hold weights: built under ``empty_weights()`` its parameters are
on the meta device (no memory, no random init — an 8B model's dense skeleton would
take 16–32 GB only to be overwritten), and loading assigns the checkpoint's tensors.
"""
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from .experts import UnfusedExperts, group_experts, unfuse_experts
from .recipe import linear_features

FORMAT = "reparam_kernels.compressed/1"
TENSORS, MANIFEST = "model.safetensors", "manifest.json"
_SKIP_ARGS = {"self", "dtype", "device"}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_config(module):
    """{class, module, args} rebuilding `module` (from its constructor's argument names), or {class, module,
    children} for a combination layer whose constructor takes layers (its class's CHILDREN: FactoredLinear …)."""
    cls = type(module)
    cfg = {"class": cls.__name__, "module": cls.__module__}
    children = getattr(cls, "CHILDREN", None)
    if children:
        cfg["children"] = {name: layer_config(getattr(module, name)) for name in children}
        return cfg
    args = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in _SKIP_ARGS:
            continue
        if name == "bias":
            args["bias"] = getattr(module, "bias", None) is not None
        elif hasattr(module, name):
            val = getattr(module, name)
            if isinstance(val, tuple):
                val = list(val)
            scalar = (int, float, str, bool, type(None))
            if not (isinstance(val, scalar) or (isinstance(val, list) and all(isinstance(v, scalar) for v in val))):
                raise ValueError(f"`model`: cannot record {cls.__name__}.{name} = {val!r} in the manifest")
            args[name] = val
        else:
            raise ValueError(f"`model`: {cls.__name__} has no attribute `{name}` to record its constructor argument")
    cfg["args"] = args
    return cfg


_META = threading.local()      # how deep this thread is inside empty_weights()
_PATCH_LOCK = threading.Lock()
_PATCH = {"users": 0, "register": None}


def _register_parameter(module, name, param):
    _PATCH["register"](module, name, param)
    if getattr(_META, "depth", 0) and param is not None and param.device.type != "meta":
        module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def empty_weights():
    """Context: modules created inside get their parameters on the meta device (shapes and dtypes,
    no storage); buffers stay real — a model's derived buffers (rotary frequencies) are computed
    when it is built and are not in its checkpoint. For the skeleton that ``load_compressed`` fills::

        with empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = load_compressed(skeleton, path)

    Only the thread inside the context is affected (modules other threads build meanwhile keep real
    parameters); contexts nest.
    """
    with _PATCH_LOCK:
        if _PATCH["users"] == 0:
            _PATCH["register"] = torch.nn.Module.register_parameter
            torch.nn.Module.register_parameter = _register_parameter
        _PATCH["users"] += 1
    _META.depth = getattr(_META, "depth", 0) + 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _PATCH_LOCK:
            _PATCH["users"] -= 1
            if _PATCH["users"] == 0:
                torch.nn.Module.register_parameter = _PATCH["register"]
                _PATCH["register"] = None


def build_layer(cfg, dtype=None):
    try:
        mod = importlib.import_module(cfg["module"])
        cls = getattr(mod, cfg["class"])
    except (ImportError, AttributeError, KeyError) as e:
        raise ValueError(f"`path`: manifest names layer class {cfg.get('module')}.{cfg.get('class')}, "
                         f"which this installation lacks ({e})") from None
    if "children" in cfg:
        return cls(**{name: build_layer(child, dtype) for name, child in cfg["children"].items()})
    kw = dict(cfg["args"])
    if "dtype" in inspect.signature(cls.__init__).parameters:
        kw["dtype"] = dtype
    return cls(**kw)


def compressed_layers(model):
    """{name: {method, settings, class, module, args | children}} of the layers compress() made (marked with
    `_reparam_method`; the outermost where they nest): what a manifest records to rebuild them."""
    layers = {}
    for name, mod in model.named_modules():
        method = getattr(mod, "_reparam_method", None)
        if method is None or method == "skip":
            continue
        if any(name.startswith(p + ".") for p in layers):
            continue
        layers[name] = {"method": method, "settings": getattr(mod, "_reparam_settings", {}), **layer_config(mod)}
    return layers


def save_compressed(model, path, recipe=None, extra=None, tokenizer=None):
    """Write `model` (compressed by ``compress``) to folder `path` atomically.

    A Hugging Face model's config is written beside the tensors (config.json: ``load_pretrained`` rebuilds
    the model from the folder alone), and `tokenizer`'s files when one is given.
    extra: optional function called with the temporary folder before it is renamed into
    place, to add other files that belong to the checkpoint.
    """
    from safetensors.torch import save_file

    import reparam_kernels
    from ..nn.fused import refuse_fused

    refuse_fused(model, "save_compressed")
    path = Path(path)
    layers = compressed_layers(model)
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:  # tied weights (e.g. lm_head = embeddings): store once
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    for name, info in layers.items():
        info["tensors"] = {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items() if k.startswith(name + ".")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT, "reparam_kernels": reparam_kernels.__version__, "torch": torch.__version__,
            "recipe": recipe if recipe is not None else getattr(model, "reparam_recipe", None),
            "layers": layers, "aliases": aliases, "num_tensors": len(tensors),
            # fused mixture-of-experts modules compress() split into per-expert Linears (experts.py)
            "unfused_experts": [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)],
            # what load_pretrained builds the model in (a config may not say); None for a model without floats
            "dtype": str(dt) if (dt := model_dtype(model)) is not None else None,
            "sha256": _sha256(tmp / TENSORS),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if hasattr(getattr(model, "config", None), "save_pretrained"):
            model.config.save_pretrained(tmp)
            _add_quantization_config(tmp / "config.json", manifest)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        if path.exists():  # replace an old checkpoint: move it aside first, delete after the swap
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _add_quantization_config(config_path, manifest):
    """config.json names this package as the model's quantizer, so transformers' from_pretrained loads the
    folder too once reparam_kernels is imported (hf_quantizer.py)."""
    from .hf_quantizer import quantization_config

    cfg = json.loads(config_path.read_text())
    cfg["quantization_config"] = quantization_config(manifest)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def read_manifest(path):
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file() or not (path / TENSORS).is_file():
        raise ValueError(f"`path`: {path} is not a compressed checkpoint (needs {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"`path`: {mf} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"`path`: unknown checkpoint format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_compressed(model, path, strict_hash=True, cast=True):
    """Rebuild the compressed layers of checkpoint `path` into `model` (a skeleton of the dense
    architecture, e.g. from ``from_config``) and load every tensor. Returns `model`.
    cast: into a skeleton without weights (``empty_weights()``), the checkpoint's floating tensors are cast
    to the skeleton's dtypes; False keeps each as it was saved (a model mixing dtypes comes back as it was).

    Everything is validated first; on any error `model` is left unchanged — but for its fused experts modules
    that the checkpoint holds per expert: those are unfused first (``experts.py``; the same outputs).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if strict_hash and _sha256(path / TENSORS) != manifest.get("sha256"):
        raise ValueError(f"`path`: {path / TENSORS} does not match the manifest's sha256 (corrupted or replaced)")
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"`path`: cannot read {path / TENSORS}: {e}") from None
    _unfuse_like_checkpoint(model, manifest.get("unfused_experts", []))
    new_layers = build_compressed_layers(model, manifest["layers"])
    # expected state: skeleton's keys outside the replaced modules + the new layers' keys
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in new_layers)}
    for n, layer in new_layers.items():
        expected.update({f"{n}.{k}": v for k, v in layer.state_dict().items()})
    full = dict(tensors)
    for key, src in manifest.get("aliases", {}).items():
        if src not in full:
            raise ValueError(f"`path`: tied tensor {key!r} points at {src!r}, which the file lacks")
        full[key] = full[src]
    missing, extra = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if missing or extra:
        raise ValueError(f"`model`/`path` mismatch: missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {extra[:5]}{' …' if len(extra) > 5 else ''}")
    for k, v in expected.items():
        if tuple(full[k].shape) != tuple(v.shape):
            raise ValueError(f"`model`/`path` mismatch: {k} is {tuple(full[k].shape)} in the checkpoint, "
                             f"{tuple(v.shape)} in the skeleton")
    empty = any(v.is_meta for v in expected.values())
    if empty:
        _check_no_meta_left(model, expected, new_layers)
    # validated: now change the model
    from .pipeline import _set_module

    for n, layer in new_layers.items():
        _set_module(model, n, layer)
    if empty:  # a skeleton without weights (empty_weights()): take the checkpoint's tensors as they are
        model.load_state_dict(_in_skeleton_dtypes(full, expected) if cast else full, strict=True, assign=True)
        _retie(model, manifest.get("aliases", {}))
        refresh_derived(model)
    else:
        model.load_state_dict(full, strict=True)
    group_experts(model)  # quantized experts: the grouped forward, as compress() left them
    model.reparam_recipe = manifest.get("recipe")
    return model


def build_compressed_layers(model, layers):
    """{name: layer} for a manifest's `layers`: each built in the dtype of the module of `model` it replaces and
    on its device (a meta skeleton's: nothing allocated), its shape checked against that module's, marked as
    compress() marks it. `model` is not changed (load_compressed and transformers' loader swap them in)."""
    ref = next(iter(model.parameters()), None)
    new_layers = {}
    for name, info in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"`model`: the skeleton has no module {name!r} that the checkpoint compressed") from None
        shape = linear_features(old)  # a Conv1D too (GPT-2 style): compress() swapped it for a Linear
        if shape is None:
            raise ValueError(f"`model`: skeleton module {name!r} is a {type(old).__name__}, not a Linear")
        like = getattr(old, "weight", ref)
        with torch.device(like.device if like is not None else "cpu"):
            layer = build_layer(info, dtype=like.dtype if like is not None else None)
        if (layer.in_features, layer.out_features) != shape:
            raise ValueError(f"`model`: skeleton {name} is [{shape[1]}×{shape[0]}], checkpoint "
                             f"layer is [{layer.out_features}×{layer.in_features}]")
        layer._reparam_method = info["method"]
        layer._reparam_settings = info.get("settings", {})
        new_layers[name] = layer
    return new_layers


def refresh_derived(model):
    """Recompute what layers derive rather than store (e.g. columns computed from a loaded spectrum), once their
    tensors were assigned."""
    for mod in model.modules():
        if hasattr(mod, "refresh_cols"):
            mod.refresh_cols()


def _unfuse_like_checkpoint(model, names):
    """Swap the skeleton's fused experts modules `names` for per-expert Linears, as compress() did
    (unfuse_experts raises for a module that is not one)."""
    try:
        todo = [n for n in names if not isinstance(model.get_submodule(n), UnfusedExperts)]
    except AttributeError as e:
        raise ValueError(f"`model`: the skeleton lacks an experts module the checkpoint holds ({e})") from None
    unfuse_experts(model, todo)


def model_dtype(model):
    """The floating dtype holding most of `model`'s parameters (None if it has none)."""
    sizes = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None


def _saved_dtype(manifest):
    """The dtype the checkpoint's model was in when saved (float32 for checkpoints that do not record it)."""
    name = str(manifest.get("dtype") or "torch.float32").rpartition(".")[2]
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`path`: the manifest's dtype {manifest.get('dtype')!r} is not a floating torch dtype")
    return dtype


def load_pretrained(path, dtype=None, strict_hash=True):
    """The Hugging Face causal LM that ``save_compressed`` wrote to folder `path`, in eval mode: its architecture
    from the saved config.json (under ``empty_weights()``: no dense weights made), then ``load_compressed``.
    dtype: that of its floating tensors; None (default): each tensor as it was saved, the rest of the model (e.g.
    rotary frequencies) in the dtype of most of its parameters then — a bf16 model comes back bf16 whatever its
    config says; float32 for checkpoints that did not record it."""
    path = Path(path)
    manifest = read_manifest(path)
    as_saved = dtype is None and manifest.get("dtype") is not None  # every tensor keeps its saved dtype
    dtype = _saved_dtype(manifest) if dtype is None else dtype
    if not (path / "config.json").is_file():
        raise ValueError(f"`path`: {path} has no config.json (the model saved there had no Hugging Face config): "
                         f"build its architecture and call load_compressed(skeleton, path)")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # (a plain skeleton: load_compressed swaps the layers in, checked)
    with empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return load_compressed(skeleton, path, strict_hash, cast=not as_saved).eval()


def _check_no_meta_left(model, expected, new_layers):
    """A meta skeleton is filled by assignment: every tensor it holds off the meta device must be in the
    checkpoint, but buffers that are not (non-persistent, e.g. rotary frequencies) must already be real."""
    derived = {n + "." for n, m in model.named_modules() if hasattr(m, "refresh_cols")}
    left = [k for k, b in model.named_buffers() if b.is_meta and k not in expected
            and not any(k.startswith(n + ".") for n in new_layers) and not any(k.startswith(d) for d in derived)]
    if left:
        raise ValueError(f"`model`: the skeleton's buffers {left[:5]} are on the meta device and not in the "
                         f"checkpoint; build it with empty_weights(), which keeps buffers real")


def _in_skeleton_dtypes(full, expected):
    """The checkpoint's floating tensors cast to the skeleton's dtypes (what copying into it would do);
    tied tensors stay one tensor."""
    out, cast = {}, {}
    for k, v in full.items():
        want = expected[k].dtype
        if v.is_floating_point() and torch.empty((), dtype=want).is_floating_point() and v.dtype != want:
            if id(v) not in cast:
                cast[id(v)] = v.to(want)
            v = cast[id(v)]
        out[k] = v
    return out


def _retie(model, aliases):
    """Assignment gives each key its own Parameter; make tied ones (lm_head = embeddings) one again."""
    for key, src in aliases.items():
        owner, _, name = key.rpartition(".")
        src_owner, _, src_name = src.rpartition(".")
        mod, src_mod = model.get_submodule(owner), model.get_submodule(src_owner)
        if name in mod._parameters and src_name in src_mod._parameters:
            mod._parameters[name] = src_mod._parameters[src_name]
