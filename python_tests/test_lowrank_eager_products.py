"""lowrank_linear's eager shortcut: where the C++ op would run its two cuBLAS products, eager calls make them
from Python (ops/lowrank_linear.py) — only there. On the CPU with the shortcut's device list widened and the
backend choice answering "cuda", as a GPU would."""
import pytest
import torch
import torch.nn.functional as F

import reparam_kernels  # noqa: F401
from reparam_kernels import _dispatch
from reparam_kernels.ops import lowrank_linear as public

L = __import__("sys").modules["reparam_kernels.ops.lowrank_linear"]


@pytest.fixture
def as_gpu(monkeypatch):
    """CPU tensors treated as the CUDA kernel's: which path each call took is recorded."""
    monkeypatch.setattr(L, "EAGER_PRODUCTS_DEVICES", ("cpu",))
    monkeypatch.setattr(_dispatch, "backend_of", lambda name, x: ("cuda", "as a GPU would"))
    for var in ("REPARAM_LOWRANK_GEMV", "REPARAM_LOWRANK_CUBLAS_MIN_M"):
        monkeypatch.delenv(var, raising=False)
    took = []
    call = _dispatch.call
    monkeypatch.setattr(_dispatch, "call", lambda *a: took.append("op") or call(*a))
    linear = F.linear
    monkeypatch.setattr(L.F, "linear", lambda *a: took.append("linear") or linear(*a))
    return took


def factors(m, k=48, n=40, r=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, u, v = (torch.randn(*s, generator=g) for s in ((m, k), (n, r), (r, k)))
    return x, u, v, (torch.randn(n, generator=g) if bias else None)


def reference(x, u, v, b):
    y = x.double() @ v.double().t() @ u.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("m,bias", [(1, True), (5, False), (33, True)])
def test_default_route_is_two_products(as_gpu, m, bias):
    x, u, v, b = factors(m, bias=bias)
    y = public(x, u, v, b)
    assert as_gpu == ["linear", "linear"]
    torch.testing.assert_close(y.double(), reference(x, u, v, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env,m,route", [
    ({"REPARAM_LOWRANK_GEMV": "1"}, 4, "op"),  # the two-GEMV launch asked for: the op decides
    ({"REPARAM_LOWRANK_GEMV": "0"}, 4, "linear"),
    ({"REPARAM_LOWRANK_CUBLAS_MIN_M": "0"}, 64, "op"),  # 0: never two products
    ({"REPARAM_LOWRANK_CUBLAS_MIN_M": "8"}, 7, "op"),
    ({"REPARAM_LOWRANK_CUBLAS_MIN_M": "8"}, 8, "linear"),
    ({"REPARAM_LOWRANK_CUBLAS_MIN_M": " 3x"}, 3, "linear"),  # read as C++'s atoll reads it: 3
])
def test_switches_keep_the_op(as_gpu, monkeypatch, env, m, route):
    for k, val in env.items():
        monkeypatch.setenv(k, val)
    x, u, v, b = factors(m)
    torch.testing.assert_close(public(x, u, v, b).double(), reference(x, u, v, b), rtol=1e-5, atol=1e-5)
    assert as_gpu[0] == route


def test_other_backends_and_compiled_graphs_keep_the_op(as_gpu, monkeypatch):
    x, u, v, b = factors(2)
    monkeypatch.setattr(_dispatch, "backend_of", lambda name, x: ("triton", "no CUDA kernel"))
    public(x, u, v, b)
    monkeypatch.setattr(_dispatch, "backend_of", lambda name, x: ("cuda", "as a GPU would"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    public(x, u, v, b)
    assert as_gpu == ["op", "op"]


def test_gradients_through_the_shortcut(as_gpu):
    x, u, v, b = (t.requires_grad_() for t in factors(6))
    public(x, u, v, b).square().sum().backward()
    assert as_gpu == ["linear", "linear"]
    got = [t.grad.clone() for t in (x, u, v, b)]
    xd, ud, vd, bd = (t.detach().double().requires_grad_() for t in (x, u, v, b))
    reference(xd, ud, vd, bd).square().sum().backward()
    for g, t in zip(got, (xd, ud, vd, bd)):
        assert (g.double() - t.grad).abs().max() <= 1e-5 * t.grad.abs().max()  # fp32 against float64


def test_cpu_tensors_never_take_it(monkeypatch):
    took = []
    call = _dispatch.call
    monkeypatch.setattr(_dispatch, "call", lambda *a: took.append("op") or call(*a))
    x, u, v, b = factors(3)
    public(x, u, v, b)
    assert took == ["op"]  # the shortcut's device list is CUDA's alone
