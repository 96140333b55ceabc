"""Sibling projections of one input fused into one layer: q/k/v of an attention block, gate/up of an MLP.

At decode a compressed Linear is a few microseconds of launch and latency on top of its weight traffic, and a
small one (Llama-3-8B's k / v: 1024 rows) leaves most SMs idle. ``fuse_projections(model)`` concatenates the
rows of siblings that read the same input and share a format (int4 with one group size, int8, 4-bit LUT / VQ
with the same rows per table, or dense nn.Linear) into one layer of that format: one launch instead of three
(two), on a bigger grid; plain low-rank siblings stack their right factors only (``fused_lowrank.py``). The
model's code is not changed: each sibling becomes a ``ProjectionSlice`` that returns its columns of the fused
output. The first slice called with an input runs the fused layer and keeps
the result; the others, called with that same tensor (``is``), take their part of it, and the last one drops
it — so under ``torch.compile`` the kept result never leaves the graph (``fullgraph=True`` works) and nothing
outlives a CUDA-graph replay. A slice called with another input (cross-attention's k / v on the encoder's
states) runs the fused layer again: correct, but wasted work — fuse self-attention only.

For inference: ``compress`` and ``save_compressed`` refuse a fused model (``unfuse_projections`` splits it back
exactly; fuse again after ``load_compressed``). The fused layer's parameters are new tensors (an optimizer made
before fusing does not see them), and hooks on the original siblings are not carried.
"""
import warnings

import torch
from torch import nn

from .fused_lowrank import FusedLowRank
from .lowrank import LowRankLinear
from .permuted import PermutedInputLinear
from .quant import Int4Linear, Int8Linear, LUTLinear

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_MARKS = ("_reparam_method", "_reparam_settings")  # what compress() sets on a layer it made


