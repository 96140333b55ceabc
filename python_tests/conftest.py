"""Shared test setup: the `gpu` marker, float64 comparison and input helpers."""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Triton kernels run on CPU tensors through the interpreter (set before
    # reparam_kernels.triton is imported by any test module).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reparam_kernels.bench.cases import env_var  # noqa: E402,F401  (the tests' path switches)
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def pytest_addoption(parser):
    parser.addoption("--rep", type=int, default=1,
                     help="run every test that draws fresh inputs (the rng fixture) this many times: a hunt for "
                          "bounds that random inputs cross now and then")


def pytest_generate_tests(metafunc):
    reps = metafunc.config.getoption("rep")
    if reps > 1 and "rng" in metafunc.fixturenames:
        metafunc.fixturenames.append("_rep")
        metafunc.parametrize("_rep", range(reps))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture
def rng():
    """A fresh generator per test: new random inputs on every run, seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)

