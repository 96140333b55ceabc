"""PermutedInputLinear: y = inner(x[..., perm]) — a layer whose weight's columns were reordered.

What it is for: GPTQ checkpoints quantized with act order (``desc_act``) put input column k in group
``g_idx[k]``, so a group is a set of scattered columns rather than a run of ``group_size`` consecutive
ones, which is what Int4Linear (and its kernels) take. Sorting the columns by group makes every group a
run: the weight with its columns in order ``perm`` is an ordinary group-wise int4 weight, and
x @ W.T = x[..., perm] @ W[:, perm].T. The gather is one ``index_select`` of x per call (M · K elements:
at decode a few KB beside the weight's MBs), traced as such under ``torch.compile``.
``compress.int4_checkpoints`` builds these; ``save_compressed`` / ``load_compressed`` keep them (perm is a
buffer).
"""
import torch
from torch import nn


class PermutedInputLinear(nn.Module):
    CHILDREN = ("inner",)  # constructor arguments that are layers (save_compressed records them)

    def __init__(self, inner, perm=None):
        super().__init__()
        k = getattr(inner, "in_features", None)
        if not isinstance(k, int):
            raise ValueError(f"`inner` must be a Linear-like layer with in_features, got {type(inner).__name__}")
        device = _device_of(inner)
        if perm is None:  # (load_compressed builds the layer, then loads the saved perm into this buffer)
            perm = torch.arange(k, device=device)
        perm = torch.as_tensor(perm, device=device)
        if perm.dim() != 1 or perm.numel() != k or perm.is_floating_point():
            raise ValueError(f"`perm` must be an integer vector of in_features = {k} indices, got "
                             f"{perm.dtype} {tuple(perm.shape)}")
        if not torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(k, device="cpu")):
            raise ValueError(f"`perm` must be a permutation of 0..{k - 1}")
        self.inner = inner
        self.in_features, self.out_features = k, inner.out_features
        self.register_buffer("perm", perm.to(dtype=torch.long))

    @property
    def bias(self):
        return getattr(self.inner, "bias", None)

    def to_dense(self):
        """Effective [out, in] weight: the inner weight's columns put back in x's order."""
        w = self.inner.to_dense()
        out = torch.empty_like(w)
        out[:, self.perm.to(w.device)] = w
        return out

    def forward(self, x):
        return self.inner(x.index_select(-1, self.perm))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _device_of(module):
    t = next(iter(module.buffers()), None)
    if t is None:
        t = next(iter(module.parameters()), None)
    return t.device if t is not None and not t.is_meta else torch.device("cpu")
