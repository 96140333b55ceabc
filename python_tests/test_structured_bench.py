"""bench_structured's case logic, run small on the CPU with the timer stubbed out
(the timings themselves need a GPU)."""
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


@pytest.mark.parametrize("op,N,K,b", [("block_circulant_linear", 70, 96, 32), ("toeplitz_linear", 40, 40, 128)])
def test_bench_structured_case_on_cpu(tmp_path, fake_timer, op, N, K, b):
    bench = importlib.import_module("bench_structured")
    res = common.Results(op, root=str(tmp_path), env=common.environment("test"))
    rows = bench.bench_block(res, N, K, b, 3, torch.float16, ("graph", "eager"), device="cpu", count=2, op=op)
    assert res.failures == []
    assert [r["mode"] for r in rows] == ["graph", "eager"]
    assert set(rows[0]["peers"]) == {"torch_fft"}
    assert rows[0]["op"] == op and rows[0]["N"] == N and rows[0]["K"] == K
    assert len(fake_timer) == 6
    data = common.load(res.write())
    assert data["rows"][0]["op"] == op


def test_bench_structured_without_gpu_exits_clearly(monkeypatch):
    bench = importlib.import_module("bench_structured")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--quick"])


def test_quick_run_measures_the_issue_targets_first():
    bench = importlib.import_module("bench_structured")
    _, batches = common.shapes_and_batches(True)
    dtypes = [torch.float16, torch.bfloat16]
    cases = bench.case_list(bench.QUICK_STRUCTURED_SHAPES, bench.QUICK_BLOCKS, batches, dtypes, targets_first=True)
    assert cases[:len(bench.QUICK_TARGETS)] == [(*t, torch.float16) for t in bench.QUICK_TARGETS]
    assert len(cases) == len(set(cases))  # each case once
    assert set(bench.case_list(bench.QUICK_STRUCTURED_SHAPES, bench.QUICK_BLOCKS, batches, dtypes)) <= set(cases)
