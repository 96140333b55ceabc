"""fold_act_order: an MLP's gather of its hidden activations folded into the rows of the layers that make them.

An act-order GPTQ down_proj loads as ``PermutedInputLinear(Int4Linear, perm)`` (``nn/permuted.py``): it computes
inner(h[..., perm]) with h = act(gate_proj(x)) * up_proj(x), one gather of M × intermediate elements per call.
act and * work element by element, so h[..., perm] = act(gate'(x)) * up'(x), where gate' and up' are gate_proj
and up_proj with their output rows in order perm. Reordering those rows once, at load time, leaves down_proj its
inner layer: the same outputs bit for bit (every output element is still computed from the same row and the same
x), one gather fewer per MLP per call. (q / k / v → o_proj has no such fold: the attention mixes v's rows head by
head, and act order's permutation does not keep heads whole.)

Whether a module combines its projections element by element is checked, not assumed from names: its forward
runs once on stand-in projections (fixed vectors, no weights) with the rows in both orders, and the rows are
reordered only where the consumer then sees the same hidden vector reordered by perm.
"""
import torch
from torch import nn

from ..nn.fused import _MARKS, _tensors
from ..nn.permuted import PermutedInputLinear
from ..nn.quant import Int4Linear, Int8Linear

# (producers, consumer) child names of MLPs that combine the producers' outputs element by element:
# Llama / Mistral / Qwen / Gemma, Mixtral's experts, Phi-3 (one gate_up_proj: gate rows, then up rows)
PATTERNS = ((("gate_proj", "up_proj"), "down_proj"), (("w1", "w3"), "w2"), (("gate_up_proj",), "down_proj"))

# layers whose every tensor has a row per output (nn.fused's _tensors, and the bias): rows reorder exactly
_ROW_LAYERS = (Int4Linear, Int8Linear, nn.Linear)


def fold_act_order(model):
    """Fold every act-order down_proj's input gather into its MLP's gate / up rows (module doc); returns the
    names of the consumers folded. ``load_int4_pretrained`` calls it; call it before ``fuse_projections``."""
    folded = []
    for name, mod in list(model.named_modules()):
        for producers, consumer in PATTERNS:
            if _fold_one(mod, producers, consumer):
                folded.append(f"{name}.{consumer}" if name else consumer)
    return folded


def _fold_one(mod, producer_names, consumer_name):
    down = getattr(mod, consumer_name, None)
    ups = [getattr(mod, n, None) for n in producer_names]
    if not isinstance(down, PermutedInputLinear) or not all(_row_permutable(p) for p in ups):
        return False
    inter = down.in_features
    if any(p.out_features % inter for p in ups):
        return False
    perm = down.perm.cpu()
    rows = [_rows(perm, p.out_features // inter) for p in ups]
    if not _combines_elementwise(mod, producer_names, consumer_name, ups, rows, perm):
        return False
    for p, r in zip(ups, rows):
        _permute_rows(p, r)
    inner = down.inner
    for mark in _MARKS:
        if hasattr(down, mark):
            setattr(inner, mark, getattr(down, mark))
    if isinstance(getattr(inner, "_reparam_settings", None), dict):
        inner._reparam_settings = {**inner._reparam_settings, "act_order": "folded into the producers' rows"}
    setattr(mod, consumer_name, inner)
    return True


def _rows(perm, copies):
    """Row order of a producer holding `copies` blocks of the hidden size (Phi-3's gate_up_proj: 2)."""
    inter = perm.numel()
    return torch.cat([perm + j * inter for j in range(copies)])


def _base(layer):
    return layer.inner if isinstance(layer, PermutedInputLinear) else layer


def _row_permutable(layer):
    return type(_base(layer)) in _ROW_LAYERS


def _permute_rows(layer, rows):
    base = _base(layer)
    with torch.no_grad():
        for t in [*_tensors(base).values(), base.bias]:
            if t is not None:
                t.data = t.data.index_select(0, rows.to(t.device))


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


class _Record(nn.Module):
    def __init__(self, seen, out_features):
        super().__init__()
        self.seen, self.out_features = seen, out_features

    def forward(self, h):
        self.seen.append(h)
        return h.new_zeros(*h.shape[:-1], self.out_features)


def _combines_elementwise(mod, producer_names, consumer_name, producers, rows, perm):
    """Whether mod's forward hands the consumer the same hidden vector in order perm when the producers' outputs
    come in the reordered rows (module doc). Any error in the probe (another forward signature) means no."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    outs = [torch.randn(1, 1, p.out_features, generator=gen) for p in producers]
    x = torch.zeros(1, 1, producers[0].in_features)
    names = (*producer_names, consumer_name)
    saved = {n: mod._modules[n] for n in names}
    seen = []
    try:
        for variant in (outs, [o[..., r] for o, r in zip(outs, rows)]):
            for n, o in zip(producer_names, variant):
                mod._modules[n] = _Fixed(o)
            mod._modules[consumer_name] = _Record(seen, saved[consumer_name].out_features)
            with torch.no_grad():
                mod(x)
    except Exception:  # noqa: BLE001 — a module this probe cannot call is simply not folded
        return False
    finally:
        mod._modules.update(saved)
    if len(seen) != 2 or seen[0].shape != seen[1].shape or seen[0].shape[-1] != perm.numel():
        return False
    return bool(torch.allclose(seen[0][..., perm], seen[1], rtol=1e-6, atol=0))
