"""Argument checks shared by the op wrappers and their fake (meta) functions.

Every message names the argument and what was expected, so a bad call fails
with a readable error instead of a crash or a silently wrong result.

These run on every eager call of an op, so they cost what a small kernel does
(decode launches last a few µs): a message is only formatted when its check
fails — pass it as a lambda when it is an f-string (``check(ok, op, lambda:
f"...")``), and the helpers below test first and format after.
"""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(op, message):
    raise ValueError(f"reparam.{op}: {message}")


def check(cond, op, message):
    """Raise ValueError naming the op when ``cond`` is false; ``message`` is a str or a callable giving one."""
    if not cond:
        fail(op, message() if callable(message) else message)


def check_tensor(op, name, t, ndim=None, dtype=None, device=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        fail(op, f"`{name}` must be a Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        fail(op, f"`{name}` must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        fail(op, f"`{name}` must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if device is not None and t.device != device:
        fail(op, f"`{name}` is on {t.device} but `x` is on {device}; move them to one device")
    if contiguous and not t.is_contiguous():
        fail(op, f"`{name}` must be contiguous (call .contiguous() first); got strides {t.stride()}")


def check_x(op, x, k):
    check_tensor(op, "x", x, dtype=FLOAT_DTYPES, contiguous=False)
    if x.dim() < 1:
        fail(op, "`x` must have at least 1 dimension [..., in_features]")
    if x.shape[-1] != k:
        fail(op, f"`x` has {x.shape[-1]} features in its last dimension, expected {k}")
    if x.stride(-1) != 1:
        fail(op, f"`x` must be contiguous in its last dimension (stride 1), got strides {x.stride()}")


def check_bias(op, bias, n, x):
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device)
        if bias.shape[0] != n:
            fail(op, f"`bias` has {bias.shape[0]} elements, expected out_features = {n}")
