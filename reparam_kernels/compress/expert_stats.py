"""Calibration statistics of mixture-of-experts experts, which the router feeds unevenly.

An expert sees only the tokens routed to it. With few of them its XᵀX is noisy and rank-deficient, and the
quantizers fit the noise (GPTQ pushes its error into directions the few rows never take; the weighted grids
read each input's energy off a few samples). So for them each expert's statistics are shrunk toward a prior
worth `tokens` rows (default: its in_features) — with n rows of its own, XᵀX/n becomes
(XᵀX + tokens·P) / (n + tokens), P the prior's XᵀX per row: many rows outweigh the prior, few lean on it. Measured at ~64 tokens an expert (docs/compression.md § few calibration tokens an expert): int4
GPTQ +27.9% → +16.3% perplexity, int4 weighted grid +16.8% → +9.6%. Whitened low rank does not use it
(``pipeline.py``, ``allocate.py``): measured worse there, both to factor and to allocate ranks.

* up projection (gate_up_proj / up_proj): the prior is the pooled inputs of the block's experts (those being
  compressed, or planned), the same hidden states routed elsewhere; an expert no token reached takes the pool
  itself (report.pooled).
* down projection: its inputs are its own activations, which no sibling sees, so there is no pool to borrow;
  the prior is its own inputs' diagonal (each channel's energy, no correlations) — a per-channel damping of
  the correlations few rows estimate. An expert no token reached stays data-free (report.uncalibrated).
"""
from .calib import CalibStats
from .experts import UnfusedExperts


def check_expert_prior(tokens):
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise ValueError(f"`expert_prior` must be None or a number of rows ≥ 0, got {tokens!r}")


def _blend(own, prior_gram, prior_abs, prior_count, tokens):
    """CalibStats of `own` plus `tokens` rows shaped like the prior (its sums scaled to `tokens` rows)."""
    w = tokens / prior_count
    out = CalibStats(own.in_features, own.gram.device)
    out.gram = own.gram + w * prior_gram
    out.abs_sum = own.abs_sum + w * prior_abs
    out.count = own.count + tokens
    return out


def _pool(stats_list):
    first = stats_list[0]
    pool = CalibStats(first.in_features, first.gram.device)
    for st in stats_list:
        pool.gram += st.gram
        pool.abs_sum += st.abs_sum
        pool.count += st.count
    return pool


def _projections(root):
    """(prefix, UnfusedExperts module, projection name) for each projection of each experts module under root."""
    for prefix, m in root.named_modules():
        if isinstance(m, UnfusedExperts):
            for proj in (m.up_name, "down_proj"):
                yield prefix, m, proj


def expert_layer_names(root):
    """The names (relative to root) of every expert Linear under `root`."""
    return {f"{prefix}.{e}.{proj}" if prefix else f"{e}.{proj}"
            for prefix, m, proj in _projections(root) for e in range(m.num_experts)}


class ExpertPriors:
    """The statistics to calibrate each expert projection under `root` with (names as in `stats`), built when
    asked — one [in, in] copy at a time, as a block of 128 experts already holds 128 Gram matrices; only the
    pools are kept. tokens: the prior's weight in rows (None: in_features; 0: no shrinking, only the pool for
    unreached up projections). pools: {experts module prefix: CalibStats} gathered beforehand
    (stat_chunks.collect_pools), where `stats` holds only some of the experts; else pooled from `stats`."""

    def __init__(self, root, stats, tokens=None, pools=None):
        check_expert_prior(tokens)
        self._stats, self._tokens, self._pool = stats, tokens, {}  # name → its pool (up) or None (down)
        for prefix, m, proj in _projections(root):
            names = [n for e in range(m.num_experts) if (n := f"{prefix}.{e}.{proj}" if prefix else f"{e}.{proj}") in stats]
            if proj != m.up_name:
                pool = None
            elif pools is not None:
                pool = pools.get(prefix)
                pool = pool if pool is not None and pool.count else None
            else:
                seen = list({id(stats[n]): stats[n] for n in names if stats[n].count}.values())  # shared: once
                pool = _pool(seen) if seen else None
            self._pool.update({n: pool for n in names})

    def _weight(self, own):
        return own.in_features if self._tokens is None else self._tokens

    def __contains__(self, name):
        if name not in self._pool:
            return False
        own = self._stats[name]
        return self._pool[name] is not None if own.count == 0 else self._weight(own) > 0

    def get(self, name, default=None):
        """The shrunk statistics; the pool itself for an up projection no token reached; `default` for a down
        projection no token reached, a layer that is no expert, or with tokens=0 an expert that was reached."""
        if name not in self:
            return default
        own, pool, k = self._stats[name], self._pool[name], self._weight(self._stats[name])
        if own.count == 0:
            return pool
        if pool is not None:
            return _blend(own, pool.gram, pool.abs_sum, pool.count, k)
        return _blend(own, own.gram.diagonal().diag(), own.abs_sum, own.count, k)

    def for_planning(self, name, default=None):
        """For the plans made before compressing (``mean_bits``; not the rank allocation): a reached expert's
        shrunk statistics — those its quantizer will be built on — scaled back to its own row count, so its
        weight in a sum over all layers stays the tokens the router sent it. `default` for an unreached expert (the plans
        give it its rule's uniform share) and for what `get` gives `default`."""
        own = self._stats.get(name)
        st = self.get(name) if own is not None and own.count else None
        if st is None:
            return default
        scaled = CalibStats(st.in_features, st.gram.device)
        scaled.gram, scaled.abs_sum, scaled.count = st.gram * (own.count / st.count), st.abs_sum * (own.count / st.count), own.count
        return scaled
