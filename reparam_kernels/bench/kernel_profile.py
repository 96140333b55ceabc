"""Where a step's time goes: torch.profiler's kernels, summed by who wrote them.

Run-3's 4-layer decode (docs/benchmarks.md) leaves ~0.1 ms a decoder layer that is neither the Linears nor
lm_head by subtraction; this measures it instead: per step, the GPU time of this library's kernels, of
inductor's generated ones, of cuBLAS, of attention and of the rest, the kernel count, and the step's wall time
(wall minus the kernels' sum: the gaps between them). On the CPU (no CUDA activity) the operators' own
CPU times stand in for kernels, so the same code runs in the tests.
"""
import time

import torch

# (category, test on the kernel name), first match wins
CATEGORIES = (
    ("reparam", lambda n: "reparam::" in n),  # our CUDA kernels (namespace reparam), or on the CPU our ops
    ("reparam Triton", lambda n: n.startswith("_") and n.endswith("_kernel")),  # reparam_kernels/triton's names
    ("inductor Triton", lambda n: n.startswith("triton_") or "cpp_fused" in n),
    # before cuBLAS: flash's split-KV kernels' names say "splitkv"
    ("attention", lambda n: any(s in n.lower() for s in ("flash", "fmha", "attention", "sdpa"))),
    ("cuBLAS", lambda n: any(s in n.lower() for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk",
                                                      "cublas", "aten::mm", "aten::addmm", "aten::bmm"))),
)


def category(name):
    for cat, test in CATEGORIES:
        if test(name):
            return cat
    return "other"


def _durations(prof, on_gpu):
    """[(name, µs)] of the kernels (GPU) or of the operators' own CPU time (CPU)."""
    out = []
    for e in prof.events():
        if on_gpu:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.time_range.elapsed_us()))
        elif e.device_type == torch.autograd.DeviceType.CPU and "::" in e.name:
            out.append((e.name, e.self_cpu_time_total))
    return out


def profile_steps(step, steps, on_gpu, top=25):
    """Run `step()` `steps` times under torch.profiler; per-step time by category, the top kernels, the wall."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    by_cat, by_name = {}, {}
    for name, us in _durations(prof, on_gpu):
        cat = category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / steps
        total, calls = by_name.get(name, (0.0, 0))
        by_name[name] = (total + us / steps, calls + 1)
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"steps": steps, "source": "CUDA kernels" if on_gpu else "CPU operators (self time)",
            "wall_us_per_step": wall * 1e6 / steps,
            "sum_us_per_step": sum(by_cat.values()),
            "count_per_step": sum(c for _, (_, c) in kernels) / steps,
            "us_per_step": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "category": category(n), "us_per_step": us, "calls_per_step": c / steps}
                    for n, (us, c) in kernels[:top]]}
