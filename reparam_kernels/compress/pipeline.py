"""compress(model, recipe, calib): the whole-model compression pass.

Calibration runs block by block (transformer blocks = the longest
``nn.ModuleList`` holding matched Linears): the inputs of block 0 are captured
once; then for each block, forward hooks gather each matched Linear's input
statistics (XᵀX, |x| means) on the block's calibration inputs, its Linears are
compressed, and the calibration data runs through the *compressed* block to
give the next block's inputs — so later blocks are compressed against the
errors of earlier ones, and only one block need be on the accelerator
(``device=``) at a time. Linears outside the blocks (e.g. ``lm_head``) are
handled last, with statistics from a full forward pass.
"""
import copy
import time
import warnings

import torch

from . import svd as _svd
from .allocate import LOWRANK_METHODS, resolve_global
from .allocate_bits import resolve_bits
from .blocks import (batches_of, block_inputs, find_blocks, home_device, linear_names, move, next_inputs, on_device,
                     outside_inputs, run_block, same_device)
from .calib import collect_inputs, random_tokens
from .expert_stats import ExpertPriors, check_expert_prior, expert_layer_names
from .experts import fuse_dense_experts, fused_experts_names, group_experts, unfuse_experts
from .fisher import channel_weights, output_fisher
from .methods import get_method, uses_more_than_energy
from .recipe import conv1d_as_linear, is_conv1d, parse_recipe, plan
from .report import CompressionReport, LayerReport, state_bytes
from .sharing_copy import copy_sharing, unshare
from .stat_chunks import check_stats_memory, chunks, collect_pools, default_budget
from .svd import factor_device


