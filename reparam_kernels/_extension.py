"""Loads the compiled CUDA extension ``_C.abi3.so`` if it was built.

The extension registers CUDA implementations of the ops declared in
``schemas.py``. It has no Python module init: it is loaded with
``torch.ops.load_library`` (a plain dlopen), which is what keeps the binary
independent of the Python version (abi3) and of the torch version (stable ABI).
"""
import glob
import os

import torch

LOADED = False
MIN_TORCH = (2, 10)  # TORCH_TARGET_VERSION of the build (setup.py)
REASON = "not attempted"


def _torch_version():
    """(major, minor) of the running torch, e.g. (2, 11) for '2.11.0+cu130'."""
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return MIN_TORCH  # an unparsable dev version: try loading; a failure is still caught


def _load():
    global LOADED, REASON
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not found:
        REASON = "extension not built (no _C*.so in the package; built only when nvcc and a CUDA torch are present)"
        return
    if _torch_version() < MIN_TORCH:
        REASON = (f"torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, the oldest whose stable ABI "
                  "the extension targets; upgrade torch for the CUDA kernels (Triton/reference used meanwhile)")
        return
    if torch.version.cuda is None:
        REASON = f"torch {torch.__version__} is a CPU-only build; the CUDA extension needs a CUDA build of torch"
        return
    try:
        torch.ops.load_library(found[0])
    except (OSError, RuntimeError) as exc:  # e.g. torch older than the stable ABI target
        REASON = f"failed to load {os.path.basename(found[0])}: {exc}"
        return
    LOADED = True
    REASON = f"loaded {os.path.basename(found[0])}"


_load()
