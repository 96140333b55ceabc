import torch

from .._dtypes import acc_dtype


def spectrum_products(xf, w_spectrum):
    """Z[..., i, f] = Σ_j S[i, j, f] · X[..., j, f]: the frequency-domain block products.

    xf: complex [..., q, h]; w_spectrum: real [p, q, 2, h] (real, imag planes).
    """
    s = torch.complex(w_spectrum[:, :, 0], w_spectrum[:, :, 1]).to(xf.dtype)
    return torch.einsum("ijf,...jf->...if", s, xf)


def block_circulant_linear(x, w_spectrum, block_size, out_features, bias=None):
    """y = W x + bias for a block-circulant W [N, K] of b×b blocks given by their spectra.

    y_i = irfft(Σ_j S_ij ⊙ rfft(x_j)); x is zero-padded to q·b features and the
    p·b outputs are cut to out_features. fp32 math (fp64 for fp64 x); returns x's dtype.
    """
    acc = acc_dtype(x.dtype)
    b = block_size
    p, q = w_spectrum.shape[0], w_spectrum.shape[1]
    k = x.shape[-1]
    xs = x.to(acc)
    if k < q * b:
        xs = torch.nn.functional.pad(xs, (0, q * b - k))
    xf = torch.fft.rfft(xs.reshape(*x.shape[:-1], q, b), dim=-1)
    z = spectrum_products(xf, w_spectrum.to(acc))
    y = torch.fft.irfft(z, n=b, dim=-1).reshape(*x.shape[:-1], p * b)[..., :out_features]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous()  # the slice to out_features is a strided view