def _set_module(root, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _with_fisher(st, fisher):
    """The layer's CalibStats `st`; with its Fisher `fisher` [out], a shallow copy carrying `out_weight`
    (q/k/v share one CalibStats but each has its own output channels)."""
    if st is None or fisher is None:
        return st
    st = copy.copy(st)
    st.out_weight = channel_weights(fisher)
    return st


_DATA_FREE = {"whiten": False, "fisher": False, "gptq": False, "weighted_grid": False}


def _without_calibration(rule):
    """The rule's settings for a layer no calibration token reached (a mixture-of-experts expert the router
    never chose): its data-free form (plain SVD, round to nearest)."""
    keys = get_method(rule.method).keys
    return {**rule.settings, **{k: v for k, v in _DATA_FREE.items() if k in keys}}


def _with_pooled_stats(rule):
    """The rule's settings for an unreached expert's up projection on pooled statistics: all of them but the
    Fisher weights (no gradient reached the layer)."""
    keys = get_method(rule.method).keys
    return {**rule.settings, **({"fisher": False} if "fisher" in keys else {})}


def _warn_few_tokens(names, report, expert_prior):
    if names:
        rows = sorted(l.calib_rows for l in report.layers if l.name in set(names))
        lean = ("and expert_prior=0 gives them no prior to lean on" if expert_prior == 0 else
                "so GPTQ and the quantizers' grids lean on a prior (compress(expert_prior=), docs/compression.md)")
        warnings.warn(f"compress: {len(names)} expert layer(s) ({', '.join(names[:3])}{' …' if len(names) > 3 else ''}) "
                      f"saw fewer calibration tokens than their input width (from {rows[0]} to {rows[-1]}): too few for "
                      f"statistics of their own, {lean}; pass more calibration text (report.few_tokens lists them)",
                      stacklevel=5)  # the caller of compress


def _warn_uncalibrated(names):
    if names:
        warnings.warn(f"compress: no calibration token reached {len(names)} layer(s) ({', '.join(names[:3])}"
                      f"{' …' if len(names) > 3 else ''}: experts the router never chose?); they are compressed "
                      "without calibration statistics (plain SVD, round to nearest; an expert's up projection "
                      "takes its sibling experts' inputs instead: report.pooled). Pass more calibration text "
                      "to calibrate them (report.uncalibrated lists them)", stacklevel=5)  # the caller of compress


@torch.no_grad()
def _compress_layers(root, names, plan_, stats, report, bar, prefix="", fisher=None, expert_prior=None, pools=None):
    experts = ExpertPriors(root, stats, expert_prior, pools) if stats else {}  # experts' statistics, shrunk
    expert_names = expert_layer_names(root) if stats else set()
    for name in names:
        full = prefix + name
        rule = plan_[full]
        lin = root.get_submodule(name)
        t0 = time.perf_counter()
        own = stats.get(name) if stats else None  # the inputs the layer saw (the output error is measured on them)
        rows = None if own is None else own.count
        # whitened low rank keeps a reached expert's own rows: measured worse leaning on the prior (tiny model:
        # held-out error up at every token count; upcycled SmolLM2 +175% → +193%), where GPTQ and the grids gain
        st = own if rows and rule.method in LOWRANK_METHODS else experts.get(name, own)
        settings = rule.settings
        if name in expert_names and 0 < rows < lin.in_features and uses_more_than_energy(rule):
            report.few_tokens.append(full)
        if own is not None and own.count == 0 and name in experts:  # an unreached expert's up projection
            own, settings = st, _with_pooled_stats(rule)
            report.pooled.append(full)
        elif own is not None and own.count == 0:  # no calibration token reached it (an expert none was routed to)
            own = st = None
            settings = _without_calibration(rule)
            report.uncalibrated.append(full)
        else:
            st = _with_fisher(st, fisher.get(full) if fisher else None)
        new = get_method(rule.method).build(lin, settings, st)
        new._reparam_method = rule.method  # marks it for distill() and save_compressed()
        new._reparam_settings = dict(settings)  # what it was built with (data-free where uncalibrated)
        _set_module(root, name, new)
        W = lin.weight.detach()
        approx = new.to_dense().detach()
        n_b, b_b = state_bytes(lin)
        n_a, b_a = state_bytes(new)
        report.layers.append(LayerReport(
            full, rule.method, dict(settings), tuple(W.shape), n_b, n_a, b_b, b_a,
            _svd.weight_error(W, approx),
            _svd.output_error(W, approx, own.gram) if own is not None and own.count else None,
            time.perf_counter() - t0, state_bytes(new, float_bytes=2)[1], rows))
        bar.set_postfix_str(f"{full}: {rule.method}")
        bar.update(1)


def _run(block, inputs):
    for args, kwargs in inputs:
        block(*args, **kwargs)


def _calibrate_block(block, names, inputs, plan_, report, bar, prefix, fisher, expert_prior, stats_memory):
    """Gather the statistics of the block's Linears `names` on its calibration inputs and compress them — in
    chunks of whole experts, the rest last, where the statistics would pass `stats_memory` bytes
    (``stat_chunks``; default half the free memory where they are kept)."""
    first = next(block.parameters(), None)
    device = factor_device(first.detach()) if first is not None else torch.device("cpu")
    parts = chunks(block, names, stats_memory if stats_memory is not None else default_budget(device))
    pools = None
    if len(parts) > 1:
        with collect_pools(block, names) as pools:
            _run(block, inputs)
    for part in parts:
        with collect_inputs({n: block.get_submodule(n) for n in part}, on_weight_device=True) as stats:
            _run(block, inputs)
        _compress_layers(block, part, plan_, stats, report, bar, prefix, fisher, expert_prior, pools)


def _weights_and_ranks(model, plan_, batches, progress, device=None, expert_prior=None):
    """One Fisher pass for every layer that needs it (rules with fisher=true, global rank allocation,
    mean_bits), then the global rank allocation and mean_bits' int4 / int8 choice; returns (plan, fisher)."""
    want = [n for n, r in plan_.items() if r.settings.get("fisher") or r.settings.get("mean_bits") is not None]
    fisher = output_fisher(model, batches, want, progress, device) if want and batches else None
    plan_, _ = resolve_global(model, plan_, batches, progress, fisher, device)  # experts: their own rows
    plan_ = resolve_bits(model, plan_, batches, progress, fisher, device, expert_prior)
    return plan_, fisher


def _compress_outside(model, names, plan_, batches, report, bar, fisher, device, blocks, last):
    """The Linears the block loop left (outside the transformer blocks, e.g. lm_head; or all of them without
    calibration data), with statistics from a forward pass of the model with its compressed blocks: given
    `last` (the blocks' outputs and format from run_block, kept when the blocks ran on a `device` away from
    the model), the head alone on `device`; else a whole-model forward where the model is."""
    if not batches:
        _compress_layers(model, names, plan_, None, report, bar, "", fisher)
        return
    mods = {n: model.get_submodule(n) for n in names}
    with outside_inputs(model, mods, batches, blocks, last, device) as stats:  # on `device` given `last`
        _compress_layers(model, names, plan_, stats, report, bar, "", fisher)  # (back with the model after)


def warn_weights_no_method_takes(model, share=0.1):
    """Warn when `share` or more of the model's weights sit in tensors of 3+ dimensions (after the fused experts
    transformers marks as such were split per expert, experts.py): no recipe reaches them, so a recipe that
    looks like "the whole model" leaves most of it dense."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    big = {n: p for n, p in params.items() if p.dim() >= 3 and p.is_floating_point()}
    held = sum(p.numel() for p in big.values())
    if total and held >= share * total:
        name, shape = next(iter(big)), tuple(next(iter(big.values())).shape)
        warnings.warn(f"compress: {held / total:.0%} of the model's weights are in {len(big)} tensors of 3+ dimensions "
                      f"(e.g. {name} {list(shape)}; mixture-of-experts weights not in transformers' experts form), not "
                      "Linears; no method compresses them, so they stay dense", stacklevel=5)  # the caller of compress


def warn_random_calib(plan_):
    """calib='random' is for the quantizers' input energies; say so when a rule wants more from it."""
    patterns = sorted({r.pattern for r in plan_.values() if uses_more_than_energy(r)})
    if patterns:
        warnings.warn(f"calib='random': rule(s) {', '.join(map(repr, patterns))} use statistics beyond each input's "
                      "energy (whitened SVD, GPTQ or Fisher weights), which random tokens mislead — on SmolLM2 the "
                      "default recipe gives +200% perplexity instead of +15% on text, GPTQ int4 +11% instead of +3%. "
                      "Pass real text as calib, or use them without (whiten=false, gptq=false, fisher=false).",
                      stacklevel=5)  # the caller of compress (under its two decorators)


@torch.no_grad()
@_svd.full_precision_matmuls()
def compress(model, recipe, calib=None, inplace=False, batch_size=4, device=None, progress=True, expert_prior=None,
             stats_memory=None):
    """Compress the Linears of `model` that `recipe` matches; returns (model, CompressionReport).

    recipe: dict / list of rules / YAML or JSON path (see ``reparam_kernels.compress.recipe``).
    calib: token ids [n, seq_len] (or a list of [b, seq_len] batches) for calibration, or None
      (then only data-free methods are allowed and output errors are not measured), or "random":
      16 × 512 random token ids (``calib.random_tokens``: the statistics of int4 ``weighted_grid``, no data).
    inplace: False (default) compresses a copy and never modifies `model`; the copy shares the weights of
      the Linears it replaces with `model` while it reads them (no second copy of a big model's weights),
      and those it keeps dense get their own at the end (``sharing_copy``).
    device: if given, each transformer block is moved there while it is calibrated and compressed, and the
      passes that plan before (Fisher weights, global rank allocation, mean_bits) run there a block at a time.
    expert_prior: how many rows of prior the calibration statistics of a mixture-of-experts expert get where a
      quantizer reads them (GPTQ, the weighted grids, mean_bits; the block's pooled inputs for its up projection,
      its own channel energies for its down projection; ``expert_stats``): None (default) its in_features, 0 none
      — then an expert's statistics are only the tokens routed to it, as whitened low rank always takes them.
    stats_memory: bytes one block's calibration statistics may take (float64 XᵀX per Linear; a mixture-of-experts
      block holds one per expert): past it the block's experts are calibrated a chunk at a time, one more forward
      of the block each, with the same statistics (``stat_chunks``). None (default): half the free memory of the
      device they are kept on.
    """
    from tqdm.auto import tqdm

    from ..nn.fused import refuse_fused

    t_start = time.perf_counter()
    refuse_fused(model, "compress")
    check_expert_prior(expert_prior)
    check_stats_memory(stats_memory)
    random_calib = False
    if isinstance(calib, str):
        if calib != "random":
            raise ValueError(f"`calib` must be token ids, a list of them, None or 'random', got {calib!r}")
        calib = random_tokens(model)
        random_calib = True
    batches = batches_of(calib, batch_size, model)
    original = None
    fused = fused_experts_names(model)
    if fused:  # per-expert Linears (experts.py), so rules reach them; an inplace model stays unfused after an error
        if not inplace:
            original, model = model, copy_sharing(model, fused + linear_names(model))  # what stays dense is unshared at the end
        unfuse_experts(model, fused)
    plan_ = plan(model, recipe, has_calib=bool(batches))  # validates before any weight changes
    if random_calib:
        warn_random_calib(plan_)
    warn_weights_no_method_takes(model)
    if not inplace and original is None:
        original, model = model, copy_sharing(model, plan_)  # the replaced Linears' weights are not copied
    # GPT-2 style Conv1D → the equivalent nn.Linear, so every method sees a Linear; the ones that stay
    # dense (a global allocation's choice) get their Conv1D back at the end, so the model's state dict
    # keeps its layout for those ([in, out]) and a skeleton of the original architecture still loads it.
    conv1d = {n: model.get_submodule(n) for n in plan_ if is_conv1d(model.get_submodule(n))}
    for name, conv in conv1d.items():
        _set_module(model, name, conv1d_as_linear(conv))
    report = CompressionReport()
    bar = tqdm(total=len(plan_), desc="compress", unit="layer", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        planned = set(plan_)
        plan_, fisher = _weights_and_ranks(model, plan_, batches, progress, device, expert_prior)
        for name in planned - plan_.keys():  # layers a global allocation keeps dense: in the totals too
            lin = model.get_submodule(name)
            n, b = state_bytes(lin)
            report.layers.append(LayerReport(name, "skip", {"reason": "allocate: global kept it dense"},
                                             tuple(lin.weight.shape), n, n, b, b, 0.0, 0.0,
                                             bytes_after_16bit=state_bytes(lin, float_bytes=2)[1]))
        bar.reset(total=len(plan_))
        prefix, blocks = find_blocks(model, plan_)
        done = set()
        away = device is not None and not same_device(device, home_device(model))
        if away and not blocks:  # only Linears after the blocks (lm_head): the blocks still run on the device
            prefix, blocks = find_blocks(model, linear_names(model))
        # the model kept off `device` with Linears after the blocks: keep the last block's outputs (and their
        # format) for those Linears' statistics, so that the head runs alone on the device
        keep_last = away and any(not n.startswith(f"{prefix}.") for n in plan_)
        last = None
        if blocks and batches:
            inputs = block_inputs(model, blocks[0], batches)
            for i, block in enumerate(blocks):
                bprefix = f"{prefix}.{i}."
                names = [n[len(bprefix):] for n in plan_ if n.startswith(bprefix)]
                if device is not None:
                    inputs = move(inputs, device)
                with on_device(block, device):  # the compressed layers go back with the block
                    if names:
                        _calibrate_block(block, names, inputs, plan_, report, bar, bprefix, fisher, expert_prior,
                                         stats_memory)
                        done.update(bprefix + n for n in names)
                    if i + 1 < len(blocks):  # next block's inputs come from the compressed block
                        inputs = next_inputs(block, inputs)
                    elif keep_last:
                        last = run_block(block, inputs)
        rest = [n for n in plan_ if n not in done]  # outside the blocks, or all of them without calibration data
        if rest:
            _compress_outside(model, rest, plan_, batches, report, bar, fisher, device, blocks, last)
    finally:
        bar.close()
        for name, conv in conv1d.items():  # kept dense (or not reached): the original Conv1D again
            if type(model.get_submodule(name)) is torch.nn.Linear:
                _set_module(model, name, conv)
        model.train(was_training)
    fuse_dense_experts(model)  # experts no rule reached: the original module again (its own fast forward)
    if original is not None:
        unshare(model, original)  # what stayed dense gets its own copy now
    group_experts(model)  # quantized experts: one grouped kernel a projection (experts.py)
    _warn_uncalibrated(report.uncalibrated)
    _warn_few_tokens(report.few_tokens, report, expert_prior)
    report.seconds = time.perf_counter() - t_start
    model.reparam_recipe = list(getattr(model, "reparam_recipe", [])) + [r.to_dict() for r in parse_recipe(recipe)]
    return model, report
