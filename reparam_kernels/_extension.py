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
REASON = "not attempted"


def _load():
    global LOADED, REASON
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not found:
        REASON = "extension not built (no _C*.so in the package; built only when nvcc and a CUDA torch are present)"
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
