"""``AutoModelForCausalLM.from_pretrained(folder)`` for a folder that ``save_compressed`` wrote.

save_compressed writes, into the folder's config.json, a ``quantization_config`` with ``quant_method``
"reparam_kernels" and each compressed layer's class and constructor arguments (the manifest's, without the
tensor list). transformers looks that method up among its registered quantizers; this module registers one
that, before the weights load, swaps each listed Linear of the (meta-device) skeleton for its compressed
layer, so transformers' own loader fills their tensors by name; after loading, derived buffers are computed
and quantized experts grouped, as ``load_compressed`` does. ``rk.load_pretrained`` stays the checked route
(hash, exact tensor set); this one is for code that only knows transformers (pipelines, ``generate`` scripts).

Registering needs transformers' quantizer module (~1.7 s to import), which ``import reparam_kernels`` does not
pay: ``install()`` registers at once when transformers' quantizers are already imported, else when they are
(an import hook), so either import order works.
"""
import importlib.abc
import importlib.util
import sys
import threading

METHOD = "reparam_kernels"
_TARGET = "transformers.quantizers.auto"
_LOCK = threading.Lock()
_STATE = {"registered": False}


def quantization_config(manifest):
    """The ``quantization_config`` entry of config.json for a checkpoint with this manifest."""
    return {"quant_method": METHOD, "format": manifest["format"], "recipe": manifest.get("recipe"),
            "unfused_experts": manifest.get("unfused_experts", []),
            "layers": {name: {k: v for k, v in info.items() if k != "tensors"}
                       for name, info in manifest["layers"].items()}}


def register():
    """Register the config class and the quantizer with transformers (idempotent)."""
    with _LOCK:
        if _STATE["registered"]:
            return
        _STATE["registered"] = True
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @register_quantization_config(METHOD)
    class ReparamKernelsConfig(QuantizationConfigMixin):
        """A saved model's layers (``layers``: loading), or a recipe to compress with after loading (``layers``
        empty: ``hf_config(recipe, calib)``; ``calib`` is not written to config.json)."""

        def __init__(self, layers=None, format=None, recipe=None, unfused_experts=(), calib=None, **kwargs):
            self.quant_method = METHOD
            self.layers, self.format, self.recipe = dict(layers or {}), format, recipe
            self.unfused_experts = list(unfused_experts)
            self.calib = calib

        def to_dict(self):
            return {k: v for k, v in super().to_dict().items() if k != "calib"}

    _STATE["config_class"] = ReparamKernelsConfig

    @register_quantizer(METHOD)
    class ReparamKernelsQuantizer(HfQuantizer):
        # pre_quantized (config.json holds the config): the saved layers are swapped in before loading;
        # else (from_pretrained(..., quantization_config=hf_config(recipe))): compress() runs once the dense
        # weights are loaded
        requires_calibration = False

        def validate_environment(self, *args, **kwargs):
            from .serialize import FORMAT

            qc = self.quantization_config
            if self.pre_quantized and qc.format != FORMAT:
                raise ValueError(f"this checkpoint's format is {qc.format!r}; this reparam_kernels reads {FORMAT!r}")
            if not self.pre_quantized and qc.recipe is None:
                raise ValueError("hf_config(recipe): a recipe is needed to compress the model after loading")

        def _process_model_before_weight_loading(self, model, **kwargs):
            if self.pre_quantized:
                swap_in_layers(model, self.quantization_config)

        def _process_model_after_weight_loading(self, model, **kwargs):
            if self.pre_quantized:
                finish_loading(model, self.quantization_config)
            else:
                compress_loaded(model, self.quantization_config)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True


def hf_config(recipe, calib="random"):
    """A ``quantization_config`` for transformers' ``from_pretrained`` that compresses the model with `recipe`
    (a built-in name such as "int4", or a recipe dict) once its dense weights are loaded; `calib` as for
    ``compress`` ("random": random token ids, no data; token ids; None). The model then saves with
    ``save_pretrained`` and loads back compressed."""
    register()
    return _STATE["config_class"](recipe=recipe, calib=calib)


def compress_loaded(model, qc):
    """compress() the freshly loaded dense model in place; its config then records the layers, as a saved one."""
    import json

    from .pipeline import compress
    from .serialize import FORMAT, compressed_layers

    compress(model, qc.recipe, calib=qc.calib, inplace=True)
    # (through JSON as a manifest goes: what config.json will hold, tuples as lists)
    qc.layers = json.loads(json.dumps(compressed_layers(model), default=str))
    qc.format, qc.unfused_experts = FORMAT, _unfused_experts(model)
    qc.recipe = getattr(model, "reparam_recipe", qc.recipe)


def _unfused_experts(model):
    from .experts import UnfusedExperts

    return [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]


def swap_in_layers(model, qc):
    """The skeleton's Linears named in qc.layers replaced by their compressed layers (on the skeleton's device,
    in its dtype), marked as compress() marks them; fused experts split first, as compress() did."""
    from .pipeline import _set_module
    from .serialize import _unfuse_like_checkpoint, build_compressed_layers

    _unfuse_like_checkpoint(model, qc.unfused_experts)
    for name, layer in build_compressed_layers(model, qc.layers).items():
        _set_module(model, name, layer)


def finish_loading(model, qc):
    """After transformers filled the swapped-in layers: what load_compressed does once it loaded the tensors."""
    from .experts import group_experts
    from .serialize import refresh_derived

    refresh_derived(model)
    group_experts(model)
    model.reparam_recipe = qc.recipe


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs register() right after transformers' quantizer module is imported (by anyone, at any time)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # (find the real spec without ourselves; one shot)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_quietly()


def register_quietly():
    """register(), a failure a warning: a transformers without this API must still import."""
    try:
        register()
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        import warnings

        warnings.warn(f"reparam_kernels: transformers' from_pretrained will not load save_compressed folders "
                      f"(registering the quantizer failed: {e}); rk.load_pretrained does", stacklevel=2)


def install():
    """Register now if transformers' quantizers are imported, else as soon as they are."""
    if _TARGET in sys.modules:
        register_quietly()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
