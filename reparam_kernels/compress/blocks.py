"""Running a model one transformer block at a time on calibration data.

The compression pass (``pipeline.py``) and the rank allocation (``allocate.py``)
both walk the blocks in order: capture what block 0 receives, run block i on
those inputs, hand its outputs to block i+1 — so only one block (with
``device=``) need be on the accelerator at once.
"""
import contextlib
import fnmatch
import re

import torch
from torch import nn

from .calib import collect_inputs
from .expert_stats import ExpertPriors
from .experts import fused_hint


class _Stop(Exception):
    pass


def batches_of(calib, batch_size, model=None):
    """Calibration token ids [n, seq_len] (or a list of [b, seq_len]) → list of batches; with `model`, ids
    outside its vocabulary are refused here rather than as an IndexError from inside its embedding."""
    if calib is None:
        return []
    if isinstance(calib, torch.Tensor):
        if calib.dtype not in (torch.int32, torch.int64) or calib.dim() != 2:
            raise ValueError(f"`calib` must be token ids [n, seq_len] (int64) or a list of them, "
                             f"got {calib.dtype} {tuple(calib.shape)}")
        out = list(calib.split(batch_size))
    else:
        out = list(calib)
        if not out or not all(isinstance(b, torch.Tensor) and b.dim() == 2 and b.dtype in (torch.int32, torch.int64)
                              for b in out):
            raise ValueError("`calib` must be token ids [n, seq_len] or a non-empty list of [b, seq_len] tensors")
    if model is not None:
        check_token_ids(model, out, "calib")
    return out


def check_token_ids(model, batches, what):
    """Raise if any id of `batches` is outside [0, vocabulary) of `model`'s input embedding (when it has one)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:  # transformers raises this where it finds no embedding to return
        return
    vocab = getattr(emb, "num_embeddings", None)
    if not isinstance(vocab, int):
        return
    for b in batches:  # integer ids: batches_of and distill's argument check see to the dtype
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab):
            raise ValueError(f"`{what}`: token ids must lie in [0, {vocab}) (the model's vocabulary), "
                             f"got ids from {int(b.min())} to {int(b.max())}")


def matched_linears_and_batches(model, patterns, calib, batch_size, what):
    """(names of the nn.Linears matched by `patterns` (globs), calibration batches) for the allocation
    functions that write their choice out as a recipe; `what` names the allocation in the error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [expand_blocks(p, model) for p in patterns]
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"`patterns` {patterns} match no nn.Linear of the model{fused_hint(model)}")
    batches = batches_of(calib, batch_size, model)
    if not batches:
        raise ValueError(f"`calib`: {what} needs calibration token ids")
    return names, batches


def find_blocks(model, names, min_len=2):
    """The ModuleList (prefix, list) of at least `min_len` modules holding most of the Linears `names`, or
    (None, [])."""
    best = (None, [], 0)
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= min_len:
            hits = sum(1 for n in names if n.startswith(prefix + "."))
            if hits > best[2]:
                best = (prefix, mod, hits)
    return best[0], best[1]


def linear_names(model):
    """Names of every Linear (or GPT-2 style Conv1D) of `model`."""
    from .recipe import linear_features  # (recipe.py imports this module)

    return [n for n, m in model.named_modules() if linear_features(m)]


BLOCKS = "{blocks}"  # in a recipe's pattern: the name of the model's list of transformer blocks


def expand_blocks(pattern, model, regex=False):
    """`pattern` with "{blocks}" replaced by the name of `model`'s list of transformer blocks — the ModuleList
    holding the most Linears (Llama "model.layers", GPT-2 "transformer.h", OPT "model.decoder.layers", …), so
    one recipe serves every architecture; regex: escaped for a "re:" pattern."""
    if BLOCKS not in pattern:
        return pattern
    prefix, _ = find_blocks(model, linear_names(model), min_len=1)  # a one-block model has a list of one
    if prefix is None:
        raise ValueError(f"`recipe`: pattern {pattern!r} names the model's transformer blocks, but the model has no "
                         f"list of them (an nn.ModuleList of modules holding Linears); name the Linears")
    return pattern.replace(BLOCKS, re.escape(prefix) if regex else prefix)


