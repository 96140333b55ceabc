"""The issues' speed targets checked against result files (`reparam_kernels/bench/targets.py`,
`python -m reparam_kernels bench --targets`): worst row over the M range, peers that would meet a missed target,
what no row covers, decode runs that are not the issue's 32 layers."""
import dataclasses
import json
import os

from reparam_kernels.bench import targets as T
from reparam_kernels.bench.results import Results
from reparam_kernels.cli import bench

ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "date": "2026-12-06T00:00:00+00:00",
       "command": "python benchmarks/bench_toy.py"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BC = T.Target(4, "block_circulant_linear", "toy b=256 M=1..16 ≥ 5×", 5.0, shape=(4096, 4096),
              params=(("block", 256),), m_range=(1, 16))


def _rows(tmp_path, op, rows):
    res = Results(op, root=str(tmp_path), env=dict(ENV))
    for r in rows:
        res.add(**r)
    res.write()
    return str(tmp_path / "h200")


def _bc(M, ours, cublas=20.0, mode="graph", dtype="fp16", block=256, peers=None):
    return dict(mode=mode, dtype=dtype, M=M, N=4096, K=4096, params={"block": block}, ours_us=ours,
                cublas_us=cublas, peers=peers or {}, bytes=1, flops=1)


def test_the_worst_row_over_the_range_decides(tmp_path):
    # M = 1 meets 5x (20 / 3 = 6.7x), M = 16 does not (20 / 5 = 4x); M = 64 lies outside the range; bf16, eager
    # and another block size are other targets' rows
    d = _rows(tmp_path, "block_circulant_linear", [_bc(1, 3.0), _bc(16, 5.0), _bc(64, 1.0), _bc(16, 1.0, dtype="bf16"),
                                                  _bc(16, 1.0, mode="eager"), _bc(16, 1.0, block=512)])
    (t, r), = T.check(d, [BC])
    assert r["status"] == "missed" and abs(r["value"] - 4.0) < 1e-9 and r["ms"] == [1, 16] and r["peer"] is None
    assert r["date"] == "2026-12-06"
    (t, r), = T.check(d, [dataclasses.replace(BC, need=4.0)])
    assert r["status"] == "met"


def test_a_peer_that_meets_it_on_every_row_is_named(tmp_path):
    # cuda_cols meets 5x at both M; cuda_half only at M = 1; triton is another library's path, never a switch
    d = _rows(tmp_path, "block_circulant_linear", [
        _bc(1, 5.0, peers={"cuda_cols": 3.0, "cuda_half": 2.0, "triton": 1.0}),
        _bc(16, 5.0, peers={"cuda_cols": 3.5, "cuda_half": 9.0, "triton": 1.0})])
    (t, r), = T.check(d, [BC])
    assert r["status"] == "missed" and r["peer"][0] == "cuda_cols" and abs(r["peer"][1] - 20 / 3.5) < 1e-9
    text = T.render([(t, r)])
    assert "peer `cuda_cols` meets it (5.71×)" in text and "0 of 1 targets met" in text


def test_time_bandwidth_and_peer_metrics(tmp_path):
    d = _rows(tmp_path, "lowrank_linear", [
        dict(mode="graph", dtype="fp16", M=1, N=8192, K=8192, params={"rank": 512}, ours_us=5.0, cublas_us=40.0,
             peers={"two_cublas": 13.0}, bytes=16_000_000, flops=1),
        dict(mode="eager", dtype="fp16", M=1, N=8192, K=8192, params={"rank": 512}, ours_us=10.0, cublas_us=40.0,
             peers={"two_cublas": 12.0}, bytes=16_000_000, flops=1)])
    us = T.Target(2, "lowrank_linear", "≤ 6 µs", 6.0, metric="us", shape=(8192, 8192))
    tbps = T.Target(2, "lowrank_linear", "≥ 2.99 TB/s", T.COPY_TBPS_NEED, metric="tbps", shape=(8192, 8192))
    vs = T.Target(2, "lowrank_linear", "eager ≥ 1.3× two cuBLAS", 1.3, metric="vs:two_cublas", shape=(8192, 8192),
                  mode="eager")
    got = dict((t.what, r) for t, r in T.check(d, [us, tbps, vs]))
    assert got["≤ 6 µs"]["status"] == "met" and got["≤ 6 µs"]["value"] == 5.0
    assert got["≥ 2.99 TB/s"]["status"] == "met" and abs(got["≥ 2.99 TB/s"]["value"] - 3.2) < 1e-9
    assert got["eager ≥ 1.3× two cuBLAS"]["status"] == "missed" and abs(got["eager ≥ 1.3× two cuBLAS"]["value"]
                                                                        - 1.2) < 1e-9


