"""The eager per-call host work of the op wrappers: what keeps it small is tested here, the time itself
is measured by benchmarks/host_overhead.py (timings are not asserted in CI)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from reparam_kernels import _dispatch
from reparam_kernels._checks import check
from reparam_kernels.ops import lowrank_linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_is_chosen_once_per_op_device_and_dtype(monkeypatch):
    calls = []
    real = _dispatch.backend_for
    monkeypatch.setattr(_dispatch, "backend_for", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(_dispatch, "BACKEND_CACHE", {})
    x, u, v = torch.randn(2, 6), torch.randn(5, 3), torch.randn(3, 6)
    ref = x.double() @ v.double().t() @ u.double().t()
    for _ in range(3):
        assert torch.allclose(lowrank_linear(x, u, v).double(), ref, rtol=1e-5, atol=1e-6)
    lowrank_linear(x.double(), u.double(), v.double())
    assert calls == [("lowrank_linear", "cpu", torch.float32), ("lowrank_linear", "cpu", torch.float64)]


def test_check_formats_its_message_only_when_it_fails():
    check(True, "op", lambda: pytest.fail("a passing check formatted its message"))
    with pytest.raises(ValueError, match=r"reparam\.op: `x` is bad: 3"):
        check(False, "op", lambda: f"`x` is bad: {1 + 2}")
    with pytest.raises(ValueError, match=r"reparam\.op: plain"):
        check(False, "op", "plain")


def test_as_dtype_returns_the_tensor_itself_when_no_cast_is_needed():
    t = torch.ones(3, dtype=torch.float16)
    assert _dispatch.as_dtype(t, torch.float16) is t and _dispatch.as_dtype(None, torch.float16) is None
    assert _dispatch.as_dtype(t, torch.float32).dtype == torch.float32


def test_autocast_fast_exit_and_cast():
    x, b = torch.randn(2, 3), torch.randn(3)
    out = _dispatch.autocast(x, b, None, 4)
    assert out[0] is x and out[1] is b and out[2] is None and out[3] == 4
    with torch.autocast("cpu", torch.bfloat16):
        x2, b2 = _dispatch.autocast(x, b)
    assert x2.dtype == b2.dtype == torch.bfloat16


def test_host_overhead_script_stubs_every_op_call(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--shape",
                           "256x128", "--number", "20", "--repeat", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {r["kind"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"int4_g128", "int8", "lowrank_40", "block_circulant_b256"} <= set(rows)
    assert rows["lowrank40_int4"]["ops_per_call"] == 2 and rows["int8"]["ops_per_call"] == 1
    assert all(r["with_stub_us"] > 0 and r["stub_us"] > 0 and "dispatch_us" in r for r in rows.values())


def test_op_enters_below_autograd_only_when_no_gradient_is_wanted(monkeypatch):
    entered = []
    real = _dispatch._BELOW_AUTOGRAD

    class Spy:
        def __enter__(self):
            entered.append(1)
            self.ctx = real()
            return self.ctx.__enter__()

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    monkeypatch.setattr(_dispatch, "_BELOW_AUTOGRAD", Spy)
    x, u, v = torch.randn(2, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    y = lowrank_linear(x, u, v)  # nothing requires grad
    assert entered == [1] and y.grad_fn is None
    with torch.no_grad():
        lowrank_linear(x, u.requires_grad_(), v)  # grad mode off
    assert entered == [1, 1]
    y = lowrank_linear(x, u, v)  # u requires grad: through the registered autograd
    assert entered == [1, 1] and y.grad_fn is not None
    y.sum().backward()
    assert torch.allclose(u.grad, (x @ v.t()).sum(0).expand(5, 3))


def test_trivial_cpu_kernels_are_removed_after_the_measurement():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import host_overhead
    finally:
        sys.path.pop(0)
    x, u, v = torch.randn(2, 6), torch.randn(5, 3), torch.randn(3, 6)
    ref = lowrank_linear(x, u, v)
    with host_overhead.TrivialCpuKernels([("lowrank_linear", (x, u, v, None))]):
        out = torch.ops.reparam.lowrank_linear(x, u, v, None)
        again = torch.ops.reparam.lowrank_linear(x, u, v, None)
        assert out.shape == ref.shape and out.data_ptr() == again.data_ptr()  # one preallocated output
    assert torch.equal(lowrank_linear(x, u, v), ref)  # the reference kernel is back
    assert host_overhead.dispatch_us("lowrank_40", 5, 1) > 0
    assert torch.equal(lowrank_linear(x, u, v), ref)
