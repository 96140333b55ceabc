"""Compression: factorizations, calibration statistics, recipes, distillation, save/load."""
from . import calib, svd  # noqa: F401
from .methods import METHODS, register_method  # noqa: F401
from .pipeline import compress  # noqa: F401
from .distill import distill  # noqa: F401
from .serialize import empty_weights, load_compressed, load_pretrained, save_compressed  # noqa: F401
