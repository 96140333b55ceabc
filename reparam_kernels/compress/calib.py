"""Calibration statistics of a Linear layer's inputs, gathered with forward hooks.

What the compression methods need from calibration data is small and additive,
so it is accumulated batch by batch instead of keeping the activations:

* ``gram``       — XᵀX [in, in] in float64 (whitened SVD, GPTQ-style methods,
                   and the output error of any approximation on these inputs);
* ``abs_mean``   — mean |x| per input channel (activation scales for AWQ);
* ``count``      — number of rows seen.
"""
import contextlib

import torch


class CalibStats:
    def __init__(self, in_features, device="cpu"):
        self.in_features = int(in_features)
        self.gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"`x` has {x.shape[-1]} features, CalibStats expects {self.in_features}")
        x2 = x.detach().reshape(-1, self.in_features).to(self.gram.device, torch.float64)
        self.gram.addmm_(x2.t(), x2)
        self.abs_sum += x2.abs().sum(0)
        self.count += x2.shape[0]

    @property
    def abs_mean(self):
        return self.abs_sum / max(self.count, 1)

    @classmethod
    def from_inputs(cls, x):
        s = cls(x.shape[-1])
        s.add(x)
        return s


@contextlib.contextmanager
def collect_inputs(modules):
    """Context: {name: CalibStats} filled with the inputs each module sees while active.

    modules: {name: nn.Linear-like module with `in_features`}.
    """
    stats = {n: CalibStats(m.in_features) for n, m in modules.items()}
    handles = []
    for name, mod in modules.items():
        def hook(_mod, args, _name=name):
            stats[_name].add(args[0])
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
