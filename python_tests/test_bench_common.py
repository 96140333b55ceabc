"""CPU-side logic of the benchmark helpers: result-file format, markdown, rotation, correctness guard."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402
from reparam_kernels.bench import cases  # noqa: E402

ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "date": "2026-11-28T00:00:00+00:00",
       "command": "python benchmarks/bench_x.py --quick"}


def _results(tmp_path):
    res = common.Results("toy_op", root=str(tmp_path), env=dict(ENV))
    res.add(mode="graph", dtype="fp16", M=1, N=8192, K=8192, params={"rank": 512},
            ours_us=10.0, cublas_us=38.8, peers={"two_cublas": 21.0}, bytes=16_777_216 * 1.0)
    res.add(mode="eager", dtype="bf16", M=16, N=4096, K=14336, params={}, ours_us=5.5, cublas_us=11.0)
    return res


def test_results_file_has_design_format(tmp_path):
    res = _results(tmp_path)
    res.ceilings = {"copy_tbps": 4.27, "bf16_gemm_tflops": 680.0}
    path = res.write()
    assert path == os.path.join(str(tmp_path), "h200", "toy_op.json")
    data = json.load(open(path))
    for key in ("gpu", "torch", "cuda", "date", "command", "rows"):
        assert key in data
    row = data["rows"][0]
    assert set(row) >= {"op", "mode", "dtype", "M", "N", "K", "params", "ours_us", "cublas_us", "ratio", "peers"}
    assert row["op"] == "toy_op" and row["mode"] == "graph" and row["params"] == {"rank": 512}
    assert row["ratio"] == pytest.approx(38.8 / 10.0)
    assert data["rows"][1]["ratio"] == pytest.approx(2.0)
    assert data["ceilings"]["copy_tbps"] == 4.27
    assert common.load(path) == data  # validates on load


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("cuda"), "`cuda`"),
    (lambda d: d["rows"][0].pop("peers"), "lacks `peers`"),
    (lambda d: d["rows"][0].update(mode="cold"), "mode"),
    (lambda d: d["rows"][0].update(ratio=1.0), "ratio"),
    (lambda d: d["rows"][0].update(M="1"), "rows[0].M"),
    (lambda d: d["rows"][0].update(ours_us=-1.0), "non-positive"),
])
def test_validate_names_the_broken_field(tmp_path, breakage, message):
    data = _results(tmp_path).to_dict()
    breakage(data)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        common.validate(data)


def test_make_row_rejects_bad_mode_and_times():
    with pytest.raises(ValueError, match="mode"):
        common.make_row("op", "warm", "fp16", 1, 2, 3, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        common.make_row("op", "graph", "fp16", 1, 2, 3, 0.0, 1.0)


def test_markdown_table(tmp_path):
    res = _results(tmp_path)
    res.ceilings = {"copy_tbps": 4.27, "bf16_gemm_tflops": 680.0}
    res.fail({"M": 3}, "relative error 1 > 5e-3")
    md = common.render_markdown(res.to_dict())
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| mode"))
    assert "two_cublas µs" in header and "ratio" in header
    body = [ln for ln in lines if ln.startswith("| graph") or ln.startswith("| eager")]
    assert len(body) == 2
    assert "| 3.88× |" in body[0] and "rank=512" in body[0] and "| 21.0 |" in body[0]
    assert "| 1.68 (39% of copy) |" in body[0]  # 16.78 MB in 10 us = 1.68 TB/s of 4.27
    assert body[1].rstrip().endswith("| - | - |")  # no peer, no bytes
    assert "copy 4.27 TB/s" in md and "Not timed" in md and "NVIDIA H200" in md
    assert all(ln.count("|") == header.count("|") for ln in body)


def test_render_files(tmp_path):
    path = _results(tmp_path).write()
    assert common.render_files([path]) == common.render_markdown(common.load(path))


def test_gpu_slug():
    assert common.gpu_slug("NVIDIA H200") == "h200"
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert common.gpu_slug("NVIDIA GeForce RTX 4090") == "rtx4090"


def test_rotation_count_exceeds_l2():
    assert common.rotation_count(128 * 1024 ** 2) == 2  # 8192^2 fp16: 2 copies > 3 x 60 MB
    n = common.rotation_count(2 * 1024 ** 2)
    assert n * 2 * 1024 ** 2 >= 3 * common.L2_BYTES and (n - 1) * 2 * 1024 ** 2 < 3 * common.L2_BYTES
    assert common.rotation_count(10 ** 10) == 1
    with pytest.raises(ValueError, match="bytes_per_set"):
        common.rotation_count(0)


def test_cycling_rotates_sets():
    seen = []
    f = common.cycling(lambda a: seen.append(a), [(1,), (2,), (3,)])
    for _ in range(5):
        f()
    assert seen == [1, 2, 3, 1, 2]


def _case(tmp_path, ours_fn, monkeypatch):
    timed = []
    monkeypatch.setattr(cases, "time_mode", lambda mode, fn: (fn(), timed.append(mode), 7.0)[2])
    res = common.Results("toy", root=str(tmp_path), env=dict(ENV))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, generator=g)
    w = torch.randn(29, 37, generator=g)
    rows = common.run_case(res, dtype=torch.float32, M=3, N=29, K=37, params={},
                           ours=common.Contender(ours_fn, [(x, w)]),
                           cublas=common.Contender(torch.nn.functional.linear, [(x, w)]),
                           peers={"bad_peer": common.Contender(lambda a, b: a @ b.t() + 1, [(x, w)])},
                           reference=lambda: x.double() @ w.double().t())
    return res, rows, timed


def test_run_case_times_a_correct_kernel(tmp_path, monkeypatch):
    res, rows, timed = _case(tmp_path, lambda a, b: a @ b.t(), monkeypatch)
    assert [r["mode"] for r in rows] == ["graph", "eager"]
    assert timed == ["graph", "graph", "eager", "eager"]  # ours + cuBLAS; the wrong peer is not timed
    assert rows[0]["peers"] == {} and res.failures[0]["case"]["peer"] == "bad_peer"


def test_eager_rows_carry_each_contenders_host_time(tmp_path, monkeypatch):
    # on a GPU (faked here) every eager row says what enqueuing one call cost each timed contender; a contender
    # whose host timing fails is left out, and graph rows (no host cost to speak of) carry none
    monkeypatch.setattr(cases.torch.cuda, "is_available", lambda: True)
    costs = iter([3.0])  # ours; cuBLAS's host timing fails

    def fake_host(fn):
        fn()
        try:
            return next(costs)
        except StopIteration:
            raise RuntimeError("no host timing") from None
    monkeypatch.setattr(cases, "time_host", fake_host)
    res, rows, _ = _case(tmp_path, lambda a, b: a @ b.t(), monkeypatch)
    assert "host_us" not in rows[0] and rows[1]["host_us"] == {"ours": 3.0}
    monkeypatch.setattr(cases.torch.cuda, "is_available", lambda: False)
    res, rows, _ = _case(tmp_path, lambda a, b: a @ b.t(), monkeypatch)
    assert "host_us" not in rows[1]  # no GPU: nothing to say


def test_run_case_never_times_a_wrong_kernel(tmp_path, monkeypatch):
    res, rows, timed = _case(tmp_path, lambda a, b: a @ b.t() * 1.01, monkeypatch)
    assert rows == [] and timed == [] and res.rows == []
    assert "relative error" in res.failures[0]["reason"]


def test_check_against_float64_rejects_nan():
    ref = torch.ones(4, dtype=torch.float64)
    with pytest.raises(common.KernelMismatch):
        common.check_against_float64("k", torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref, torch.float32)
    assert common.check_against_float64("k", ref.float(), ref, torch.float32) == 0.0


def test_autosave_marks_partial_until_final_write(tmp_path):
    res = _results(tmp_path)  # two rows added: autosaved after each
    data = json.load(open(res.path()))
    assert data["partial"] is True and len(data["rows"]) == 2
    assert "partial" in common.render_markdown(data)
    res.write()
    data = json.load(open(res.path()))
    assert "partial" not in data and len(data["rows"]) == 2
    assert not os.path.exists(res.path() + ".tmp")


def test_run_case_records_a_kernel_that_raises(tmp_path, monkeypatch):
    def boom(a, b):
        raise RuntimeError("unsupported shape")

    res, rows, timed = _case(tmp_path, boom, monkeypatch)
    assert rows == [] and timed == []
    assert res.failures[0]["reason"] == "RuntimeError: unsupported shape"


def test_run_case_records_a_timing_failure(tmp_path, monkeypatch):
    res, rows, _ = _case(tmp_path, lambda a, b: a @ b.t(), monkeypatch)
    monkeypatch.setattr(cases, "time_mode", lambda mode, fn: (_ for _ in ()).throw(RuntimeError("capture")))
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g)
    rows = common.run_case(res, dtype=torch.float32, M=2, N=4, K=8, params={},
                           ours=common.Contender(lambda a, b: a @ b.t(), [(x, w)]),
                           cublas=common.Contender(torch.nn.functional.linear, [(x, w)]),
                           reference=lambda: x.double() @ w.double().t())
    assert rows == [] and any("timing failed: RuntimeError: capture" in f["reason"] for f in res.failures)


def test_reference_on_the_first_rows_checks_those_rows():
    x = torch.randn(cases.CHECK_ROWS + 40, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    out = (x @ w.t()).half()
    ref = cases.check_rows(x) @ w.t()
    assert ref.shape[0] == cases.CHECK_ROWS
    assert cases.check_against_float64("ok", out, ref, torch.float16) <= 5e-3
    bad = out.clone()
    bad[3] += 1.0  # a wrong row inside the checked ones
    with pytest.raises(cases.KernelMismatch):
        cases.check_against_float64("bad", bad, ref, torch.float16)


def test_with_env_sets_every_pair_around_the_call_only(monkeypatch):
    monkeypatch.delenv("RK_TEST_A", raising=False)
    monkeypatch.setenv("RK_TEST_B", "outer")
    seen = cases.with_env(lambda: (os.environ.get("RK_TEST_A"), os.environ["RK_TEST_B"]),
                          "RK_TEST_A", "1", "RK_TEST_B", "0")()
    assert seen == ("1", "0")
    assert "RK_TEST_A" not in os.environ and os.environ["RK_TEST_B"] == "outer"
    with pytest.raises(ValueError, match="pairs"):
        cases.with_env(len, "RK_TEST_A", "1", "RK_TEST_B")


def test_copy_ceiling_is_timed_eagerly_as_the_baseline(monkeypatch):
    # run 3 timed the copy in a CUDA graph: 2.71 TB/s, below cuBLAS's own GEMV in the same run (4.45 TB/s); the
    # ceiling is DESIGN.md's eager copy (4.27 TB/s on the H200), bytes read + written over the eager median
    from reparam_kernels.bench import timing

    def no_graph(fn):
        raise AssertionError("the copy ceiling must not be timed in a CUDA graph")

    calls = []

    def eager(fn):
        fn()
        calls.append(fn)
        return 250.0  # µs

    monkeypatch.setattr(timing, "time_graph", no_graph)
    monkeypatch.setattr(timing, "time_eager", eager)
    tbps = timing.measure_copy_tbps(nbytes_each=1 << 20, device="cpu")
    assert len(calls) == 1 and tbps == pytest.approx(2 * (1 << 20) / 250e-6 / 1e12)
