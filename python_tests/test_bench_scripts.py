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
    assert set(rows[0]["peers"]) == {"two_cublas"}
    assert rows[0]["params"] == {"rank": 9} and rows[0]["bytes"] == (3 * 96 + 9 * (70 + 96) + 3 * 70) * 2
    assert rows[0]["flops"] == 2 * 3 * 9 * (70 + 96)
    assert len(fake_timer) == 6
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


def test_bench_decode_tiny_end_to_end(tmp_path):
    """--tiny: the decode benchmark builds, swaps, compiles, checks and times on the CPU."""
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    assert decode.main(["--tiny", "--variants", "dense,int8,lowrank40_int4", "--context", "16", "--tokens", "2",
                        "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "cpu" / "decode.json"))
    assert data["config"]["num_hidden_layers"] == 2 and data["skipped"] == []
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "int8", "lowrank40_int4"}
    assert rows["dense"]["speedup_vs_dense"] == 1.0 and rows["dense"]["linears_swapped"] == 0
    assert rows["int8"]["linears_swapped"] == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays
    assert all(r["tokens_per_s"] > 0 and r["compiled_vs_eager_rel_diff"] < 5e-2 for r in rows.values())
    assert rows["int8"]["weight_bytes"] < rows["dense"]["weight_bytes"]


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
