"""Calibrating a block whose statistics do not fit at once.

A mixture-of-experts block keeps a float64 Gram matrix [in, in] for every expert Linear it compresses:
DeepSeek-V3's 256 experts hold 256 × (7168² + 2048²) × 8 B ≈ 114 GB a block, more than one GPU. Past a memory
budget the block's experts are calibrated and compressed a chunk of whole experts at a time — one more forward
of the block each — and its other Linears (attention, shared experts) last. The statistics are those of one
pass: an expert's inputs depend on the layers before the experts (compressed last) and on its own up
projection (in its chunk), never on a sibling; the pool its prior leans on (expert_stats.py) is gathered in one
pass before the chunks.
"""
import contextlib
import os

import torch

from .calib import CalibStats
from .experts import UnfusedExperts
from .svd import factor_device


def check_stats_memory(budget):
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"`stats_memory` must be None or a number of bytes > 0, got {budget!r}")


def gram_bytes(block, names):
    """Bytes of the float64 Gram matrices the Linears `names` of `block` would hold (shared ones counted apart)."""
    return sum(8 * block.get_submodule(n).in_features ** 2 for n in names)


def _host_available():
    """The host's available memory in bytes (Linux MemAvailable: free pages plus what the page cache would give
    back; else the free pages), None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device):
    """Half the free memory of `device` (the GPU's, else the host's available RAM; never split where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    free = _host_available()
    return free // 2 if free else 1 << 62


def _expert_of(block):
    """{name of an expert Linear (relative to block): (experts module prefix, expert index)}."""
    out = {}
    for prefix, m in block.named_modules():
        if isinstance(m, UnfusedExperts):
            for e in range(m.num_experts):
                for proj in (m.up_name, "down_proj"):
                    out[f"{prefix}.{e}.{proj}" if prefix else f"{e}.{proj}"] = (prefix, e)
    return out


def chunks(block, names, budget):
    """`names` split into lists to calibrate one after the other: all of them when their statistics fit in
    `budget` bytes; else whole experts (both projections together) up to `budget` a chunk, the rest last."""
    if gram_bytes(block, names) <= budget:
        return [list(names)]
    expert_of = _expert_of(block)
    groups = {}
    for n in names:
        if n in expert_of:
            groups.setdefault(expert_of[n], []).append(n)
    out, cur, size = [], [], 0
    for group in groups.values():
        b = gram_bytes(block, group)
        if cur and size + b > budget:
            out.append(cur)
            cur, size = [], 0
        cur, size = cur + group, size + b
    if cur:
        out.append(cur)
    rest = [n for n in names if n not in expert_of]
    return out + [rest] if rest else out  # (no experts: one chunk, however big)


@contextlib.contextmanager
def collect_pools(block, names):
    """Context: {experts module prefix: CalibStats} summing the inputs of the up projections among `names`
    while active — the pools the experts' prior leans on, without a Gram matrix per expert."""
    pools, handles = {}, []
    for prefix, m in block.named_modules():
        if not isinstance(m, UnfusedExperts):
            continue
        for e in range(m.num_experts):
            name = f"{prefix}.{e}.{m.up_name}" if prefix else f"{e}.{m.up_name}"
            if name not in names:
                continue
            lin = block.get_submodule(name)
            pool = pools.setdefault(prefix, CalibStats(lin.in_features, factor_device(lin.weight)))
            handles.append(lin.register_forward_pre_hook(lambda _m, args, _p=pool: _p.add(args[0])))
    try:
        yield pools
    finally:
        for h in handles:
            h.remove()
