"""The kernels' switch variables (REPARAM_*) read as their C++ side reads them, for the Python code that has
to agree with it: ``python -m reparam_kernels env`` and the ops' eager shortcuts."""
import os
import re


def atoll(name, default):
    """Environment variable `name` read as the C++ side reads it (atoll: leading whitespace, sign,
    digits; else 0), `default` when unset or empty."""
    v = os.environ.get(name, "")
    if not v:
        return default
    lead = re.match(r"\s*([+-]?\d+)", v)
    return int(lead.group(1)) if lead else 0


def min_m(name, default):
    """The C++ side's reading of a threshold variable (csrc/cublas_mm.cuh: atoll; <= 0 means never: None)."""
    m = atoll(name, default)
    return m if m > 0 else None


def opt_in(name):
    """csrc/common.cuh's env_opt_in: set to something that starts with 1."""
    return os.environ.get(name, "").startswith("1")
