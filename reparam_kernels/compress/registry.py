"""Method registry: recipe method name → how to build a compressed layer.

The methods themselves: ``methods.py`` (low rank, combination, structured, tensorized) and
``quant_methods.py`` (int8, int4, log, vq); importing ``methods`` registers them all.

A method is ``Method(name, build, keys, check, needs_calib)``:

* ``build(linear, settings, stats) -> nn.Module`` — the compressed layer;
  ``stats`` is the layer's CalibStats (or None without calibration data);
* ``keys`` — the settings it accepts (anything else is a recipe error);
* ``check(out_features, in_features, settings)`` — raises ValueError when the
  settings do not fit the layer's shape (run for every layer before anything
  is compressed);
* ``needs_calib(settings) -> bool`` — whether calibration data is required.

Other layers plug in with ``register_method``. Methods whose layer modules
are missing stay listed and raise a clear "not available" error when used.
"""
import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass
class Method:
    name: str
    build: Callable
    keys: frozenset
    check: Callable = None
    needs_calib: Callable = None
    doc: str = ""


METHODS = {}


def register_method(name, build, keys=(), check=None, needs_calib=None, doc=""):
    """Register (or replace) a recipe method; see the module docstring."""
    METHODS[name] = Method(name, build, frozenset(keys), check, needs_calib, doc)
    return METHODS[name]


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"`method`: unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def layer_class(module, cls_name, method):
    """Import a layer class lazily, so a missing optional module only breaks its own methods."""
    try:
        return getattr(importlib.import_module(f"reparam_kernels.nn.{module}"), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"`method`: {method!r} is not available in this installation "
                         f"(reparam_kernels.nn.{module}.{cls_name} is missing: {e})") from None


def bad(name, msg):
    raise ValueError(f"`{name}`: {msg}")
