"""Backend choice for every op: CUDA extension, Triton, or the reference.

The choice is explicit and inspectable: ``backend_for(op, device, dtype)``
returns the backend and the reason, ``python -m reparam_kernels env`` prints it
per op, and a fall back to a slower path on a GPU warns once (a silent
fallback looks like a slow kernel).

How each dispatch key is served:

* CPU (and anything not CUDA): the reference implementation.
* CUDA: the C++ kernel when the extension registered one (it is bound straight
  to the CUDA dispatch key, so eager calls pay no Python dispatch); otherwise a
  Python implementation that runs the Triton kernel, or the reference.
* dtypes the C++ kernel does not take (e.g. fp32) are routed by the wrapper in
  ``ops.py`` through ``call`` before they reach the dispatcher; so are layouts it
  takes only through a slow fallback (``OpSpec.fast_layout``: the grouped ops), to Triton.
"""
import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _extension
from .schemas import LIB

HALF_DTYPES = (torch.float16, torch.bfloat16)
_WARNED = set()


def warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass
class OpSpec:
    name: str
    reference: Callable
    triton: Optional[Callable] = None
    cuda_dtypes: tuple = HALF_DTYPES  # what the C++ kernel accepts for x
    triton_dtypes: tuple = HALF_DTYPES + (torch.float32,)
    # fast_layout(*args) -> bool: False where the C++ kernel would take the call's layout only through a slow
    # fallback (the grouped ops' warp-per-output kernel: csrc/grouped_quant.cuh), so the wrapper runs the
    # Triton kernel instead when it can. Shapes and int arguments only (cheap, and traceable).
    fast_layout: Optional[Callable] = None
    cuda_impl_registered: bool = field(default=False, init=False)


REGISTRY = {}


def has_cuda_kernel(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"reparam::{name}", "CUDA")


def triton_status(device_type="cuda"):
    """(usable, why) for running Triton kernels on `device_type` tensors."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if device_type == "cuda":
        return True, "triton available"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1 (interpreter on the CPU)"
    return False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1"


MIN_CAPABILITY = (8, 0)  # the extension's kernels are built for sm_80 and newer


_CAPABILITY = {}


def _capability(index):
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def gpu_supported():
    """(ok, why): whether the current GPU can run the extension's kernels (sm_80+).
    Without a visible GPU this answers for a supported one (what `env` should show)."""
    if not torch.cuda.is_available():
        return True, "no GPU visible"
    cap = _capability(torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        return False, (f"GPU is sm_{cap[0]}{cap[1]}; the CUDA kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} "
                       "or newer")
    return True, f"sm_{cap[0]}{cap[1]}"


BACKEND_ENV = "REPARAM_BACKEND"  # auto (default) | triton | reference: which backend GPU tensors take


def forced_backend():
    """The backend REPARAM_BACKEND asks for on the GPU, or None (auto: the CUDA kernel where it exists).
    For A/B runs and for a GPU where a measurement puts the Triton kernels ahead; read once per
    (op, device, dtype) like the rest of the choice (BACKEND_CACHE)."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if value not in ("auto", "", "triton", "reference"):
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected auto, triton or reference")
    return None if value in ("auto", "") else value


@torch.compiler.assume_constant_result  # a constant per (op, device, dtype): torch.compile must not trace into it
def backend_for(name, device_type, dtype):
    """Which backend runs op `name` for inputs on `device_type` of `dtype`, and why."""
    spec = REGISTRY[name]
    if device_type != "cuda":
        return "reference", f"{device_type} tensors run the plain-PyTorch reference"
    forced = forced_backend()
    if forced == "reference":
        return "reference", f"{BACKEND_ENV}=reference"
    if forced == "triton" and spec.triton is not None and dtype in spec.triton_dtypes and triton_status("cuda")[0]:
        return "triton", f"{BACKEND_ENV}=triton"
    gpu_ok, gpu_why = gpu_supported()
    if has_cuda_kernel(name) and spec.cuda_impl_registered is False and not gpu_ok:
        why = gpu_why
    elif has_cuda_kernel(name) and spec.cuda_impl_registered is False:
        if dtype in spec.cuda_dtypes:
            return "cuda", ("CUDA extension kernel" if spec.fast_layout is None else
                            "CUDA extension kernel (layouts its fast loop does not take: the Triton kernel)")
        why = f"CUDA kernel takes {_names(spec.cuda_dtypes)}, not {_names((dtype,))}"
    elif _extension.LOADED:
        why = "the CUDA extension has no kernel for this op"
    else:
        why = f"no CUDA kernel ({_extension.REASON})"
    ok, twhy = triton_status("cuda")
    if spec.triton is not None and ok and dtype in spec.triton_dtypes:
        return "triton", why
    if spec.triton is None:
        twhy = "no Triton kernel for this op"
    return "reference", f"{why}; {twhy}"


def _names(dtypes):
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _run(spec, backend, why, args):
    if why.startswith(BACKEND_ENV):  # asked for: no warning
        return (spec.triton if backend == "triton" else spec.reference)(*args)
    if backend == "triton":
        if (spec.name, why) not in _WARNED and not torch.compiler.is_compiling() and not gpu_supported()[0]:
            warn_once((spec.name, why), f"reparam.{spec.name}: {why}; running the Triton kernel instead")
        return spec.triton(*args)
    if backend == "reference" and _first_tensor(args).is_cuda and not torch.compiler.is_compiling():
        warn_once((spec.name, why), f"reparam.{spec.name}: running the slow reference on the GPU ({why})")
    return spec.reference(*args)


def _first_tensor(args):
    return next(a for a in args if isinstance(a, torch.Tensor))