def test_no_row_is_not_measured(tmp_path):
    d = _rows(tmp_path, "block_circulant_linear", [_bc(64, 1.0)])
    (t, r), = T.check(d, [BC])
    assert r["status"] == "not measured" and r["value"] is None
    assert "| 4 | toy b=256 M=1..16 ≥ 5× | – | – | not measured | – |" in T.render([(t, r)])


def _decode(path, layers, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"gpu": "NVIDIA H200", "date": "2026-12-06T00:00:00+00:00", "context": 512,
                   "config": {"num_hidden_layers": layers}, "rows": rows}, f)


def _drow(variant, batch, speedup):
    return {"variant": variant, "batch": batch, "context": 512, "tokens_per_s": 100.0 * speedup,
            "speedup_vs_dense": speedup}


def test_decode_takes_the_best_variant_of_the_kind_and_only_the_full_model(tmp_path):
    int4 = T.Target(6, "decode", "int4 ≥ 2.5×", 2.5, metric="decode", kinds=("int4_g128",))
    int4_16 = dataclasses.replace(int4, what="int4 b16 ≥ 2.0×", need=2.0, m_range=(16, 16))
    _decode(str(tmp_path / "h200" / "decode.json"), 4, [_drow("int4_g128", 1, 3.0)])  # 4 layers: does not count
    _decode(str(tmp_path / "h200" / "decode_reparam_gqa_sdpa.json"), 32, [
        _drow("int4_g128", 1, 2.2), _drow("int4_g128+fused:x_ahead", 1, 2.6), _drow("int4_g128_c32", 1, 9.0),
        _drow("lowrank40_int4", 1, 9.0), _drow("int4_g128+fused", 16, 1.9)])
    got = dict((t.what, r) for t, r in T.check(str(tmp_path), [int4, int4_16]))
    assert got["int4 ≥ 2.5×"]["status"] == "met" and got["int4 ≥ 2.5×"]["variant"] == "int4_g128+fused:x_ahead"
    assert got["int4 b16 ≥ 2.0×"]["status"] == "missed" and got["int4 b16 ≥ 2.0×"]["value"] == 1.9
    _decode(str(tmp_path / "h200" / "decode_reparam_gqa_sdpa.json"), 32, [])
    (t, r), = T.check(str(tmp_path), [int4])
    assert r["status"] == "not measured (4-layer run only: int4_g128 3.00×)"


def test_every_issue_target_reads_the_committed_results(capsys):
    # each target names an op, shape and params the benchmarks write (a typo would read "not measured" for ever)
    results = T.check(os.path.join(REPO, "benchmarks", "results", "h200"))
    assert {t.issue for t, _ in results} == {2, 3, 4, 6} and len(results) == len(T.TARGETS)
    unmeasured = [t.what for t, r in results if t.op != "decode" and r["status"] == "not measured"]
    assert unmeasured == [], unmeasured
    assert bench.main(["--targets", os.path.join(REPO, "benchmarks", "results", "h200")]) == 0
    assert "targets met." in capsys.readouterr().out
    assert bench.main(["--targets", os.path.join(REPO, "no", "such")]) == 2


def test_render_only_writes_the_targets_section(tmp_path):
    _rows(tmp_path / "results", "block_circulant_linear", [_bc(1, 3.0)])
    doc, status = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "status.md"
    doc.parent.mkdir()
    status.write_text("# Status\n\nintro\n\n<!-- targets:begin -->\nold\n<!-- targets:end -->\n\n## Log\nkept\n")
    assert bench.main(["--render-only", "--out", str(tmp_path / "results"), "--docs", str(doc)]) == 0
    text = status.read_text()
    assert "old" not in text and "intro" in text and text.endswith("## Log\nkept\n")
    assert "circulant n=4096 M=1 ≤ 3 µs | – | – | not measured" in text and "targets met." in text


def test_a_near_miss_is_not_shown_as_the_need():
    t = T.Target(3, "int4_linear", "M=2048 ≥ 0.9×", 0.9)
    assert T._fmt(t, 0.8996) == "0.8996×" and T._fmt(t, 0.83) == "0.83×" and T._fmt(t, 0.9) == "0.90×"
    assert T._fmt(T.Target(4, "x", "≤ 3 µs", 3.0, metric="us"), 3.004) == "3.004 µs"
