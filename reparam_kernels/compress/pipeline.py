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

import torch
from torch import nn

from . import svd as _svd
from .calib import collect_inputs
from .methods import get_method
from .recipe import parse_recipe, plan
from .report import CompressionReport, LayerReport, state_bytes


class _Stop(Exception):
    pass


def _batches(calib, batch_size):
    if calib is None:
        return []
    if isinstance(calib, torch.Tensor):
        if calib.dtype not in (torch.int32, torch.int64) or calib.dim() != 2:
            raise ValueError(f"`calib` must be token ids [n, seq_len] (int64) or a list of them, "
                             f"got {calib.dtype} {tuple(calib.shape)}")
        return list(calib.split(batch_size))
    out = list(calib)
    if not out or not all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in out):
        raise ValueError("`calib` must be token ids [n, seq_len] or a non-empty list of [b, seq_len] tensors")
    return out


def _find_blocks(model, names):
    """The ModuleList (prefix, list) holding most of the matched Linears, or (None, [])."""
    best = (None, [], 0)
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            hits = sum(1 for n in names if n.startswith(prefix + "."))
            if hits > best[2]:
                best = (prefix, mod, hits)
    return best[0], best[1]


def _set_module(root, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _capture_block_inputs(model, block, batches):
    """[(args, kwargs)] that `block` receives for each calibration batch."""
    seen = []

    def hook(_mod, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return seen


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def _compress_layers(root, names, plan_, stats, report, bar, prefix=""):
    for name in names:
        full = prefix + name
        rule = plan_[full]
        lin = root.get_submodule(name)
        t0 = time.perf_counter()
        st = stats.get(name) if stats else None
        new = get_method(rule.method).build(lin, rule.settings, st)
        new._reparam_method = rule.method  # marks it for distill() and save_compressed()
        new._reparam_settings = dict(rule.settings)
        _set_module(root, name, new)
        W = lin.weight.detach()
        approx = new.to_dense().detach()
        n_b, b_b = state_bytes(lin)
        n_a, b_a = state_bytes(new)
        report.layers.append(LayerReport(
            full, rule.method, dict(rule.settings), tuple(W.shape), n_b, n_a, b_b, b_a,
            _svd.weight_error(W, approx),
            _svd.output_error(W, approx, st.gram) if st is not None and st.count else None,
            time.perf_counter() - t0))
        bar.set_postfix_str(f"{full}: {rule.method}")
        bar.update(1)


@torch.no_grad()
def compress(model, recipe, calib=None, inplace=False, batch_size=4, device=None, progress=True):
    """Compress the Linears of `model` that `recipe` matches; returns (model, CompressionReport).

    recipe: dict / list of rules / YAML or JSON path (see ``reparam_kernels.compress.recipe``).
    calib: token ids [n, seq_len] (or a list of [b, seq_len] batches) for calibration, or None
      (then only data-free methods are allowed and output errors are not measured).
    inplace: False (default) compresses a deep copy and never modifies `model`.
    device: if given, each transformer block is moved there while it is calibrated and compressed.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    batches = _batches(calib, batch_size)
    plan_ = plan(model, recipe, has_calib=bool(batches))  # validates before anything changes
    if not inplace:
        model = copy.deepcopy(model)
    report = CompressionReport()
    bar = tqdm(total=len(plan_), desc="compress", unit="layer", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        prefix, blocks = _find_blocks(model, plan_)
        done = set()
        if blocks and batches:
            inputs = _capture_block_inputs(model, blocks[0], batches)
            for i, block in enumerate(blocks):
                bprefix = f"{prefix}.{i}."
                names = [n[len(bprefix):] for n in plan_ if n.startswith(bprefix)]
                home = next(block.parameters()).device
                if device is not None:
                    block.to(device)
                    inputs = _move(inputs, device)
                if names:
                    with collect_inputs({n: block.get_submodule(n) for n in names}) as stats:
                        for args, kwargs in inputs:
                            block(*args, **kwargs)
                    _compress_layers(block, names, plan_, stats, report, bar, bprefix)
                    done.update(bprefix + n for n in names)
                if i + 1 < len(blocks):  # next block's inputs come from the compressed block
                    inputs = [_with_hidden(a, k, _first_tensor(block(*a, **k))) for a, k in inputs]
                if device is not None:
                    block.to(home)
        rest = [n for n in plan_ if n not in done]
        if rest:
            stats = None
            if batches:
                dev = next(model.parameters()).device
                with torch.no_grad(), collect_inputs({n: model.get_submodule(n) for n in rest}) as stats:
                    for ids in batches:
                        model(input_ids=ids.to(dev), use_cache=False)
            _compress_layers(model, rest, plan_, stats, report, bar)
    finally:
        bar.close()
        model.train(was_training)
    report.seconds = time.perf_counter() - t_start
    model.reparam_recipe = list(getattr(model, "reparam_recipe", [])) + [r.to_dict() for r in parse_recipe(recipe)]
    return model, report
