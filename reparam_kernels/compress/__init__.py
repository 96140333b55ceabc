"""Compression: factorizations, calibration statistics, recipes, distillation, save/load."""
from . import calib, svd  # noqa: F401