# True when autocast is on for any device type (private but long-standing; the per-device check is the fallback)
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def as_dtype(t, dtype):
    """t in `dtype`; t itself when it already is (Tensor.to costs ≈ 1 µs of host time even as a no-op)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def autocast(x, *side):
    """Under ``torch.autocast`` on x's device, cast x and its x-dtype side data (factors, scales, zeros,
    tables, bias) to the autocast dtype, as torch does for F.linear; otherwise return them unchanged.

    The typed wrappers call this before their checks: the ops require the side data in x's dtype, and
    a custom op is not cast by autocast on its own. Spectra (fp32 by format) are not passed here.
    """
    if not _ANY_AUTOCAST():  # one global flag: the common case pays no device lookup
        return (x, *side)
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *side)
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (x, *side))


# backend_for asks the dispatcher and the GPU (≈ 10 µs of Python on a slow CPU, as much as a decode
# kernel takes): the eager entry below keeps its answer per (op, device, dtype) for the life of the
# process. What it depends on does not change once the package is imported (the extension loaded or
# not, Triton present, the GPU's compute capability); a test that fakes one of them calls
# ``BACKEND_CACHE.clear()``. The kernels' own path switches (REPARAM_* variables) are read in C++ per
# call and are not part of this.
BACKEND_CACHE = {}


def _cached_backend(name, x, choose=None):
    """`choose`(name, device type, dtype) (backend_for by default) for x, once per process (BACKEND_CACHE)."""
    choose = choose or backend_for
    key = (choose, name, x.device, x.dtype)
    hit = BACKEND_CACHE.get(key)
    if hit is None:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            hit = BACKEND_CACHE[key] = choose(name, x.device.type, x.dtype)
    return hit


def backend_of(name, x):
    """(backend, why) for op `name` on x: a traced constant under torch.compile (assume_constant_result),
    else the per-process cache."""
    if torch.compiler.is_compiling():
        return backend_for(name, x.device.type, x.dtype)
    return _cached_backend(name, x)


def off_layout_backend_for(name, device_type, dtype):
    """Where a call goes whose layout the C++ kernel serves only through a slow fallback (OpSpec.fast_layout):
    the Triton kernel where it runs these inputs, else the C++ kernel all the same."""
    spec = REGISTRY[name]
    ok, twhy = triton_status(device_type)
    if spec.triton is not None and ok and dtype in spec.triton_dtypes:
        return "triton", "a layout the CUDA kernel takes only through its slow fallback"
    return "cuda", f"a layout off the CUDA kernel's fast path ({twhy}: its fallback runs it)"


def _route_layout(spec, args, backend, why, needs_grad):
    """(backend, why) given backend_of's: a layout the C++ kernel takes only through a slow fallback
    (spec.fast_layout) goes to Triton where it can in eager mode without gradients (the C++ op holds the op's
    autograd, and a compiled graph keeps the op: a Triton launch traced into it is not tested)."""
    if (backend == "cuda" and spec.fast_layout is not None and not needs_grad and not torch.compiler.is_compiling()
            and not spec.fast_layout(*args)):
        return _cached_backend(spec.name, args[0], off_layout_backend_for)
    return backend, why


def route(name, *args, needs_grad=False):
    """(backend, why) for this call of op `name` (what ``call`` runs)."""
    return _route_layout(REGISTRY[name], args, *backend_of(name, args[0]), needs_grad)


def call(name, *args):
    """Entry used by the typed wrappers: the CUDA op if it takes these inputs, else the best fallback.
    Every op's first argument is x (the schemas in schemas.py)."""
    x = args[0]
    spec = REGISTRY[name]
    compiling = torch.compiler.is_compiling()
    # (dynamo cannot trace torch's C test of requires_grad; the generator it can)
    needs_grad = torch.is_grad_enabled() and (_any_requires_grad_py if compiling else _any_requires_grad)(*args)
    backend, why = backend_of(name, x)
    if spec.fast_layout is not None:  # (one attribute test on the other ops' path)
        backend, why = _route_layout(spec, args, backend, why, needs_grad)
    if backend == "cuda" or not x.is_cuda or spec.cuda_impl_registered:
        # Through the dispatcher, so the op's registered autograd applies; a
        # Python CUDA impl (no C++ kernel) makes the same backend choice below it.
        op = getattr(torch.ops.reparam, name)
        if needs_grad or compiling:
            return op(*args)
        # No gradient wanted: enter below the Autograd key ourselves. That is what the autograd
        # registered by torch.library does in this case, but it gets there through a Python frame
        # of its own on every call (≈ 4 µs of host time on a slow CPU, more than a decode kernel).
        with _BELOW_AUTOGRAD():
            return op(*args)
    # The C++ kernel exists but does not take these inputs (e.g. fp32). Calling
    # a fallback directly bypasses the op's autograd, so when gradients are
    # needed run the reference: plain PyTorch ops, differentiable as they are.
    if needs_grad:
        return _run(spec, "reference", why + "; gradients needed", args)
    return _run(spec, backend, why, args)


def _any_requires_grad_py(*args):
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# torch's own test (the one torch.library's autograd makes), in C++; the Python version where absent
_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def register(spec):
    """Bind the reference to CPU and, when no C++ kernel exists, a Python impl to CUDA."""
    REGISTRY[spec.name] = spec
    LIB.impl(spec.name, spec.reference, "CPU")
    if not has_cuda_kernel(spec.name):
        def cuda_impl(*args, _spec=spec):
            backend, why = _cached_backend(_spec.name, _first_tensor(args))
            return _run(_spec, backend, why, args)

        LIB.impl(spec.name, cuda_impl, "CUDA")
        spec.cuda_impl_registered = True
    return spec
