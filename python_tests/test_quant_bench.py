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


@pytest.mark.parametrize("op", ["int8_linear", "int4_linear", "lut_linear", "vq_linear"])
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


@pytest.mark.parametrize("op", ["int8_linear", "int4_linear", "lut_linear"])
@pytest.mark.parametrize("M", [1, 5, 40, 100, 600])
def test_every_path_peer_runs_with_ours_arguments(monkeypatch, op, M):
    """The A/B peers (`other_paths`) take the argument sets `ours` takes: on the H200 every peer once
    failed on a missing bias (they called the raw op, ours the wrapper). On the CPU the peers run the
    reference, so each must equal ours."""
    bench = importlib.import_module("bench_quant")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # every Hopper peer too
    gen = torch.Generator().manual_seed(0)
    wargs, _ = bench.make_weights(op, 72, 256, torch.float16, "cpu", gen)
    x = torch.randn(M, 256, generator=gen).to(torch.float16)
    peers = bench.other_paths(op, M)
    assert peers, M
    want = getattr(bench.reparam_kernels.ops, op)(x, *wargs)
    for name, fn in peers.items():
        assert torch.equal(fn(x, *wargs), want), name


def test_dequant_piece_peers_where_they_differ(monkeypatch):
    # M >= 129 takes dequantize + cuBLAS: a 16 MB piece peer where that makes pieces the default (256 MB)
    # does not, a whole-weight peer where the default makes pieces; none below the path's M; each equals ours
    bench = importlib.import_module("bench_quant")
    monkeypatch.delenv("REPARAM_DEQUANT_SCRATCH_MB", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert set(bench.other_paths("int4_linear", 2048, 8192, 8192)) >= {"cuda_dequant_l2"}
    assert "cuda_dequant_whole" not in bench.other_paths("int4_linear", 2048, 8192, 8192)  # 128 MB: one piece
    assert {"cuda_dequant_l2", "cuda_dequant_whole"} <= set(bench.other_paths("int4_linear", 2048, 28672, 8192))
    assert not {"cuda_dequant_l2", "cuda_dequant_whole"} & set(bench.other_paths("int4_linear", 256, 8192, 8192))
    assert not {"cuda_dequant_l2", "cuda_dequant_whole"} & set(bench.other_paths("int4_linear", 64, 28672, 8192))
    gen = torch.Generator().manual_seed(0)
    wargs, _ = bench.make_weights("int8_linear", 72, 256, torch.float16, "cpu", gen)
    x = torch.randn(300, 256, generator=gen).to(torch.float16)
    monkeypatch.setattr(bench, "L2_SCRATCH_MB", 0.01)  # pieces of this small case too
    peers = bench.dequant_piece_peers(bench.reparam_kernels.ops.int8_linear, 2048, 4608, 256, 2)
    assert set(peers) == {"cuda_dequant_l2"}
    want = bench.reparam_kernels.ops.int8_linear(x, *wargs)
    assert torch.equal(peers["cuda_dequant_l2"](x, *wargs), want)


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
