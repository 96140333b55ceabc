"""The copy that ``compress(inplace=False)`` works on, without copying the weights it replaces.

A deep copy of an 8B model doubles its memory (16 GB more in bf16), yet almost all of it is the
Linears that compression reads once and replaces. So the copy's Linears matched by the recipe get
new Parameter objects over the original's storage (reading them costs nothing; moving the copy's
block to a GPU sets the new Parameter's data and leaves the original's alone), everything else is
deep-copied, and at the end ``unshare`` clones whatever still shares storage with the original (the
Linears a global allocation kept dense), so that training the result never writes into `model`.
Nothing in ``compress`` writes into a weight in place.
"""
import copy

from torch import nn


def copy_sharing(model, names):
    """Deep copy of `model` whose modules `names` hold new Parameters over the original's storage."""
    memo = {}
    for name in names:
        for p in model.get_submodule(name).parameters(recurse=False):
            memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _storages(model):
    return {t.untyped_storage().data_ptr() for t in model.parameters() if t.numel()}


def unshare(result, original):
    """Clone every parameter of `result` that still shares storage with `original` (ties kept)."""
    theirs = _storages(original)
    clones = {}
    for mod in result.modules():
        for name, p in mod._parameters.items():
            if p is None or not p.numel() or p.untyped_storage().data_ptr() not in theirs:
                continue
            if id(p) not in clones:
                clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            mod._parameters[name] = clones[id(p)]
    return result


def shares_storage(a, b):
    """Whether modules `a` and `b` have a parameter storage in common (for tests)."""
    return bool(_storages(a) & _storages(b))
