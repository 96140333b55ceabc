"""Calibration statistics of a Linear layer's inputs, gathered with forward hooks.

What the compression methods need from calibration data is small and additive,
so it is accumulated batch by batch instead of keeping the activations:

* ``gram``       — XᵀX [in, in] in float64 (whitened SVD, GPTQ-style methods,
                   and the output error of any approximation on these inputs);
* ``abs_mean``   — mean |x| per input channel (activation scales for AWQ);
* ``mean_square`` — mean x² per input channel (diag XᵀX / n: the input energy that weights the
                   quantizers' grids, ``weighted_grid``);
* ``count``      — number of rows seen.
"""
import contextlib

import torch

from .svd import factor_device


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
        x2 = x.detach().reshape(-1, self.in_features)
        # XᵀX of one batch in fp32 (fast; relative error ~1e-7·√n), summed over batches in fp64
        x32 = x2.float()
        self.gram += (x32.t() @ x32).to(self.gram.device, torch.float64)
        self.abs_sum += x32.abs().sum(0).to(self.gram.device, torch.float64)
        self.count += x2.shape[0]

    @property
    def abs_mean(self):
        return self.abs_sum / max(self.count, 1)

    @property
    def mean_square(self):
        return self.gram.diagonal() / max(self.count, 1)

    def covariance_root(self, device):
        """R [in, in] in float64 on `device` with R·Rᵀ = XᵀX / n (by eigh: a rank-deficient XᵀX, from few
        rows, included). Kept until more inputs are added: layers sharing these statistics (q, k and v)
        reuse one eigh."""
        key = (self.count, str(device))
        if getattr(self, "_root_key", None) != key:
            lam, q = torch.linalg.eigh((self.gram / max(self.count, 1)).to(device, torch.float64))
            self._root, self._root_key = q * lam.clamp_min(0).sqrt(), key
        return self._root

    @classmethod
    def from_inputs(cls, x):
        s = cls(x.shape[-1])
        s.add(x)
        return s


@contextlib.contextmanager
def collect_inputs(modules, on_weight_device=False):
    """Context: {name: CalibStats} filled with the inputs each module sees while active.

    modules: {name: nn.Linear-like module with `in_features`}.
    Modules fed the very same tensor object (q/k/v projections of one hidden
    state) share one CalibStats, so that XᵀX is computed once.
    on_weight_device: keep each CalibStats where the module's factorizations will run
    (``svd.factor_device``: its GPU) instead of in CPU memory — no copy of every batch's XᵀX to
    the host (822 MB in fp32 for an 8B model's down projection) and back; for a block's few
    Linears at a time (~2 GB for an 8B block), not a whole model's.
    """
    def where(m):
        w = getattr(m, "weight", None)
        return factor_device(w) if on_weight_device and isinstance(w, torch.Tensor) else "cpu"

    stats = {n: CalibStats(m.in_features, where(m)) for n, m in modules.items()}
    alias = {}   # name → name of the module whose statistics it shares
    last = {}    # the tensor most recently added, and by whom
    handles = []
    for name, mod in modules.items():
        def hook(_mod, args, _name=name):
            x = args[0]
            if _name in alias:
                return
            if last.get("x") is x and stats[last["name"]].in_features == x.shape[-1] and stats[_name].count == 0:
                alias[_name] = last["name"]
                stats[_name] = stats[last["name"]]
                return
            stats[_name].add(x)
            last["x"], last["name"] = x, _name
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        last.clear()
        for h in handles:
            h.remove()


def random_tokens(model, n=16, seq_len=512, seed=0):
    """Token ids [n, seq_len] drawn uniformly from the vocabulary of `model` (a fixed generator: reproducible);
    seq_len is capped at the model's position limit (config.max_position_embeddings / n_positions).

    Calibration without data: what the grid weighting of round to nearest (int4 ``weighted_grid``) needs is
    each input channel's typical energy, and that is mostly a property of the model (its normalisation
    gains, the channels it keeps large), which random tokens bring out as well as text does
    (SmolLM2: docs/quant.md). ``compress(..., calib="random")`` uses this."""
    cfg = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None)
    if not vocab:
        raise ValueError("calib='random' needs a model with token embeddings (get_input_embeddings() or "
                         "config.vocab_size) to draw token ids from")
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and limit > 0:
        seq_len = min(seq_len, limit)  # learned position tables (GPT-2) end there
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(vocab), (n, seq_len), generator=gen)