@torch.no_grad()
def block_inputs(model, block, batches):
    """[(args, kwargs)] that `block` receives for each calibration batch."""
    seen = []

    def hook(_mod, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    dev = home_device(model)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return seen


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def hidden_of(args, kwargs):
    """The hidden state among a block's inputs (the first argument, or the keyword hidden_states)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def run_block(block, inputs):
    """(the inputs of the next block: `block`'s hidden-state outputs with the same other arguments,
    whether `block` returns a tuple led by the hidden state rather than the tensor)."""
    outs = [block(*a, **k) for a, k in inputs]
    astuple = bool(outs) and isinstance(outs[0], (tuple, list))
    return [_with_hidden(a, k, _first_tensor(o)) for (a, k), o in zip(inputs, outs)], astuple


def next_inputs(block, inputs):
    """The inputs of the next block: `block`'s hidden-state outputs with the same other arguments."""
    return run_block(block, inputs)[0]


def home_device(module):
    """The device of `module`'s first parameter (or buffer); None for a module with neither."""
    t = next(module.parameters(), None)
    t = next(module.buffers(), None) if t is None else t
    return None if t is None else t.device


def same_device(a, b):
    """Whether devices `a` and `b` (str or torch.device) name the same device ("cuda" = "cuda:<current>")."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        cur = torch.cuda.current_device()
        return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)
    return a.index == b.index


@contextlib.contextmanager
def on_device(block, device):
    """`block` on `device` for the body of the with, back on its own device after (device None: no move)."""
    home = home_device(block)
    if device is None or home is None:
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


@torch.no_grad()
def visit_layers(model, batches, names, visit, desc, progress=True, device=None, expert_prior=0):
    """visit(name, linear, stats) for each Linear of `names` with its CalibStats on the calibration batches,
    run block by block through the unchanged model (what the global allocations plan from: rank in
    ``allocate.py``, int4 / int8 in ``allocate_bits.py``); Linears outside the blocks (lm_head) come last,
    from a pass of the model itself. device: each block is moved there for its turn (and back), and the
    model without its blocks for the Linears outside them, as ``compress(device=)`` does. expert_prior: 0 (the
    default) visits each layer with its own statistics; else mixture-of-experts experts get theirs shrunk toward a
    prior of that many rows (None: in_features; ``ExpertPriors.for_planning``), as ``compress(expert_prior=)``."""
    from tqdm.auto import tqdm

    prefix, blocks = find_blocks(model, names)
    inner = [n for n in names if blocks and n.startswith(prefix + ".")]
    outer = [n for n in names if n not in set(inner)]
    away = device is not None and not same_device(device, home_device(model))
    if outer and away and not inner:  # only lm_head: the blocks still run on the device to reach it
        prefix, blocks = find_blocks(model, linear_names(model))
    keep_last = bool(outer and away and blocks)  # the head then runs alone on the device, from these outputs
    stop = max((int(n[len(prefix) + 1:].split(".", 1)[0]) for n in inner), default=-1)  # last block with a name
    last = None
    bar = tqdm(total=len(names), desc=desc, unit="layer", disable=not progress)
    try:
        if inner or keep_last:
            inputs = block_inputs(model, blocks[0], batches)
        for i, block in enumerate(blocks if inner or keep_last else []):
            bp = f"{prefix}.{i}."
            local = [n[len(bp):] for n in inner if n.startswith(bp)]
            if device is not None:
                inputs = move(inputs, device)
            with on_device(block, device):
                if local:
                    with collect_inputs({n: block.get_submodule(n) for n in local}, on_weight_device=True) as stats:
                        for a, k in inputs:
                            block(*a, **k)
                    priors = ExpertPriors(block, stats, expert_prior)
                    for n in local:
                        visit(bp + n, block.get_submodule(n), priors.for_planning(n, stats[n]))
                        bar.update(1)
                if i == stop and not keep_last:
                    break
                if i + 1 < len(blocks):
                    inputs = next_inputs(block, inputs)
                else:
                    last = run_block(block, inputs) if keep_last else None
        if outer:
            mods = {n: model.get_submodule(n) for n in outer}
            with outside_inputs(model, mods, batches, blocks, last, device) as stats:
                for n in outer:
                    visit(n, mods[n], stats[n])
                    bar.update(1)
    finally:
        bar.close()


@contextlib.contextmanager
def outside_inputs(model, mods, batches, blocks=None, last=None, device=None):
    """CalibStats {name: stats} of the Linears `mods` {name: module} outside the blocks (e.g. lm_head), from
    the model's own forward on `batches`: given `last` ((the last block's outputs per batch, whether blocks
    return tuples), from ``run_block``), the model without its blocks runs on `device` from those outputs,
    and stays there — `mods` with it — for the body of the with; else the whole model runs where it is."""
    if last is not None:
        from .fisher_blockwise import head_only  # (it imports this module)

        outputs, astuple = last
        with head_only(model, blocks, astuple, device) as stand_in:
            with collect_inputs(mods) as stats, torch.no_grad():
                for ids, (a, k) in zip(batches, outputs):
                    stand_in.value = hidden_of(a, k)
                    model(input_ids=ids.to(device), use_cache=False)
            yield stats  # the hooks are off: the body may replace or run the modules
        return
    dev = home_device(model)
    with collect_inputs(mods) as stats, torch.no_grad():
        for ids in batches:
            model(input_ids=ids.to(dev), use_cache=False)
    yield stats


def move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj
