"""The one way the package builds an ``nn.Linear`` from tensors (to_linear, Conv1D, factors, benches)."""
import torch
from torch import nn


def linear_from(weight, bias=None):
    """An ``nn.Linear`` holding copies of `weight` [out, in] and `bias` [out] (or none), in the weight's
    dtype and on its device."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                    device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin
