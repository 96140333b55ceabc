"""Argument checks shared by the op wrappers and their fake (meta) functions.

Every message names the argument and what was expected, so a bad call fails
with a readable error instead of a crash or a silently wrong result.
"""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(cond, op, message):
    if not cond:
        raise ValueError(f"reparam.{op}: {message}")


def check_tensor(op, name, t, ndim=None, dtype=None, device=None, contiguous=True):
    check(isinstance(t, torch.Tensor), op, f"`{name}` must be a Tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, op, f"`{name}` must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        check(t.dtype in allowed, op, f"`{name}` must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if device is not None:
        check(t.device == device, op, f"`{name}` is on {t.device} but `x` is on {device}; move them to one device")
    if contiguous:
        check(t.is_contiguous(), op, f"`{name}` must be contiguous (call .contiguous() first); got strides {t.stride()}")


def check_x(op, x, k):
    check_tensor(op, "x", x, dtype=FLOAT_DTYPES, contiguous=False)
    check(x.dim() >= 1, op, "`x` must have at least 1 dimension [..., in_features]")
    check(x.shape[-1] == k, op, f"`x` has {x.shape[-1]} features in its last dimension, expected {k}")
    check(x.stride(-1) == 1, op, f"`x` must be contiguous in its last dimension (stride 1), got strides {x.stride()}")


def check_bias(op, bias, n, x):
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device)
        check(bias.shape[0] == n, op, f"`bias` has {bias.shape[0]} elements, expected out_features = {n}")
