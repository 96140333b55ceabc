"""Benchmark support shared by ``benchmarks/bench_*.py`` and ``python -m reparam_kernels bench``.

``timing``: kernel-only (CUDA graph) and eager timing, buffer rotation past the L2,
the measured ceilings (copy bandwidth, bf16 GEMM). ``results``: the per-op JSON
files of DESIGN.md and the markdown table made from them. ``cases``: one
benchmarked case = correctness guard against float64, then timing.
"""
