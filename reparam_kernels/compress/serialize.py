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
"""
import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

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
    """{class, module, args} rebuilding `module` (from its constructor's argument names), or children for FactoredLinear."""
    cls = type(module)
    cfg = {"class": cls.__name__, "module": cls.__module__}
    from ..nn.factored import FactoredLinear

    if isinstance(module, FactoredLinear):
        cfg["children"] = {"first": layer_config(module.first), "second": layer_config(module.second)}
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


def build_layer(cfg, dtype=None):
    try:
        mod = importlib.import_module(cfg["module"])
        cls = getattr(mod, cfg["class"])
    except (ImportError, AttributeError, KeyError) as e:
        raise ValueError(f"`path`: manifest names layer class {cfg.get('module')}.{cfg.get('class')}, "
                         f"which this installation lacks ({e})") from None
    if "children" in cfg:
        return cls(build_layer(cfg["children"]["first"], dtype), build_layer(cfg["children"]["second"], dtype))
    kw = dict(cfg["args"])
    if "dtype" in inspect.signature(cls.__init__).parameters:
        kw["dtype"] = dtype
    return cls(**kw)


def save_compressed(model, path, recipe=None, extra=None):
    """Write `model` (compressed by ``compress``) to folder `path` atomically.

    extra: optional function called with the temporary folder before it is renamed into
    place, to add files that belong to the checkpoint (config, tokenizer, …).
    """
    from safetensors.torch import save_file

    import reparam_kernels

    path = Path(path)
    layers = {}
    for name, mod in model.named_modules():
        method = getattr(mod, "_reparam_method", None)
        if method is None or method == "skip":
            continue
        if any(name.startswith(p + ".") for p in layers):
            continue
        layers[name] = {"method": method, "settings": getattr(mod, "_reparam_settings", {}), **layer_config(mod)}
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
            "sha256": _sha256(tmp / TENSORS),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
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


def load_compressed(model, path, strict_hash=True):
    """Rebuild the compressed layers of checkpoint `path` into `model` (a skeleton of the dense
    architecture, e.g. from ``from_config``) and load every tensor. Returns `model`.

    Everything is validated first; on any error `model` is left unchanged.
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
    ref = next(iter(model.parameters()), None)
    new_layers = {}
    for name, info in manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"`model`: the skeleton has no module {name!r} that the checkpoint compressed") from None
        shape = linear_features(old)  # a Conv1D too (GPT-2 style): compress() swapped it for a Linear
        if shape is None:
            raise ValueError(f"`model`: skeleton module {name!r} is a {type(old).__name__}, not a Linear")
        old_in, old_out = shape
        dtype = getattr(old, "weight", ref).dtype if ref is not None else None
        layer = build_layer(info, dtype=dtype)
        if (layer.in_features, layer.out_features) != (old_in, old_out):
            raise ValueError(f"`model`: skeleton {name} is [{old_out}×{old_in}], checkpoint "
                             f"layer is [{layer.out_features}×{layer.in_features}]")
        if ref is not None:
            layer = layer.to(ref.device)
        layer._reparam_method = info["method"]
        layer._reparam_settings = info.get("settings", {})
        new_layers[name] = layer
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
    # validated: now change the model
    from .pipeline import _set_module

    for n, layer in new_layers.items():
        _set_module(model, n, layer)
    model.load_state_dict(full, strict=True)
    model.reparam_recipe = manifest.get("recipe")
    return model
