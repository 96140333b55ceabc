"""Host (Python) time each compressed layer spends per eager call before its kernel is entered.

    python benchmarks/host_overhead.py [--shape 4096x4096] [--out FILE]

A decode kernel runs for a few µs; in eager PyTorch the CPU must issue it at least as fast, or the GPU
waits (Hugging Face ``generate`` without compile is eager). This times, on the CPU, each layer's forward
with every ``torch.ops.reparam`` op replaced by a stub that returns a preallocated output: what is left
is the wrapper's own work (argument checks, autocast, backend choice) plus ``nn.Module`` call overhead.
The stub's own cost is timed alone and subtracted.

``dispatch_us``: the rest of the way in, measured separately on a small layer of the same kind:
``_dispatch.call`` (backend choice, gradient test, the dispatcher) down to a CPU kernel that only
returns a preallocated output (registered over the reference for the measurement). That kernel is a
Python function, so this includes a Python call that a GPU's C++ kernel does not make. Not included
anywhere: the C++ checks and the launch (GPU build only). ``torch.ops.aten.linear`` on tiny CPU tensors
is shown as a yardstick for this machine.

Writes ``benchmarks/results/cpu/host_overhead.json`` (medians of repeats, µs per call).
"""
import argparse
import os
import platform
import statistics
import sys
import timeit
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reparam_kernels import _dispatch  # noqa: E402
from reparam_kernels.bench import variants  # noqa: E402
from reparam_kernels.bench.results import write_json  # noqa: E402

KINDS = ("int8", "int4_g128", "lowrank_40", "lowrank_40_pivoted", "block_circulant_b256", "lowrank40_int4")
# how each op's output width follows from its arguments (args as the op receives them)
OUT_FEATURES = {
    "lowrank_linear": lambda a: a[1].shape[0],
    "pivoted_lowrank_linear": lambda a: a[1].shape[0],
    "int8_linear": lambda a: a[1].shape[0],
    "int4_linear": lambda a: a[1].shape[0],
    "lut_linear": lambda a: a[1].shape[0],
    "vq_linear": lambda a: a[1].shape[0],
    "block_circulant_linear": lambda a: a[3],
    "toeplitz_linear": lambda a: a[3],
    "block_circulant_cols_linear": lambda a: a[2],
}


def empty_output(name, args):
    """An uninitialized output of op `name` for these arguments (what a stub or trivial kernel returns)."""
    x = args[0]
    return x.new_empty((*x.shape[:-1], OUT_FEATURES[name](args)))


class StubbedOps:
    """Replace torch.ops.reparam.<op> by stubs returning preallocated outputs; restore on exit."""

    def __init__(self):
        self.calls = []  # (op name, stub, args) of the last forward, to time the stubs alone
        self.saved = {}

    def _stub(self, name):
        outs = {}

        def stub(*args):
            out = outs.get(args[0].shape)
            if out is None:
                out = outs[args[0].shape] = empty_output(name, args)
            self.calls.append((name, stub, args))
            return out
        return stub

    def __enter__(self):
        ns = torch.ops.reparam
        for name in _dispatch.REGISTRY:
            self.saved[name] = getattr(ns, name)
            setattr(ns, name, self._stub(name))
        return self

    def __exit__(self, *exc):
        for name, op in self.saved.items():
            setattr(torch.ops.reparam, name, op)
        return False


def median_us(fn, number, repeat):
    return 1e6 * statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number


def measure(kind, in_features, out_features, number, repeat):
    layer = variants.make_random(kind, in_features, out_features, bias=True, dtype=torch.float16, device="cpu")
    x = torch.randn(1, in_features, dtype=torch.float16)
    with torch.no_grad(), StubbedOps() as stubs:
        layer(x)  # allocates the stubs' outputs
        stubs.calls.clear()
        layer(x)
        calls = list(stubs.calls)
        if not calls:
            raise RuntimeError(f"{kind}: the forward called no torch.ops.reparam op")
        total = median_us(lambda: layer(x), number, repeat)
        stub_only = median_us(lambda: [s(*a) for _, s, a in calls], number, repeat)
    return {"kind": kind, "layer": type(layer).__name__, "ops_per_call": len(calls),
            "host_us": round(total - stub_only, 2), "with_stub_us": round(total, 2), "stub_us": round(stub_only, 2),
            "dispatch_us": round(dispatch_us(kind, number, repeat), 2)}


class TrivialCpuKernels:
    """Override each op's CPU kernel (the reference) by one returning a preallocated output, so the
    dispatcher's own cost can be timed; the reference kernels come back when the override is removed."""

    def __init__(self, calls):
        self.calls = calls  # (op name, args) to serve

    def __enter__(self):
        self.lib = torch.library.Library("reparam", "IMPL")
        for name in {n for n, _ in self.calls}:
            outs = {id(a[0]): empty_output(name, a) for n, a in self.calls if n == name}
            with warnings.catch_warnings():  # torch warns about the override it was asked for
                warnings.simplefilter("ignore")
                self.lib.impl(name, lambda *a, _outs=outs: _outs[id(a[0])], "CPU", allow_override=True)
        return self

    def __exit__(self, *exc):
        self.lib._destroy()
        return False


def dispatch_us(kind, number, repeat):
    """µs per layer call from `_dispatch.call` through the dispatcher to a (trivial) CPU kernel and back."""
    layer = variants.make_random(kind, 64, 32, bias=True, dtype=torch.float16, device="cpu")
    x = torch.randn(1, 64, dtype=torch.float16)
    with torch.no_grad():
        with StubbedOps() as stubs:
            layer(x)
        calls = [(name, args) for name, _, args in stubs.calls]
        with TrivialCpuKernels(calls):
            return median_us(lambda: [_dispatch.call(n, *a) for n, a in calls], number, repeat)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096x4096", help="in_features x out_features of the layers")
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu",
                                                  "host_overhead.json"))
    args = p.parse_args(argv)
    k, n = (int(v) for v in args.shape.lower().split("x"))
    rows = []
    for kind in [kd for kd in KINDS if kd in variants.available()]:
        row = measure(kind, k, n, args.number, args.repeat)
        rows.append(row)
        print(f"{kind:22s} {row['layer']:22s} ops {row['ops_per_call']}  host {row['host_us']:6.2f} us  "
              f"dispatch {row['dispatch_us']:6.2f} us", flush=True)
    a = torch.randn(1, 8)
    w = torch.randn(8, 8)
    yard = median_us(lambda: torch.ops.aten.linear(a, w), args.number, args.repeat)
    print(f"yardstick: torch.ops.aten.linear on 1x8 CPU tensors {yard:.2f} us")
    result = {"what": "host µs per eager layer call: host_us before the op (ops stubbed, x [1, K] fp16), dispatch_us "
              "from _dispatch.call through the dispatcher to a trivial CPU kernel (the reference overridden)",
              "shape": args.shape, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__,
              "command": "python benchmarks/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "yardstick_aten_linear_us": round(yard, 2), "rows": rows}
    print(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
