"""bench_quant's case logic, run small on the CPU with the timer stubbed out (timings need a GPU)."""
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402
from reparam_kernels.bench import cases  # noqa: E402


@pytest.fixture
def fake_timer(monkeypatch):
    calls = []

    def fake(mode, fn):
        fn()
        calls.append(mode)
        return 1.0 + len(calls)

    monkeypatch.setattr(cases, "time_mode", fake)
    return calls


@pytest.mark.parametrize("op", ["int8_linear", "int4_linear", "lut_linear"])
def test_bench_quant_case_on_cpu(tmp_path, fake_timer, op):
    bench = importlib.import_module("bench_quant")
    res = common.Results(op, root=str(tmp_path), env=common.environment("test"))
    rows = bench.bench_shape(res, op, N=72, K=256, M=3, dtype=torch.bfloat16, modes=("graph", "eager"),
                             device="cpu", count=2)
    assert res.failures == [], res.failures
    assert [r["mode"] for r in rows] == ["graph", "eager"]
    assert rows[0]["flops"] == 2 * 3 * 72 * 256
    assert rows[0]["bytes"] == bench.weight_bytes(op, 72, 256, 2) + (3 * 256 + 3 * 72) * 2
    assert "triton" in rows[0]["peers"]
    data = common.load(res.write())
    assert data["rows"][0]["op"] == op and os.path.basename(res.path()) == f"{op}.json"


def test_bench_quant_without_gpu_exits_clearly(monkeypatch):
    bench = importlib.import_module("bench_quant")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--quick"])


def test_quick_run_interleaves_the_ops():
    # a run cut short by the GPU budget must hold every op's first cases (issue 3 sets targets for all three)
    bench = importlib.import_module("bench_quant")
    shapes, batches = common.shapes_and_batches(True)
    cases = bench.case_list(bench.OPS, shapes, batches, [torch.float16, torch.bfloat16])
    assert [c[0] for c in cases[:len(bench.OPS)]] == list(bench.OPS)
    assert cases[0][1:] == (*shapes[0], batches[0], torch.float16)
    assert len(cases) == len(set(cases)) == len(bench.OPS) * len(shapes) * len(batches) * 2
