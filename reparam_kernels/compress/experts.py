"""Fused mixture-of-experts weights as one pair of Linears per expert, so every method reaches them.

transformers 5 keeps a MoE block's experts as 3-D parameters of one module (`gate_up_proj` [experts,
2·ffn, hidden], `down_proj` [experts, hidden, ffn]; classes decorated with `use_experts_implementation`:
Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, …), not Linears, so no recipe matched them.
``unfuse_experts`` swaps each such module for an ``UnfusedExperts`` whose children "0", "1", … hold
``gate_up_proj`` (``up_proj`` for experts without a gate) and ``down_proj`` as nn.Linear — names like
``model.layers.3.mlp.experts.7.down_proj`` that recipes match ("{blocks}.*.mlp.experts.*.down_proj") —
with the same outputs. The Linears' weights are views of the 3-D storage (no copy). Calibration is
per expert for free: a Linear's hooks see only the tokens routed to its expert, so GPTQ, whitening and
the weighted grids use the routed tokens' statistics (an expert no calibration token reached gets
none: methods that need statistics treat it as they treat any unreached layer).

Forward, two paths:
- grouped: when each projection's experts are Int4Linear, Int8Linear or LUTLinear (GPTVQ, log 8-bit; log and
  k-means 4-bit) of one configuration, or low-rank (LowRankLinear / PivotedLowRankLinear of any ranks, with Linears a rank
  allocation kept dense), ``group()`` stacks their tensors into [E, …] storage (low rank: flat, one expert after
  the other; the experts' own tensors become views of it, no second copy) and forward runs each projection of
  all experts as one ``reparam.grouped_int4_linear`` / ``grouped_int8_linear`` / ``grouped_vq_linear`` /
  ``grouped_lut_linear`` / ``grouped_lowrank_linear`` call over the routed rows
  sorted by expert: no host sync, so capturable in a CUDA graph and free of graph breaks under
  torch.compile. ``compress`` and ``load_compressed`` group what they build (``group_experts``); moving or
  casting the module (``.to``) groups again. Used unless an expert's scales, zeros or codebooks need a gradient
  (distillation); gradients reach x and the experts' biases.
- per expert: the experts a batch routes to, one after the other (transformers' "eager" implementation),
  for every other format and for training: a host sync to list the routed experts, so not capturable.
``compress`` unfuses a model's experts before planning, fuses back the experts modules no rule compressed
(``fuse_dense_experts``: transformers' own implementation again, and the checkpoint's layout the original's)
and ``save_compressed`` records the rest, so ``load_compressed`` unfuses the skeleton the same way.
"""
from typing import NamedTuple

import torch
from torch import nn

from .._dispatch import as_dtype


class Stacked(NamedTuple):
    """One projection's experts stacked for its grouped op: op(x, offsets, *tensors, *consts, bias)."""
    op: object
    tensors: tuple  # in the op's order ([E, …] each, or flat: low rank); the experts' own tensors are views of them
    consts: tuple
    bias: object    # [E, N] or None
    names: tuple    # the format's attribute names of the views
    views: object   # e -> {attribute of expert e's layer: its view of `tensors`}


class Format(NamedTuple):
    """A layer type that runs grouped: its op, the layers' tensors it takes (``names``), ``stack(layers)`` →
    (tensors, consts, views) as in Stacked, ``accepts(layer)``: the layers that may join the group (the format's
    type; low rank also takes experts a rank allocation kept dense), ``key(layer)``: what must agree to stack."""
    op: object
    names: tuple
    stack: object
    accepts: object
    key: object

_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module):
    """A transformers experts module with 3-D expert weights (decorated by `use_experts_implementation`)."""
    w = getattr(module, "down_proj", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 3 and hasattr(module, "has_gate")
            and hasattr(module, "is_transposed") and hasattr(module, "num_experts"))


def _linear(w, b, transposed):
    """nn.Linear over a view of one expert's weight ([out, in], or [in, out] when stored transposed)."""
    w = w.t() if transposed else w
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.detach(), requires_grad=w.requires_grad)  # a view: same storage
    if b is not None:
        lin.bias = nn.Parameter(b.detach(), requires_grad=b.requires_grad)
    return lin


# transformers' experts decorator's layout flags and their defaults there; releases before the flag existed
# (5.17 has no has_post_expert_norm) lay the experts out as the default says
_LAYOUT_DEFAULTS = {"has_gate": True, "has_bias": False, "is_transposed": False, "has_post_expert_norm": False}


def _layout_flag(fused, name):
    return bool(getattr(fused, name, _LAYOUT_DEFAULTS[name]))