def _fuse_key(m):
    """What siblings must share to be fused (None: this layer type has no fused form)."""
    if type(m) is nn.Linear:
        return ("linear", m.in_features, m.weight.dtype, m.weight.device)
    if type(m) is Int8Linear:
        return ("int8", m.in_features, m.scales.dtype, m.scales.device)
    if type(m) is Int4Linear:
        return ("int4", m.in_features, m.group_size, m.scales.dtype, m.scales.device)
    if type(m) is LowRankLinear:  # right factors stacked, left factors apart (fused_lowrank.py)
        return ("lowrank", m.in_features, m.v.dtype, m.v.device)
    if type(m) is LUTLinear:  # tables cover equal row blocks: fused, they still do
        book = m.lut if m.packed else m.codebooks
        return ("lut", m.in_features, m.bits, m.d, m.kernel, m.out_features // m.num_tables, book.dtype, book.device)
    if type(m) is PermutedInputLinear and type(m.inner) is not LowRankLinear:
        # act-order GPTQ siblings: q / k / v (gate / up) read one input, so GPTQ ordered their columns alike
        # (by the same Hessian's diagonal): one gather of x and one fused layer of their inner format
        inner = _fuse_key(m.inner)
        return None if inner is None else ("permuted", inner, tuple(m.perm.tolist()))
    return None


def _empty_like(proto, out_features, bias):
    """A layer of `proto`'s type and settings with `out_features` rows (its tensors filled by the caller)."""
    kind, k = _fuse_key(proto)[:2]
    dev = next(iter(_tensors(proto).values())).device
    if kind == "linear":
        return nn.Linear(k, out_features, bias=bias, dtype=proto.weight.dtype, device=dev)
    if kind == "int8":
        return Int8Linear(k, out_features, bias=bias, dtype=proto.scales.dtype, device=dev)
    if kind == "int4":
        return Int4Linear(k, out_features, group_size=proto.group_size, bias=bias, dtype=proto.scales.dtype, device=dev)
    rows_per_table = proto.out_features // proto.num_tables
    book = proto.lut if proto.packed else proto.codebooks
    return LUTLinear(k, out_features, bits=proto.bits, d=proto.d, num_tables=out_features // rows_per_table,
                     bias=bias, dtype=book.dtype, device=dev)


def _tensors(m):
    """The layer's own tensors but the bias; each has rows (or tables of equal row blocks) on dim 0."""
    return {n: t for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            if n != "bias"}


def _concat(members):
    sizes = [m.out_features for m in members]
    biased = [m.bias is not None for m in members]
    if type(members[0]) is LowRankLinear:
        return FusedLowRank(members), sizes, biased
    if type(members[0]) is PermutedInputLinear:
        inner, _, _ = _concat([m.inner for m in members])
        return PermutedInputLinear(inner, members[0].perm.clone()), sizes, biased
    fused = _empty_like(members[0], sum(sizes), any(biased))
    for name, t in _tensors(fused).items():
        parts = [_tensors(m)[name] for m in members]
        t.requires_grad_(any(p.requires_grad for p in parts))
        t.data.copy_(torch.cat([p.detach() for p in parts]))
    if fused.bias is not None:  # a sibling without a bias adds zeros
        fused.bias.data.copy_(torch.cat([m.bias.detach() if m.bias is not None
                                         else fused.bias.new_zeros(m.out_features) for m in members]))
        fused.bias.requires_grad_(any(m.bias.requires_grad for m in members if m.bias is not None))
    return fused, sizes, biased


class FusedProjections(nn.Module):
    """The fused layer of sibling projections (``layer``) and the bookkeeping its slices share."""

    def __init__(self, layer, names, sizes, biased, marks=None):
        super().__init__()
        self.layer = layer
        self.names, self.sizes, self.biased = tuple(names), tuple(sizes), tuple(biased)
        # each sibling's compress() marks (_reparam_method / _reparam_settings), put back by unfuse_projections:
        # without them save_compressed would not know the siblings as compressed layers
        self.marks = tuple(marks) if marks is not None else ({},) * len(self.names)
        self._cache = None  # (input, its parts) between the first slice of a call and the last
        self._left = 0      # slices still to take their part of _cache

    def part(self, x, index):
        cache = self._cache
        if cache is not None and cache[0] is x:
            parts = cache[1]
            self._left -= 1
            if self._left == 0:
                self._cache = None
        else:
            out = self.layer(x)  # (FusedLowRank gives the parts themselves)
            parts = out if isinstance(out, tuple) else out.split(self.sizes, dim=-1)
            self._cache, self._left = (x, parts), len(self.sizes) - 1
        return parts[index]

    def extra_repr(self):
        return f"names={list(self.names)}, sizes={list(self.sizes)}"


class ProjectionSlice(nn.Module):
    """Stands where sibling `names[index]` was: its columns of the fused layer's output."""

    def __init__(self, owner, index):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner's tensors are listed once
        self.index = index
        self.in_features = owner.layer.in_features
        self.out_features = owner.sizes[index]

    def forward(self, x):
        return self._owner.part(x, self.index)

    def extra_repr(self):
        return f"{self._owner.names[self.index]}: out_features={self.out_features} of the fused layer"


def fuse_projections(model, groups=DEFAULT_GROUPS):
    """Fuse each module's children named in one of `groups` that share a format (see the module doc).

    Returns {parent module name: [fused child names, ...]}; within a group, siblings of another format are
    left alone (q int4 with k / v int8: k and v fused). Raises if `model` is fused already."""
    if is_fused(model):
        raise ValueError("fuse_projections: the model has fused projections already")
    done, types_seen = {}, set()
    for parent_name, parent in list(model.named_modules()):
        for group in groups:
            present = [n for n in group if isinstance(getattr(parent, n, None), nn.Module)]
            if len(present) > 1:
                types_seen.update(type(getattr(parent, n)).__name__ for n in present)
            by_key = {}
            for n in present:
                key = _fuse_key(getattr(parent, n))
                if key is not None:
                    by_key.setdefault(key, []).append(n)
            for names in by_key.values():
                members = [getattr(parent, n) for n in names]
                if len(names) < 2 or len({id(m) for m in members}) < len(members):
                    continue
                layer, sizes, biased = _concat(members)
                marks = [{a: getattr(m, a) for a in _MARKS if hasattr(m, a)} for m in members]
                owner = FusedProjections(layer, names, sizes, biased, marks)
                parent.add_module("fused_" + "_".join(names), owner)
                for i, n in enumerate(names):
                    setattr(parent, n, ProjectionSlice(owner, i))
                done.setdefault(parent_name, []).append(list(names))
    if not done and types_seen:  # siblings found, none fusable: say why rather than return {} silently
        warnings.warn(f"fuse_projections: no sibling projections share a fusable format (found "
                      f"{', '.join(sorted(types_seen))}; fusable: nn.Linear, Int8Linear, Int4Linear, LUTLinear, "
                      "LowRankLinear, and PermutedInputLinear siblings of one order around one of those)",
                      stacklevel=2)
    return done


def unfuse_projections(model):
    """Split every fused layer back into its siblings (the same tensors, row for row); returns how many."""
    count = 0
    for _, parent in list(model.named_modules()):
        for child_name, owner in list(parent.named_children()):
            if not isinstance(owner, FusedProjections):
                continue
            members = (owner.layer.split(owner.biased) if isinstance(owner.layer, FusedLowRank)
                       else _split(owner.layer, owner.sizes, owner.biased))
            for n, member, marks in zip(owner.names, members, owner.marks):
                for a, v in marks.items():
                    setattr(member, a, v)
                setattr(parent, n, member)
            delattr(parent, child_name)
            count += 1
    return count


def _split(layer, sizes, biased):
    """The siblings a fused layer (not FusedLowRank) was concatenated from: the same tensors, row for row."""
    if isinstance(layer, PermutedInputLinear):
        return [PermutedInputLinear(m, layer.perm.clone()) for m in _split(layer.inner, sizes, biased)]
    fused_t = _tensors(layer)
    total, start, members = sum(sizes), 0, []
    for size, has_bias in zip(sizes, biased):
        member = _empty_like(layer, size, has_bias)
        for name, t in _tensors(member).items():
            src = fused_t[name]
            lo = start * src.shape[0] // total  # rows, or tables of equal row blocks
            t.data.copy_(src.detach()[lo:lo + t.shape[0]])
            t.requires_grad_(src.requires_grad)
        if has_bias:
            member.bias.data.copy_(layer.bias.detach()[start:start + size])
            member.bias.requires_grad_(layer.bias.requires_grad)
        members.append(member)
        start += size
    return members


def is_fused(model):
    return any(isinstance(m, FusedProjections) for m in model.modules())


def refuse_fused(model, what):
    """A clear error where `what` cannot take a model with fused projections."""
    if is_fused(model):
        raise ValueError(f"{what}: the model has fused projections (fuse_projections); call "
                         "reparam_kernels.unfuse_projections(model) first (and fuse again afterwards)")
