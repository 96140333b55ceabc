"""Every compressed layer type of ``reparam_kernels.nn``, built for a given Linear shape.

Used by the end-to-end decode benchmark (to swap a model's Linears), by the
sanitizer script (one call of each op) and by the compile tests (a model with
every layer type). Only classes that exist in ``reparam_kernels.nn`` are
listed, so the set grows as layers land.

Two ways to build each kind:
* ``make(kind, linear)``: ``from_linear`` on a real weight (small models, tests);
* ``make_random(kind, in, out, ...)``: the constructor plus random contents, with
  no factorization or quantization run: for speed measurements on large random
  models, where an SVD of every weight would cost minutes and change nothing.
"""
import importlib

import torch
from torch import nn

from .. import nn as rnn
from .._linear import linear_from


def _cls(name, module="reparam_kernels.nn"):
    cls = getattr(rnn, name, None)
    if cls is None and module != "reparam_kernels.nn":
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    return cls


def group_for(in_features):
    """int4 group size: 128 where it divides in_features, else the largest of 64/32 that does."""
    return next((g for g in (128, 64, 32) if in_features % g == 0), None)


def rank_for(in_features, out_features, removed, multiple=8):
    """Rank whose factors hold (1 - removed) of the dense parameters, rounded down to `multiple`."""
    r = int((1 - removed) * in_features * out_features / (in_features + out_features))
    return max(multiple, r // multiple * multiple)


def _combo_rank(i, o):
    g = min(group_for(i) or 0, group_for(o) or 128)
    return rank_for(i, o, 0.4, multiple=g or 32), g


def _combo_from_linear(linear):
    """Low rank at 40% fewer parameters whose two factors are then int4-quantized."""
    i, o = linear.in_features, linear.out_features
    r, g = _combo_rank(i, o)
    lr = rnn.LowRankLinear.from_linear(linear, rank=r)
    first = rnn.Int4Linear.from_linear(linear_from(lr.v.detach()), group_size=g)
    second = rnn.Int4Linear.from_linear(linear_from(lr.u.detach(), linear.bias), group_size=group_for(r))
    return _cls("FactoredLinear", "reparam_kernels.nn.factored")(first, second)


def _combo_random(i, o, bias, dtype, device):
    r, g = _combo_rank(i, o)
    first = rnn.Int4Linear(i, r, group_size=g, bias=False, dtype=dtype, device=device)
    second = rnn.Int4Linear(r, o, group_size=group_for(r), bias=bias, dtype=dtype, device=device)
    return _cls("FactoredLinear", "reparam_kernels.nn.factored")(first, second)


def _pivoted_random(i, o, bias, dtype, device):
    """Pivoted low rank at 40% fewer parameters (counting its r·(o + i − r) storage), random factors;
    the rank rounded down to a multiple of 8 like the compression pipeline's (the decode kernel's sizes)."""
    from ..compress.allocate import kernel_friendly_rank
    from ..compress.svd import pivoted_rank_for_ratio

    r = kernel_friendly_rank(pivoted_rank_for_ratio(o, i, 0.4))
    layer = rnn.PivotedLowRankLinear(i, o, r, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        layer.w.normal_(0, (1.0 / i) ** 0.5)
        layer.perm.copy_(torch.randperm(i, device=device))
    return layer


def _int4_c32_from_linear(linear):
    """int4 (group as int4_g128) plus a rank-32 correction of its error (plain SVD of the residual)."""
    base = rnn.Int4Linear.from_linear(linear, group_size=group_for(linear.in_features))
    return rnn.CorrectedLinear.from_linear(linear, base, min(32, linear.in_features, linear.out_features))


def _int4_c32_random(i, o, bias, dtype, device):
    base = rnn.Int4Linear(i, o, group_size=group_for(i), bias=bias, dtype=dtype, device=device)
    return rnn.CorrectedLinear(base, rnn.LowRankLinear(i, o, min(32, i, o), bias=False, dtype=dtype, device=device))


def _act_order_from_linear(linear):
    """int4 as a GPTQ act-order checkpoint loads (compress/int4_checkpoints.py): the columns in order of
    decreasing norm (act order sorts them by the Hessian's diagonal), quantized in that order, x gathered."""
    w = linear.weight.detach()
    perm = torch.argsort(w.float().norm(dim=0), descending=True)
    inner = rnn.Int4Linear.from_linear(linear_from(w[:, perm], linear.bias), group_size=group_for(w.shape[1]))
    return rnn.PermutedInputLinear(inner, perm)


def _act_order_random(i, o, bias, dtype, device):
    """A random order seeded by in_features: layers reading one input (q / k / v, gate / up) share it, as GPTQ's
    act order makes them share it (one Hessian), so their ``+fused`` variant fuses."""
    inner = rnn.Int4Linear(i, o, group_size=group_for(i), bias=bias, dtype=dtype, device=device)
    perm = torch.randperm(i, generator=torch.Generator(device="cpu").manual_seed(i), device="cpu")
    return rnn.PermutedInputLinear(inner, perm.to(device))


def _vq_d2_random(i, o, bias, dtype, device):
    """GPTVQ's format: a byte a pair of inputs, one 256-pair codebook per layer (random entries, std 0.02)."""
    layer = rnn.LUTLinear(i, o, bits=8, d=2, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        layer.codebooks.normal_(0, 0.02)
    return layer


def _tucker_from_linear(linear):
    """Tucker with each mode's rank half its size (modes: out and in split in two)."""
    from ..nn.tensorized import split_features

    modes = split_features(linear.out_features) + split_features(linear.in_features)
    return rnn.TuckerLinear.from_linear(linear, ranks=tuple(max(1, m // 2) for m in modes), max_iter=5)


def _table():
    """kind -> (needed class names, from_linear builder, random builder(i, o, bias, dtype, device))."""
    block = lambda i, o: min(256, i, o)  # noqa: E731
    return {
        "int8": (["Int8Linear"], lambda l: rnn.Int8Linear.from_linear(l),
                 lambda i, o, b, dt, dev: rnn.Int8Linear(i, o, bias=b, dtype=dt, device=dev)),
        "int4_g128": (["Int4Linear"], lambda l: rnn.Int4Linear.from_linear(l, group_size=group_for(l.in_features)),
                      lambda i, o, b, dt, dev: rnn.Int4Linear(i, o, group_size=group_for(i), bias=b, dtype=dt,
                                                             device=dev)),
        "lowrank_20": (["LowRankLinear"], lambda l: rnn.LowRankLinear.from_linear(l, ratio=0.2),
                       lambda i, o, b, dt, dev: rnn.LowRankLinear(i, o, rank_for(i, o, 0.2), bias=b, dtype=dt,
                                                                  device=dev)),
        "lowrank_40": (["LowRankLinear"], lambda l: rnn.LowRankLinear.from_linear(l, ratio=0.4),
                       lambda i, o, b, dt, dev: rnn.LowRankLinear(i, o, rank_for(i, o, 0.4), bias=b, dtype=dt,
                                                                  device=dev)),
        "lowrank_40_pivoted": (["PivotedLowRankLinear"], lambda l: rnn.PivotedLowRankLinear.from_linear(l, ratio=0.4),
                               _pivoted_random),
        "block_circulant_b256": (["BlockCirculantLinear"],
                                 lambda l: rnn.BlockCirculantLinear.from_linear(
                                     l, block(l.in_features, l.out_features)),
                                 lambda i, o, b, dt, dev: rnn.BlockCirculantLinear(i, o, block(i, o), bias=b, dtype=dt,
                                                                                   device=dev)),
        "lowrank40_int4": (["LowRankLinear", "Int4Linear", "FactoredLinear"], _combo_from_linear, _combo_random),
        "int4_g128_c32": (["Int4Linear", "LowRankLinear", "CorrectedLinear"], _int4_c32_from_linear,
                          _int4_c32_random),
        "int4_g128_act_order": (["Int4Linear", "PermutedInputLinear"], _act_order_from_linear, _act_order_random),
        "circulant": (["CirculantLinear"], lambda l: rnn.CirculantLinear.from_linear(l), None),
        "toeplitz": (["ToeplitzLinear"], lambda l: rnn.ToeplitzLinear.from_linear(l), None),
        "ldr_r2": (["LDRLinear"], lambda l: rnn.LDRLinear.from_linear(l, rank=2), None),
        "lut_log4": (["LUTLinear"], lambda l: rnn.LUTLinear.from_linear(l), None),
        "vq_d2": (["LUTLinear"], lambda l: rnn.LUTLinear.from_linear(l, method="vq", d=2, bits=8, iters=3),
                  _vq_d2_random),
        "cp_r8": (["CPLinear"], lambda l: rnn.CPLinear.from_linear(l, rank=8, max_iter=10), None),
        "tucker_half": (["TuckerLinear"], _tucker_from_linear, None),
    }


DECODE_KINDS = ("int4_g128", "int8", "lowrank_20", "lowrank_40", "block_circulant_b256", "lowrank40_int4",
                "lowrank_40_pivoted", "int4_g128_c32", "vq_d2")  # last: the newest, so a cut-short run loses them first


def available(kinds=None):
    """The kinds whose layer classes exist (in the order given, or all)."""
    table = _table()
    names = kinds or list(table)
    out = []
    for k in names:
        needed = table[k][0]
        if all(_cls(n, "reparam_kernels.nn.factored" if n == "FactoredLinear" else "reparam_kernels.nn")
               for n in needed):
            out.append(k)
    return out


def make(kind, linear):
    return _table()[kind][1](linear)


def make_random(kind, in_features, out_features, bias=False, dtype=torch.float16, device="cuda"):
    build = _table()[kind][2]
    if build is None:
        raise ValueError(f"`kind` {kind!r} has no random builder; use make(kind, linear)")
    layer = build(in_features, out_features, bias, dtype, device)
    randomize_codes_(layer)
    return layer


@torch.no_grad()
def randomize_codes_(module, weight_std=0.02):
    """Fill integer buffers (quantized codes) with random bits, so no kernel sees an all-zero
    weight, and rescale `scales` so the effective weight has std `weight_std` (Hugging Face's
    initializer_range): random codes at scale 1 would overflow fp16 activations within a layer."""
    for sub in module.modules():
        codes = [b for b in sub.buffers(recurse=False) if b.dtype in (torch.uint8, torch.int8)]
        for buf in codes:
            lo, hi = (-128, 128) if buf.dtype == torch.int8 else (0, 256)
            buf.copy_(torch.randint(lo, hi, buf.shape, dtype=buf.dtype, device=buf.device))
        scales = getattr(sub, "scales", None)
        if codes and isinstance(scales, torch.Tensor) and hasattr(sub, "to_dense"):
            std = float(sub.to_dense().float().std())
            if std > 0:
                scales.mul_(weight_std / std)
    return module


def replace_linears(model, kind, skip=("lm_head",), random=True):
    """Swap every nn.Linear of `model` (except names in `skip`) for layer `kind`; returns how many."""
    count = 0
    for name, child in list(model.named_modules()):
        for cname, sub in list(child.named_children()):
            if type(sub) is nn.Linear and cname not in skip:
                w = sub.weight
                new = (make_random(kind, sub.in_features, sub.out_features, sub.bias is not None, w.dtype, w.device)
                       if random else make(kind, sub))
                setattr(child, cname, new)
                count += 1
    return count