class UnfusedExperts(nn.Module):
    """The experts of `fused` as children "0".."E-1", each a module with `gate_up_proj` (or `up_proj`) and
    `down_proj` Linears; forward(hidden_states [tokens, hidden], top_k_index, top_k_weights [tokens, k])
    as the fused module's. The gating (`_apply_gate`, `act_fn`, a model's own constants) stays the fused
    module's, kept outside the module tree without its weights."""

    def __init__(self, fused):
        super().__init__()
        if getattr(fused, "_is_expert_parallel", False):
            raise ValueError("unfuse_experts: expert-parallel experts modules are not supported")
        has_gate = _layout_flag(fused, "has_gate")
        up = "gate_up_proj" if has_gate else "up_proj"
        self.num_experts, self.has_gate, self.up_name = fused.num_experts, has_gate, up
        for e in range(fused.num_experts):
            expert = nn.Module()
            for name in (up, "down_proj"):
                bias = getattr(fused, f"{name}_bias", None) if _layout_flag(fused, "has_bias") else None
                setattr(expert, name, _linear(getattr(fused, name)[e], None if bias is None else bias[e],
                                              _layout_flag(fused, "is_transposed")))
            self.add_module(str(e), expert)
        if _layout_flag(fused, "has_post_expert_norm"):
            self.post_expert_norm = fused.post_expert_norm
        for name in _WEIGHTS + tuple(f"{w}_bias" for w in _WEIGHTS):
            fused._parameters.pop(name, None)
        fused._modules.pop("post_expert_norm", None)
        left = [n for n, _ in fused.named_parameters()] + [n for n, _ in fused.named_buffers()]
        if left:
            raise ValueError(f"unfuse_experts: {type(fused).__name__} holds tensors {left} besides the expert "
                             "weights; it is not supported")
        object.__setattr__(self, "_fused", fused)  # gating code and constants; no tensors left in it
        self._grouped = None  # {projection: Stacked}, see group()

    def expert(self, e):
        return self._modules[str(e)]

    def is_dense(self):
        """Every expert's layers are still plain nn.Linear (no rule compressed them)."""
        return all(type(getattr(self.expert(e), proj)) is nn.Linear
                   for e in range(self.num_experts) for proj in (self.up_name, "down_proj"))

    def fused_again(self):
        """The original experts module with the experts' current weights stacked back into its 3-D parameters
        (a copy; the Linears' storage goes with them): where no rule compressed an expert, transformers' own
        implementation (e.g. grouped_mm: no host sync) serves better than the per-expert loop. Needs is_dense()."""
        if not self.is_dense():
            raise ValueError("fused_again: some experts are compressed; only dense experts fuse back")
        fused = self._fused
        transposed = _layout_flag(fused, "is_transposed")
        for proj in (self.up_name, "down_proj"):
            lins = self._layers(proj)
            with torch.no_grad():
                w = torch.stack([lin.weight.t() if transposed else lin.weight for lin in lins])
            fused.register_parameter(proj, nn.Parameter(w, requires_grad=lins[0].weight.requires_grad))
            if _layout_flag(fused, "has_bias"):
                with torch.no_grad():
                    b = torch.stack([lin.bias for lin in lins])
                fused.register_parameter(f"{proj}_bias", nn.Parameter(b, requires_grad=lins[0].bias.requires_grad))
        if "post_expert_norm" in self._modules:
            fused.post_expert_norm = self.post_expert_norm
        return fused

    def _layers(self, proj):
        return [getattr(self.expert(e), proj) for e in range(self.num_experts)]

    def group(self):
        """Stack each projection's expert tensors into [E, …] storage, the experts' tensors becoming views of it,
        for the grouped forward. Returns whether it could: each projection's experts must be one format with a
        grouped op (``_grouped_format``) in one configuration (shape, settings, bias or not, dtypes, device);
        if one cannot, nothing changes."""
        self._grouped = None
        plans = {}
        for proj in (self.up_name, "down_proj"):
            layers = self._layers(proj)
            plans[proj] = (layers, next((f for f in map(_grouped_format, layers) if f is not None), None))
        if all(fmt is None for _, fmt in plans.values()):
            return False
        for proj, (layers, fmt) in plans.items():
            if fmt is None and all(type(m) is nn.Linear for m in layers):
                # a projection no rule compressed beside one that runs grouped: its dense experts as exact factors
                # (_stack_factors), so the whole forward stays sync-free (out < in reads an N x N identity more)
                fmt = _lowrank_format()
                plans[proj] = (layers, fmt)
            if fmt is None or not all(map(fmt.accepts, layers)) or len({_config(m, fmt) for m in layers}) != 1:
                return False
        stacked = {}
        for proj, (layers, fmt) in plans.items():
            with torch.no_grad():
                tensors, consts, views = fmt.stack(layers)
                bias = None if layers[0].bias is None else torch.stack([m.bias for m in layers])
            for e, m in enumerate(layers):  # the experts' tensors now live in the stacked storage
                for name, view in {**views(e), **({} if bias is None else {"bias": bias[e]})}.items():
                    old = getattr(m, name)
                    setattr(m, name, nn.Parameter(view, requires_grad=old.requires_grad)
                            if name in m._parameters else view)
            stacked[proj] = Stacked(fmt.op, tensors, consts, bias, fmt.names, views)
        self._grouped = stacked
        return True

    def _apply(self, fn, recurse=True):
        """.to() / .half() / .cuda() give each expert tensor its own storage: stack them again."""
        out = super()._apply(fn, recurse)
        if self._grouped is not None:
            self.group()
        return out

    def _grouped_ok(self):
        """The grouped path applies: stacked (again, if a load with assign=True or a copy gave the experts
        other storage) and no expert parameter but a bias wants a gradient (the grouped ops give x's and the
        bias's; the experts' scales, zeros and codebooks train through the per-expert path)."""
        if self._grouped is None:
            return False
        if not torch.compiler.is_compiling():  # (data_ptr is not traceable; under torch.compile it is trusted)
            for proj, st in self._grouped.items():  # the first and last experts' first two tensors: a cheap test
                for e in (0, self.num_experts - 1):
                    layer = getattr(self._modules[str(e)], proj)
                    if any(getattr(layer, name, None) is None or getattr(layer, name).data_ptr() != t.data_ptr()
                           for name, t in list(st.views(e).items())[:2]):
                        return self.group() and self._grouped_ok()
        if torch.is_grad_enabled():  # (a bias may train: the forward stacks the experts' own biases then)
            return not any(p.requires_grad for proj in self._grouped for m in self._layers(proj)
                           for name, p in m.named_parameters() if name != "bias")
        return True

    def _bias(self, proj, st):
        """The stacked bias, or where a bias trains a stack of the experts' own bias Parameters (a copy of E·N
        values that autograd follows back to them)."""
        if st.bias is None or not torch.is_grad_enabled():
            return st.bias
        layers = self._layers(proj)
        return torch.stack([m.bias for m in layers]) if any(m.bias.requires_grad for m in layers) else st.bias

    def _forward_grouped(self, hidden_states, top_k_index, top_k_weights):
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # rows sorted by expert; sentinels (≥ E) last, outside the offsets
        ids = flat[order]
        offsets = torch.searchsorted(ids, torch.arange(self.num_experts + 1, device=ids.device, dtype=ids.dtype))
        tok = order // k
        h = hidden_states[tok]
        for proj in (self.up_name, "down_proj"):
            st = self._grouped[proj]
            dt = h.dtype
            h = st.op(h, offsets, *(as_dtype(t, dt) if t.is_floating_point() else t for t in st.tensors), *st.consts,
                      as_dtype(self._bias(proj, st), dt))
            if proj != "down_proj":
                h = self._fused._apply_gate(h) if self.has_gate else self._fused.act_fn(h)
        if "post_expert_norm" in self._modules:
            h = self.post_expert_norm(h)
        w = top_k_weights.reshape(-1)[order]
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, tok, (h * w[:, None]).to(out.dtype))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self._grouped_ok():
            return self._forward_grouped(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:  # an expert-parallel sentinel
                continue
            tok, pos = torch.where(top_k_index == e)
            ex = self.expert(e)
            h = getattr(ex, self.up_name)(hidden_states[tok])
            h = self._fused._apply_gate(h) if self.has_gate else self._fused.act_fn(h)
            y = ex.down_proj(h)
            if "post_expert_norm" in self._modules:
                y = self.post_expert_norm(y)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _grouped_format(layer):
    """The ``Format`` of `layer`'s type, or None: that format runs per expert."""
    from ..nn.lowrank import LowRankLinear
    from ..nn.pivoted import PivotedLowRankLinear
    from ..nn.quant import Int4Linear, Int8Linear, LUTLinear
    from ..ops import grouped_int4_linear, grouped_int8_linear, grouped_lut_linear, grouped_vq_linear

    kind = type(layer)
    if kind is Int4Linear:
        return _along_experts(grouped_int4_linear, kind, ("qweight", "scales", "zeros"), lambda m: (m.group_size,))
    if kind is Int8Linear:
        return _along_experts(grouped_int8_linear, kind, ("qweight", "scales"), lambda m: ())
    if kind is LUTLinear and layer.kernel == "vq_linear" and layer.codes.dtype == torch.uint8:  # GPTVQ, log 8-bit
        return _along_experts(grouped_vq_linear, kind, ("codes", "codebooks"), lambda m: ())
    if kind is LUTLinear and layer.kernel == "lut_linear":  # log and k-means 4-bit: two codes a byte, [L, 16] tables
        return _along_experts(grouped_lut_linear, kind, ("codes", "lut"), lambda m: ())
    if kind in (LowRankLinear, PivotedLowRankLinear):
        return _lowrank_format()
    return None


def _lowrank_format():
    """Low-rank experts, plain or pivoted, of any ranks; dense experts (nn.Linear) join as exact factors."""
    from ..nn.lowrank import LowRankLinear
    from ..nn.pivoted import PivotedLowRankLinear
    from ..ops import grouped_lowrank_linear

    kinds = (LowRankLinear, PivotedLowRankLinear, nn.Linear)
    return Format(grouped_lowrank_linear, ("u", "v", "w", "perm"), _stack_factors, lambda m: type(m) in kinds,
                  lambda m: (m.u.dtype, m.u.device) if hasattr(m, "u") else (m.weight.dtype, m.weight.device))


def _along_experts(op, kind, names, consts):
    """A format whose experts' tensors share a shape: stacked along a new first dimension."""
    def stack(layers):
        tensors = tuple(torch.stack([getattr(m, name) for m in layers]) for name in names)
        return tensors, consts(layers[0]), lambda e: {name: t[e] for name, t in zip(names, tensors)}

    def key(m):
        return (op, consts(m), *((t.dtype, t.device, tuple(t.shape)) for t in (getattr(m, n) for n in names)))

    return Format(op, names, stack, lambda m: type(m) is kind, key)


def _stack_factors(layers):
    """Low-rank experts of any ranks, plain or pivoted, flat one after the other (ops/grouped_lowrank_linear.py);
    an expert kept dense joins as exact factors (``stack_factors``), its weight a view of them too."""
    from ..ops.grouped_lowrank_linear import stack_factors
    from ..reference.grouped_lowrank_linear import expert_factors

    n, k = layers[0].out_features, layers[0].in_features
    # a perm for every expert where one is pivoted, or dense with out ≥ in (a plain expert's x is then gathered too)
    pivots = any(hasattr(m, "w") or (not hasattr(m, "u") and n >= k) for m in layers)
    us, vs, perms = [], [], []
    for m in layers:
        if hasattr(m, "u"):
            us.append(m.u)
            vs.append(m.v if hasattr(m, "v") else m.w)
            perms.append(getattr(m, "perm", None))
        elif n >= k:  # dense, pivoted form: u = W, no w, the identity perm
            us.append(m.weight)
            vs.append(m.weight.new_empty(k, 0))
            perms.append(torch.arange(k, device=m.weight.device))
        else:  # dense, plain form: u = I, v = W
            us.append(torch.eye(n, dtype=m.weight.dtype, device=m.weight.device))
            vs.append(m.weight)
            perms.append(None)
    u, v, perm, fo, max_rank, row_align = stack_factors(us, vs, perms if pivots else None)
    bounds = fo.tolist()

    def views(e):
        ue, ve, pe = expert_factors(u, v, perm, fo, n, k, e, bounds)
        m = layers[e]
        if not hasattr(m, "u"):
            return {"weight": ue if n >= k else ve}
        out = {"u": ue, "v" if hasattr(m, "v") else "w": ve}
        return {**out, "perm": pe} if hasattr(m, "perm") else out

    consts = (fo, n, max_rank, row_align)
    return ((u, v, perm), consts, views) if pivots else ((u, v), (None, *consts), views)


def _config(layer, fmt):
    """What must agree across experts for their tensors to stack: sizes, bias or not, the format's key."""
    return (layer.in_features, layer.out_features, layer.bias is None, fmt.key(layer))


def fuse_dense_experts(model):
    """Put back the original experts module wherever every expert of an UnfusedExperts is still dense
    (``UnfusedExperts.fused_again``), in place; returns the names fused again."""
    names = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts) and m.is_dense()]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(name).fused_again())
    return names


def group_experts(model):
    """Stack every UnfusedExperts of `model` whose experts allow it for the grouped forward
    (``UnfusedExperts.group``); returns the names grouped."""
    return [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts) and m.group()]


def fused_experts_names(model):
    return [n for n, m in model.named_modules() if is_fused_experts(m)]


def fused_hint(model):
    """For "pattern matches no Linear" errors: why, when the model's experts are still fused ("" if not)."""
    fused = fused_experts_names(model)
    return (f"; its mixture-of-experts weights are still fused ({fused[0]}): compress() splits them per expert "
            "first, elsewhere call reparam_kernels.compress.experts.unfuse_experts(model)") if fused else ""


def unfuse_experts(model, names=None):
    """Swap the fused experts modules `names` (default: every one) of `model` for UnfusedExperts, in place;
    returns the names swapped."""
    names = fused_experts_names(model) if names is None else list(names)
    for name in names:
        parent, _, child = name.rpartition(".")
        fused = model.get_submodule(name)
        if not is_fused_experts(fused):
            raise ValueError(f"`model`: {name!r} is a {type(fused).__name__}, not a fused experts module")
        setattr(model.get_submodule(parent) if parent else model, child, UnfusedExperts(fused))
    return names
