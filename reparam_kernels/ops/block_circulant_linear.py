"""block_circulant_linear: y = W x + bias for a block-circulant W [N, K] of b×b blocks.

Layout: ``w_spectrum`` is a real tensor [p, q, 2, b//2 + 1], p = ceil(N/b),
q = ceil(K/b): plane 0 / 1 are the real / imaginary parts of the rfft of the
first column of block (i, j) (compress/structured.py builds it, once, at
load). float32 whatever x's dtype (float64 allowed for float64 x). The
imaginary parts of the DC and Nyquist bins are ignored (zero for a real
block). x is zero-padded to q·b features; outputs beyond out_features are
dropped. A plain circulant is p = q = 1.

Backward (trainable spectrum, for distillation):
  gx = Wᵀ gy: the same op with the conjugate-transposed spectrum;
  gS_ij = Σ_rows gZ_i · conj(X_j), where X = rfft(x) and gZ = rfft(gy)·(2/b),
  halved on the DC and Nyquist bins (the adjoint of irfft).
"""
import torch

from .. import _dispatch, reference, triton as _triton
from .._checks import check, check_bias, check_tensor, check_x
from .._dispatch import OpSpec
from .._dtypes import acc_dtype

CUDA_BLOCK_SIZES = tuple(1 << e for e in range(6, 13))  # 64..4096: what the fused CUDA kernel takes


def check_block_circulant(op, x, w_spectrum, block_size, out_features, bias, size_name="block_size"):
    check(isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1, op,
          lambda: f"`{size_name}` must be a positive int, got {block_size!r}")
    check(isinstance(out_features, int) and not isinstance(out_features, bool) and out_features >= 1, op,
          lambda: f"`out_features` must be a positive int, got {out_features!r}")
    sname = "w_spectrum" if op == "block_circulant_linear" else "t_spectrum"
    check_tensor(op, "x", x, contiguous=False)
    allowed = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    check_tensor(op, sname, w_spectrum, ndim=4, dtype=allowed, device=x.device)
    p, q, two, h = w_spectrum.shape
    check(two == 2 and h == block_size // 2 + 1, op,
          lambda: f"`{sname}` must be [p, q, 2, {size_name}//2+1] = [p, q, 2, {block_size // 2 + 1}], got {tuple(w_spectrum.shape)}")
    check_block_grid(op, sname, w_spectrum.shape, p, q, block_size, x, out_features, bias)


def check_block_grid(op, wname, wshape, p, q, b, x, out_features, bias):
    """The p x q grid of b x b blocks (argument `wname`, shape `wshape`) covers [out_features, K]: out_features
    and x's K fit the last block row and column; then x and bias themselves."""
    check(p >= 1 and q >= 1, op, lambda: f"`{wname}` has an empty block grid {tuple(wshape)}")
    check((p - 1) * b < out_features <= p * b, op,
          lambda: f"`out_features` {out_features} does not fit {p} block rows of {b} (needs {(p - 1) * b + 1}..{p * b})")
    check(x.dim() >= 1, op, "`x` must have at least 1 dimension [..., in_features]")  # (its dtype: check_x below)
    k = x.shape[-1]
    check((q - 1) * b < k <= q * b, op,
          lambda: f"`x` has {k} features, which does not fit {q} block columns of {b} (needs {(q - 1) * b + 1}..{q * b})")
    check_x(op, x, k)
    check_bias(op, bias, out_features, x)


def _route(name, args, block_size, sizes=CUDA_BLOCK_SIZES):
    """The CUDA kernel takes the power-of-two blocks in `sizes`; route other sizes past it on a GPU."""
    x = args[0]
    if x.is_cuda and block_size not in sizes and _dispatch.has_cuda_kernel(name):
        spec = _dispatch.REGISTRY[name]
        why = f"block size {block_size} is not a power of two in {sizes[0]}..{sizes[-1]}"
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # this bypasses the op (and its register_autograd): the reference is differentiable
            # through torch.fft, the Triton kernel is not (an op without one runs the reference either way)
            return spec.reference(*args)
        usable, _ = _dispatch.triton_status("cuda")
        backend = "triton" if spec.triton is not None and usable else "reference"
        return _dispatch._run(spec, backend, why, args)
    return _dispatch.call(name, *args)


def block_circulant_linear(x, w_spectrum, block_size, out_features, bias=None):
    """y = W x + bias, W block-circulant [out_features, K] given by its block spectra; x is [..., K]."""
    x, bias = _dispatch.autocast(x, bias)  # the spectrum stays fp32
    check_block_circulant("block_circulant_linear", x, w_spectrum, block_size, out_features, bias)
    return _route("block_circulant_linear", (x, w_spectrum, block_size, out_features, bias), block_size)


@torch.library.register_fake("reparam::block_circulant_linear")
def _fake(x, w_spectrum, block_size, out_features, bias):
    check_block_circulant("block_circulant_linear", x, w_spectrum, block_size, out_features, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def transposed_spectrum(w_spectrum):
    """Spectrum of Wᵀ: blocks transposed (i, j) -> (j, i), each conjugated (Cᵀ has spectrum conj(S))."""
    t = w_spectrum.transpose(0, 1)
    return torch.stack((t[:, :, 0], -t[:, :, 1]), dim=2).contiguous()


def spectrum_grad(x, gy, block_size, p, q, dtype):
    """gS [p, q, 2, h] of the loss w.r.t. the spectrum (see the module docstring)."""
    acc = acc_dtype(dtype)
    b = block_size
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    g2 = gy.reshape(-1, gy.shape[-1]).to(acc)
    x2 = torch.nn.functional.pad(x2, (0, q * b - x2.shape[1]))
    g2 = torch.nn.functional.pad(g2, (0, p * b - g2.shape[1]))
    xf = torch.fft.rfft(x2.reshape(-1, q, b), dim=-1)             # [M, q, h]
    gz = torch.fft.rfft(g2.reshape(-1, p, b), dim=-1) * (2.0 / b)  # [M, p, h]
    gz[..., 0] *= 0.5
    if b % 2 == 0:
        gz[..., -1] *= 0.5
    gs = torch.einsum("mif,mjf->ijf", gz, xf.conj())
    return torch.stack((gs.real, gs.imag), dim=2).to(dtype)


def _setup(ctx, inputs, output):
    x, w_spectrum, block_size, out_features, bias = inputs
    ctx.save_for_backward(x, w_spectrum)
    ctx.block_size = block_size
    ctx.has_bias = bias is not None


def _backward(ctx, gy):
    x, w = ctx.saved_tensors
    b = ctx.block_size
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = block_circulant_linear(gy.contiguous(), transposed_spectrum(w), b, x.shape[-1], None)
    if ctx.needs_input_grad[1]:
        gw = spectrum_grad(x, gy, b, w.shape[0], w.shape[1], w.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, gw, None, None, gb


torch.library.register_autograd("reparam::block_circulant_linear", _backward, setup_context=_setup)
_dispatch.register(OpSpec("block_circulant_linear", reference.block_circulant_linear,
                          triton=_triton.block_circulant_linear,
                          cuda_dtypes=(torch.float16, torch.bfloat16, torch.float32)))
