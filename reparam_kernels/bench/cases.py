"""One benchmarked case: check every contender against float64 first, then time it.

A kernel that gives a wrong result is never timed: its case is recorded in the
result file's ``failures`` instead (a fast wrong kernel is the worst benchmark
outcome there is). A peer that fails the check is dropped from the row and
recorded the same way.
"""
import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch

from .results import Results
from .timing import cycling, dtype_name, time_host, time_mode

# Relative error ||out - ref|| / ||ref|| allowed against the float64 reference (fp32 accumulation).
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


class KernelMismatch(AssertionError):
    pass


def relative_error(out, ref64):
    out64 = out.detach().to(torch.float64)
    if out64.shape != ref64.shape:
        raise KernelMismatch(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# Rows of x the float64 reference is computed for (a float64 GEMM at M = 2048 on 28672 x 8192 takes
# ~15 s on the GPU: the whole GPU session's budget matters more than rows 256.. of a check).
CHECK_ROWS = 256


@contextlib.contextmanager
def env_var(name, value):
    """Sets environment variable `name` inside the block and restores what was there (the CUDA ops
    read their path switches per call; a switch the runner exported must survive a peer's toggle)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def with_env(fn, name, value, *more):
    """fn with environment variable `name` set to `value` (and each further name, value pair of
    `more`) around every call: an A/B peer that forces the CUDA path the op would not take."""
    pairs = [(name, value)] + list(zip(more[::2], more[1::2]))
    if len(more) % 2:
        raise ValueError("with_env: names and values come in pairs")

    def run(*args):
        with contextlib.ExitStack() as stack:
            for n, v in pairs:
                stack.enter_context(env_var(n, v))
            return fn(*args)
    return run


def check_rows(x):
    """The rows of x (an [M, K] activation) that the float64 reference covers."""
    return x[:CHECK_ROWS]


def check_against_float64(name, out, ref64, dtype, tol=None):
    """Raise KernelMismatch unless `out` matches the float64 reference within the dtype's tolerance
    (on the reference's rows: it may cover only the first CHECK_ROWS)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    if out.dim() == ref64.dim() == 2 and ref64.shape[0] < out.shape[0]:
        out = out[: ref64.shape[0]]
    err = relative_error(out, ref64)
    if not err <= tol:
        raise KernelMismatch(f"{name}: relative error {err:.3g} > {tol:.1g} against the float64 reference")
    return err


@dataclass
class Contender:
    """fn(*arg_sets[i]) computes the op; several arg sets rotate the operands past the L2.
    arg_sets[0] must be the inputs `reference` was computed from."""
    fn: object
    arg_sets: list = field(default_factory=list)

    def first(self):
        return self.fn(*self.arg_sets[0])

    def timed(self):
        return cycling(self.fn, self.arg_sets)


def run_case(results: Results, *, dtype, M, N, K, params, ours, cublas, reference, peers=None,
             modes=("graph", "eager"), tol=None, tol_cublas=None, **extra):
    """Check then time one case in every mode; add its rows to `results` and return them."""
    case = {"dtype": dtype_name(dtype), "M": M, "N": N, "K": K, "params": dict(params)}
    ref64 = reference()
    try:
        check_against_float64("ours", ours.first(), ref64, dtype, tol)
        # The dense weight cuBLAS runs is the compressed one expanded (U @ V, dequantized...),
        # so the same float64 reference holds for it.
        check_against_float64("cublas", cublas.first(), ref64, dtype, tol_cublas)
    except Exception as exc:  # a mismatch, or a kernel that raised: recorded, never timed
        results.fail(case, _why(exc))
        return []
    good_peers = {}
    for name, peer in (peers or {}).items():
        try:
            check_against_float64(name, peer.first(), ref64, dtype, tol)
            good_peers[name] = peer
        except Exception as exc:  # e.g. a peer that does not take this shape
            results.fail(dict(case, peer=name), _why(exc))
    del ref64
    rows = []
    for mode in modes:
        try:
            ours_us = time_mode(mode, ours.timed())
            cublas_us = time_mode(mode, cublas.timed())
        except Exception as exc:  # e.g. a call that cannot be captured into a CUDA graph
            results.fail(dict(case, mode=mode), f"timing failed: {_why(exc)}")
            continue
        peer_us = {}
        for name, p in good_peers.items():
            try:
                peer_us[name] = time_mode(mode, p.timed())
            except Exception as exc:
                results.fail(dict(case, mode=mode, peer=name), f"timing failed: {_why(exc)}")
        # each contender's enqueue cost beside its eager time (host-bound or not)
        host = (host_times({"ours": ours, "cublas": cublas, **{n: good_peers[n] for n in peer_us}})
                if mode == "eager" else {})
        rows.append(results.add(mode=mode, dtype=case["dtype"], M=M, N=N, K=K, params=case["params"],
                                ours_us=ours_us, cublas_us=cublas_us, peers=peer_us, **extra,
                                **({"host_us": host} if host else {})))
    return rows


def host_times(contenders):
    """{name: µs} of time_host for each contender on a GPU; {} without one. A contender whose host timing fails
    is left out (its eager time stands; this is the explanation beside it, not a measurement of the op)."""
    if not torch.cuda.is_available():
        return {}
    out = {}
    for name, c in contenders.items():
        try:
            out[name] = round(time_host(c.timed()), 2)
        except Exception:  # noqa: BLE001 - e.g. a peer whose switch a smoke run vetoed meanwhile
            continue
    return out


def _why(exc):
    return str(exc) if isinstance(exc, KernelMismatch) else f"{type(exc).__name__}: {str(exc)[:300]}"


def progress(items, desc):
    """A progress bar over `items` (tqdm when installed, else one line per item on stderr)."""
    items = list(items)
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:
        def plain():
            for i, item in enumerate(items):
                print(f"{desc}: {i + 1}/{len(items)} {item}", file=sys.stderr, flush=True)
                yield item
        return plain()


def bench_arg_parser(description):
    """The options every bench script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer shapes and batches (a GPU session is short)")
    p.add_argument("--out", default=None, help="results root (default benchmarks/results, or $REPARAM_BENCH_OUT)")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated, from fp16,bf16")
    p.add_argument("--modes", default="graph,eager", help="comma-separated, from graph,eager")
    return p


def require_cuda(script):
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: no CUDA GPU visible; benchmarks only run on a GPU (nothing written)")
