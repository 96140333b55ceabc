"""Global rank allocation for low-rank compression under one parameter budget.

A uniform ratio gives every layer the same share of parameters, although
layers differ widely in how much output energy their top singular directions
carry. ``allocate_ranks`` instead spends the budget where it buys the most:
with σ_i the whitened singular values of layer ℓ (σ_i² = output energy on the
calibration data along direction i) and E_ℓ = Σσ², keeping direction i costs
(out + in) parameters and removes σ_i²/E_ℓ of that layer's squared relative
output error. Directions are kept greedily by (σ_i²/E_ℓ)/(out + in) until
(1 − ratio) of the matched layers' weights is spent — which minimizes the sum
of the layers' squared relative output errors for that budget. Each layer
keeps at least ``min_rank_frac`` of its full rank and at most the break-even
rank (where factors would outgrow the dense weight).

It returns a recipe with one exact-name rule per layer, to pass to
``compress`` (which then calibrates block by block as usual).
"""
import fnmatch

import torch
from torch import nn

from .calib import collect_inputs
from .pipeline import _batches, _capture_block_inputs, _find_blocks, _first_tensor, _with_hidden
from .svd import FACTOR_DTYPE, _one_thread, whitening_factor


def _whitened_energies(weight, gram, damping=1e-5):
    W = weight.detach().to("cpu", FACTOR_DTYPE)
    with _one_thread():
        if W.shape[0] <= W.shape[1]:
            G = gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
            lam = torch.linalg.eigvalsh(W @ G @ W.t())   # = σ² of W·S
        else:
            S = whitening_factor(gram, damping)
            A = W @ S
            lam = torch.linalg.eigvalsh(A.t() @ A)
    return lam.flip(0).clamp_min(0)


@torch.no_grad()
def allocate_ranks(model, calib, patterns, ratio, min_rank_frac=0.1, batch_size=4, whiten=True, progress=True):
    """Recipe {rules: [...]} giving each Linear matched by `patterns` (globs) a rank, so that the
    matched layers lose `ratio` of their parameters in total (see the module docstring)."""
    from tqdm.auto import tqdm

    if not 0 < ratio < 1:
        raise ValueError(f"`ratio` must satisfy 0 < ratio < 1, got {ratio!r}")
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"`patterns` {patterns} match no nn.Linear of the model")
    batches = _batches(calib, batch_size)
    if not batches:
        raise ValueError("`calib`: global allocation needs calibration token ids")
    prefix, blocks = _find_blocks(model, names)
    if not blocks or any(not n.startswith(prefix + ".") for n in names):
        raise ValueError("`patterns`: allocate_ranks handles Linears inside the transformer blocks only")
    model.eval()
    inputs = _capture_block_inputs(model, blocks[0], batches)
    spectra = {}
    bar = tqdm(total=len(names), desc="allocate", unit="layer", disable=not progress)
    for i, block in enumerate(blocks):
        bp = f"{prefix}.{i}."
        local = [n[len(bp):] for n in names if n.startswith(bp)]
        if local:
            with collect_inputs({n: block.get_submodule(n) for n in local}) as stats:
                for a, k in inputs:
                    block(*a, **k)
            for n in local:
                lin = block.get_submodule(n)
                if whiten:
                    spectra[bp + n] = _whitened_energies(lin.weight, stats[n].gram)
                else:
                    spectra[bp + n] = torch.linalg.svdvals(lin.weight.detach().double()) ** 2
                bar.update(1)
        if i + 1 < len(blocks):  # dense model: statistics of the uncompressed network
            inputs = [_with_hidden(a, k, _first_tensor(block(*a, **k))) for a, k in inputs]
    bar.close()
    mods = dict(model.named_modules())
    budget = (1 - ratio) * sum(mods[n].weight.numel() for n in names)
    ranks, cost, cands = {}, 0.0, []
    for n in names:
        out_f, in_f = mods[n].weight.shape
        full = min(out_f, in_f)
        cap = max(1, min(full, (out_f * in_f) // (out_f + in_f)))
        floor = min(cap, max(1, int(min_rank_frac * full)))
        e = spectra[n]
        total = float(e.sum()) or 1.0
        ranks[n] = floor
        cost += floor * (out_f + in_f)
        cands += [(float(e[j]) / total / (out_f + in_f), n) for j in range(floor, cap)]
    cands.sort(key=lambda c: -c[0])
    for _, n in cands:  # each layer's candidates are in descending σ order, so ranks grow contiguously
        out_f, in_f = mods[n].weight.shape
        if cost + (out_f + in_f) > budget:
            continue
        ranks[n] += 1
        cost += out_f + in_f
    rules = [{"match": n, "method": "lowrank", "rank": ranks[n], "whiten": whiten} for n in names]
    return {"name": f"lowrank-global-{ratio}", "rules": rules}
