"""The bench scripts' case logic, run small on the CPU with the timer stubbed out
(the timings themselves need a GPU: see docs/benchmarks.md)."""
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
        fn()  # the timed callable must run
        calls.append(mode)
        return 1.0 + len(calls)

    monkeypatch.setattr(cases, "time_mode", fake)
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bench_lowrank_case_on_cpu(tmp_path, fake_timer, dtype):
    bench = importlib.import_module("bench_lowrank")
    res = common.Results("lowrank_linear", root=str(tmp_path), env=common.environment("test"))
    rows = bench.bench_shape(res, N=70, K=96, r=9, M=3, dtype=dtype, modes=("graph", "eager"),
                             device="cpu", count=2)
    assert res.failures == []
    assert [r["mode"] for r in rows] == ["graph", "eager"]
    assert set(rows[0]["peers"]) == {"two_cublas", "pivoted"}
    assert rows[0]["params"] == {"rank": 9} and rows[0]["bytes"] == (3 * 96 + 9 * (70 + 96) + 3 * 70) * 2
    assert rows[0]["flops"] == 2 * 3 * 9 * (70 + 96)
    assert len(fake_timer) == 8
    data = common.load(res.write())
    assert data["rows"][0]["op"] == "lowrank_linear"


def test_bench_lowrank_without_gpu_exits_clearly(monkeypatch):
    bench = importlib.import_module("bench_lowrank")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--quick"])


def test_sanitize_ops_script_on_cpu(capsys):
    """The compute-sanitizer driver runs every layer type and reaches every op with a CUDA kernel."""
    sanitize = importlib.import_module("sanitize_ops")
    assert sanitize.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lowrank_linear" in out and "FAIL" not in out


def test_profile_ops_script_on_cpu(capsys):
    """The Nsight Compute driver builds and calls every decode layer kind it lists, at every M."""
    profile = importlib.import_module("profile_ops")
    assert profile.main(["--device", "cpu", "--m", "1,3"]) == 0
    out = capsys.readouterr().out
    for kind, _, _ in profile.SHAPES:
        assert f"profile_ops: {kind} " in out
    assert out.count("M=3:") == len(profile.SHAPES)
    # --ring: the small-M kinds once more, with the ring switched on (and a 0 the runner set is respected)
    assert profile.main(["--device", "cpu", "--m", "1,16", "--kinds", "int4_g128,block_circulant_b256", "--ring"]) == 0
    out = capsys.readouterr().out
    assert "int4_g128 512x512 M=1 ring 1:" in out and "M=1 ring 2" not in out and "M=16 ring 2:" in out
    assert "block_circulant_b256 512x512 M=1 ring" not in out
    # --x-ahead / --post-scale: int4 at M <= 8 once more each (post-scale: int4 only)
    assert profile.main(["--device", "cpu", "--m", "1,16", "--kinds", "int4_g128,int8", "--x-ahead", "--post-scale"]) == 0
    out = capsys.readouterr().out
    assert "int4_g128 512x512 M=1 x ahead:" in out and "int4_g128 512x512 M=1 post-scale:" in out
    assert "M=16 post-scale" not in out and "int8 512x512 M=1 post-scale" not in out


