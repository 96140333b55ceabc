"""Helpers every ``bench_*.py`` uses (the logic lives in ``reparam_kernels.bench``
so that ``python -m reparam_kernels bench`` shares it).

A bench script, in short::

    from common import *                       # run as `python benchmarks/bench_x.py`
    args = bench_arg_parser("...").parse_args(); require_cuda(__file__)
    res = Results("my_op", root=args.out)
    for (N, K), M in ...:                      # shapes_and_batches(args.quick)
        run_case(res, dtype=..., M=M, N=N, K=K, params={...},
                 ours=Contender(my_op, sets), cublas=Contender(F.linear, dense_sets),
                 peers={"name": Contender(...)}, reference=lambda: float64 result of sets[0],
                 bytes=..., flops=...)
    res.ceilings = measure_ceilings(); print(res.write())

See reparam_kernels/bench/{timing,results,cases}.py for the details.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for reparam_kernels

from reparam_kernels.bench.cases import (TOLERANCE, Contender, KernelMismatch, bench_arg_parser,  # noqa: E402,F401
                                         check_against_float64, check_rows, env_var, progress, relative_error,
                                         require_cuda, run_case, with_env)
from reparam_kernels.bench.results import (Results, environment, gpu_slug, load, make_row,  # noqa: E402,F401
                                           render_files, render_markdown, validate)
from reparam_kernels.bench.timing import (BATCHES, DTYPES, L2_BYTES, QUICK_BATCHES, QUICK_SHAPES,  # noqa: E402,F401
                                          SHAPES, cycling, dtype_name, measure_ceilings, measure_copy_tbps,
                                          measure_gemm_tflops, nbytes, rotation_count, shapes_and_batches,
                                          time_eager, time_graph, time_mode)