def test_random_variants_have_sane_weights():
    """The decode benchmark's random layers: codes are not all zero and the effective weight
    has a Linear-like scale (random int codes at scale 1 would overflow fp16 activations)."""
    from reparam_kernels.bench import variants

    for kind in variants.available(variants.DECODE_KINDS):
        layer = variants.make_random(kind, 256, 192, bias=False, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            std = float(layer.to_dense().float().std())
            y = layer(torch.randn(3, 256))
        assert torch.isfinite(y).all() and y.shape == (3, 192)
        assert 1e-3 < std < 0.1, (kind, std)
        for buf in layer.buffers():
            if buf.dtype in (torch.uint8, torch.int8):
                assert buf.float().std() > 1, kind


def test_bench_lowrank_main_glue_on_cpu(tmp_path, fake_timer, monkeypatch, capsys):
    """main(): options, ceilings, progress, the per-row report and the final file, with the
    GPU-only parts (CUDA check, ceilings, device) swapped for CPU stand-ins and tiny shapes."""
    bench = importlib.import_module("bench_lowrank")
    from reparam_kernels import _dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_dispatch, "_CAPABILITY", {0: (9, 0)})
    monkeypatch.setattr(bench, "measure_ceilings", lambda: {"copy_tbps": 4.0, "bf16_gemm_tflops": 600.0})
    monkeypatch.setattr(bench, "shapes_and_batches", lambda quick: ([(70, 96)], [1, 5]))
    real = bench.bench_shape
    monkeypatch.setattr(bench, "bench_shape", lambda *a, **k: real(*a, **k, device="cpu", count=1))
    assert bench.main(["--quick", "--ranks", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ceilings: copy 4.00 TB/s" in out and "of copy" in out and "NOT TIMED" not in out
    data = common.load(str(tmp_path / "cpu" / "lowrank_linear.json"))
    assert "partial" not in data and data["ceilings"]["copy_tbps"] == 4.0
    assert len(data["rows"]) == 2 * 2 * 2  # dtypes x batches x modes
    assert {r["backend"] for r in data["rows"]} <= {"cuda", "triton", "reference"}


def test_factor_time_runs_small_on_cpu(tmp_path, monkeypatch):
    import json

    bench = importlib.import_module("factor_time")
    monkeypatch.setattr(sys, "argv", ["factor_time.py", "--device", "cpu", "--scale", "32", "--out", str(tmp_path / "f.json")])
    bench.main()
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["q_proj", "up_proj", "down_proj"]
    assert rows[2]["shape"] == [128, 448] and rows[2]["factor_device"] == "cpu"
    assert all(r["whitened_svd_s"] > 0 and r["pivot_s"] > 0 for r in rows)


def test_cp_line_search_runs_small(tmp_path, monkeypatch):
    import json

    bench = importlib.import_module("cp_line_search")
    out = tmp_path / "cp.json"
    monkeypatch.setattr(sys, "argv", ["cp_line_search.py", "--draws", "6", "--weight-sweeps", "3", "--out", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["line_search"] for r in rows[:4]] == [False, False, True, True]
    assert rows[0]["draws"] == 6 and rows[1]["draws"] == 1
    assert len(rows) == 8 and all(r["sweeps"] == 3 and 0 < r["rel_error"] < 1 for r in rows[4:])


@pytest.mark.parametrize("fmt", ["int4", "int8", "gptvq", "log4", "lowrank"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bench_moe_case_on_cpu(tmp_path, fake_timer, dtype, fmt):
    """The grouped experts against the dense per-expert loop on the CPU (the reference backend), rows
    sorted by expert from a random routing; a peer absent on the CPU."""
    bench = importlib.import_module("bench_moe")
    op = bench.OPS[fmt]
    res = common.Results(op, root=str(tmp_path), env=common.environment("test"))
    rows = bench.bench_case(res, (6, 2), "down", 128, 256, 5, dtype, ("graph", "eager"), fmt=fmt, device="cpu",
                            count=2)
    assert res.failures == []
    assert [r["mode"] for r in rows] == ["graph", "eager"] and rows[0]["M"] == 10
    assert rows[0]["params"]["experts"] == 6 and rows[0]["params"]["tokens"] == 5
    assert rows[0]["params"]["bits"] == {"int8": 8, "lowrank": 16}.get(fmt, 4)  # (gptvq: a byte a pair)
    assert rows[0]["flops"] == 2 * 10 * 128 * 256
    data = common.load(res.write())
    assert data["rows"][0]["op"] == op


def test_bench_moe_routing_gives_top_k_distinct_experts():
    bench = importlib.import_module("bench_moe")
    offsets = bench.routing(8, 2, 50, "cpu", torch.Generator().manual_seed(0))
    assert offsets[0] == 0 and offsets[-1] == 100 and bool((offsets[1:] >= offsets[:-1]).all())
    assert int((offsets[1:] - offsets[:-1]).max()) <= 50  # an expert at most once a token
