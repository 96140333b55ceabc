"""`python -m reparam_kernels bench`: script discovery, docs + roofline from result files (CPU side)."""
import os

import pytest
import torch

from reparam_kernels.bench.results import Results, load, merge
from reparam_kernels.cli import bench

ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "date": "2026-11-28T00:00:00+00:00",
       "command": "python benchmarks/bench_toy.py"}


def _write_fake_results(root):
    res = Results("toy_linear", root=str(root), env=dict(ENV))
    res.ceilings = {"copy_tbps": 4.0, "bf16_gemm_tflops": 600.0}
    for M in (1, 2048):
        for mode in ("graph", "eager"):
            res.add(mode=mode, dtype="fp16", M=M, N=8192, K=8192, params={"rank": 512}, ours_us=20.0 * M ** 0.5,
                    cublas_us=40.0, peers={}, bytes=2 * (M * 8192 * 2 + 512 * 16384), flops=2 * M * 512 * 16384)
    return res.write()


def test_render_only_writes_table_and_roofline(tmp_path):
    _write_fake_results(tmp_path / "results")
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text(f"# Benchmarks\n\nhow to run\n\n{bench.BEGIN}\nold\n{bench.END}\n\nfooter\n")
    assert bench.main(["--render-only", "--out", str(tmp_path / "results"), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhow to run") and text.rstrip().endswith("footer")
    assert "old" not in text and "### h200" in text and "toy_linear" in text
    assert text.count("| graph |") == 2 and "![roofline h200](roofline_h200.png)" in text
    png = tmp_path / "docs" / "roofline_h200.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # idempotent: rendering again gives the same file
    bench.main(["--render-only", "--out", str(tmp_path / "results"), "--docs", str(doc)])
    assert doc.read_text() == text


def test_render_only_without_results(tmp_path):
    doc = tmp_path / "benchmarks.md"
    assert bench.main(["--render-only", "--out", str(tmp_path / "none"), "--docs", str(doc)]) == 0
    assert "No GPU results yet." in doc.read_text()


def test_find_scripts_skips_decode_unless_asked(tmp_path):
    for name in ("bench_lowrank.py", "bench_quant.py", "bench_decode.py", "common.py"):
        (tmp_path / name).write_text("")
    assert sorted(bench.find_scripts(str(tmp_path))) == ["lowrank", "quant"]
    assert sorted(bench.find_scripts(str(tmp_path), decode=True)) == ["decode", "lowrank", "quant"]
    assert list(bench.find_scripts(str(tmp_path), only=["quant"])) == ["quant"]


def test_bench_without_gpu_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path), "--docs", os.path.join(tmp_path, "b.md")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_render_includes_decode_and_skips_cpu_runs(tmp_path):
    import json

    root = tmp_path / "results"
    for slug in ("h200", "cpu"):
        (root / slug).mkdir(parents=True)
        (root / slug / "decode.json").write_text(json.dumps(dict(
            ENV, model="Llama-3-8B config, random weights", config={"num_hidden_layers": 32}, dtype="float16",
            compile="reduce-overhead", context=512, new_tokens=64, skipped=[{"variant": "int8", "batch": 16,
                                                                             "reason": "compiled step disagrees"}],
            rows=[{"variant": "dense", "batch": 1, "tokens_per_s": 100.0, "speedup_vs_dense": 1.0,
                   "weight_bytes": 16e9},
                  {"variant": "int4_g128", "batch": 1, "tokens_per_s": 250.0, "speedup_vs_dense": 2.5,
                   "weight_bytes": 5e9}])))
    prof = {"steps": 4, "source": "CUDA kernels", "wall_us_per_step": 5200.0, "sum_us_per_step": 4900.0,
            "count_per_step": 420.0, "us_per_step": {"reparam": 2500.0, "inductor Triton": 1400.0,
                                                      "cuBLAS": 1000.0}, "top": []}
    (root / "h200" / "decode_reparam_gqa_sdpa.json").write_text(json.dumps(dict(
        ENV, model="Llama-3-8B config, random weights", config={"num_hidden_layers": 32}, dtype="float16",
        compile="reduce-overhead", attn_implementation="reparam_gqa_sdpa", context=512, new_tokens=64, skipped=[],
        rows=[{"variant": "int4_g128+fused", "batch": 1, "tokens_per_s": 190.0, "speedup_vs_dense": 1.4,
               "weight_bytes": 5e9, "profile": prof}])))
    (root / "h200" / "decode_mixtral_8x7b.json").write_text(json.dumps(dict(
        ENV, model="Mixtral-8x7B config, random weights", config={"num_hidden_layers": 4}, dtype="float16",
        compile="reduce-overhead", context=512, new_tokens=32, skipped=[],
        rows=[{"variant": "int4_g128", "batch": 1, "tokens_per_s": 90.0, "speedup_vs_dense": 1.8,
               "weight_bytes": 3e9, "experts": "reparam grouped"}])))
    doc = tmp_path / "b.md"
    assert bench.main(["--render-only", "--out", str(root), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert "### h200" in text and "### cpu" not in text
    assert "| int4_g128 | 1 | 250.0 | 2.50× | 5.00 |" in text and "Not timed: int8 batch 16" in text
    assert "Mixtral-8x7B config" in text and "| int4_g128 (experts: reparam grouped) | 1 | 90.0 | 1.80× |" in text
    assert "attention `reparam_gqa_sdpa`" in text
    assert "| variant | batch | reparam | inductor Triton | cuBLAS | sum | wall | kernels |" in text
    assert "| int4_g128+fused | 1 | 2500.0 | 1400.0 | 1000.0 | 4900.0 | 5200.0 | 420 |" in text
    assert "roofline" not in text  # no op files: no plot


def test_merge_keeps_the_cases_a_later_run_did_not_measure(tmp_path):
    # the committed file: fp16 and bf16 at M = 1 and 16; a later run of fp16 only, M = 1 re-measured
    # and M = 64 new: every old bf16 row and fp16 M = 16 stay, marked with their own run
    def results(root, env, rows):
        res = Results("toy_linear", root=str(root), env=dict(ENV, **env))
        for dtype, M, us in rows:
            res.add(mode="graph", dtype=dtype, M=M, N=4096, K=4096, params={"g": 128}, ours_us=us, cublas_us=40.0)
        res.failures = [{"case": {"M": M}, "reason": "from " + env["date"]}]
        return res.write()

    old = {"date": "2026-11-01T00:00:00+00:00", "command": "bench old"}
    results(tmp_path / "results", old, [("fp16", 1, 20.0), ("fp16", 16, 30.0), ("bf16", 1, 21.0)])
    results(tmp_path / "run", {"date": "2026-12-01T00:00:00+00:00", "command": "bench new"},
            [("fp16", 1, 10.0), ("fp16", 64, 35.0)])
    doc = tmp_path / "b.md"
    assert bench.main(["--merge", str(tmp_path / "run"), "--out", str(tmp_path / "results"), "--docs", str(doc)]) == 0
    data = load(str(tmp_path / "results" / "h200" / "toy_linear.json"))
    got = {(r["dtype"], r["M"]): (r["ours_us"], r.get("run", {}).get("command")) for r in data["rows"]}
    assert got == {("fp16", 1): (10.0, None), ("fp16", 64): (35.0, None), ("fp16", 16): (30.0, "bench old"),
                   ("bf16", 1): (21.0, "bench old")}
    assert data["command"] == "bench new" and [f["reason"] for f in data["failures"]] == ["from 2026-12-01T00:00:00+00:00"]
    text = doc.read_text()
    assert "[1]: rows from an earlier run, 2026-11-01T00:00:00+00:00 (torch 2.11.0), `bench old`" in text
    assert text.count("| graph [1] |") == 2 and text.count("| graph |") == 2
    # merging the same run again changes nothing; another op's file or GPU is refused
    bench.main(["--merge", str(tmp_path / "run"), "--out", str(tmp_path / "results"), "--docs", str(doc)])
    assert load(str(tmp_path / "results" / "h200" / "toy_linear.json")) == data
    other = dict(data, gpu="NVIDIA A100")
    with pytest.raises(ValueError, match="one op on one GPU"):
        merge(data, other)


def test_peers_summary_counts_wins_and_skips_other_libraries(tmp_path, capsys):
    res = Results("toy_linear", root=str(tmp_path / "run"), env=dict(ENV))
    # cuda_fast: 0.5x and 0.98x ours (one win: 0.98 is within the noise margin); cuda_slow: 2x; triton: a baseline,
    # not a switch; cuda_nan: a NaN time
    for M, fast in ((1, 10.0), (16, 19.6)):
        res.add(mode="graph", dtype="fp16", M=M, N=64, K=64, params={}, ours_us=20.0,
                cublas_us=40.0, peers={"cuda_fast": fast, "cuda_slow": 40.0, "triton": 1.0, "cuda_nan": float("nan")},
                bytes=1, flops=1)
    res.write()
    assert bench.main(["--peers", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| cuda_fast | graph | 2 | 1 | 0.700 | 0.500 (toy_linear fp16 M=1 64x64)"), lines
    assert lines[3].startswith("| cuda_slow | graph | 2 | 0 | 2.000 |") and len(lines) == 4
    assert not any("triton" in line or "cuda_nan" in line for line in lines)
    assert bench.main(["--peers", str(tmp_path / "empty")]) == 2


def test_merge_decode_keeps_the_variants_a_later_run_did_not_time(tmp_path):
    # the decode stage may run in two calls: the second's file must not drop the first's rows; a run of
    # another setup (4 layers) replaces the file whole
    import json

    def decode_file(date, rows, layers=32, skipped=()):
        return dict(ENV, date=date, model="Llama-3-8B config, random weights", config={"num_hidden_layers": layers},
                    dtype="float16", compile="reduce-overhead", attn_implementation="reparam_gqa_sdpa", context=512,
                    new_tokens=64, skipped=list(skipped),
                    rows=[{"variant": v, "batch": b, "tokens_per_s": t, "speedup_vs_dense": s, "weight_bytes": 5e9}
                          for v, b, t, s in rows])

    old = decode_file("2026-12-10T00:00:00+00:00", [("dense", 1, 100.0, 1.0), ("int4_g128+fused", 1, 190.0, 1.9),
                                                    ("int8+fused", 1, 150.0, 1.5)])
    new = decode_file("2026-12-11T00:00:00+00:00", [("dense", 1, 101.0, 1.0), ("lowrank_40+fused", 1, 140.0, 1.39)],
                      skipped=[{"variant": "int8+fused", "reason": "time budget 220 s spent"},
                               {"variant": "vq_d2", "reason": "time budget 220 s spent"}])
    root = tmp_path / "results" / "h200"
    run = tmp_path / "run" / "h200"
    root.mkdir(parents=True)
    run.mkdir(parents=True)
    name = "decode_reparam_gqa_sdpa.json"
    (root / name).write_text(json.dumps(old))
    (run / name).write_text(json.dumps(new))
    doc = tmp_path / "b.md"
    assert bench.main(["--merge", str(tmp_path / "run"), "--out", str(tmp_path / "results"), "--docs", str(doc)]) == 0
    merged = json.loads((root / name).read_text())
    assert [(r["variant"], r["tokens_per_s"], "run" in r) for r in merged["rows"]] == [
        ("dense", 101.0, False), ("lowrank_40+fused", 140.0, False), ("int4_g128+fused", 190.0, True),
        ("int8+fused", 150.0, True)]
    assert merged["date"] == new["date"] and [s["variant"] for s in merged["skipped"]] == ["vq_d2"]
    text = doc.read_text()
    assert "| int4_g128+fused (run of 2026-12-10) | 1 | 190.0 | 1.90× |" in text
    assert "| lowrank_40+fused | 1 | 140.0 | 1.39× |" in text
    # another setup: the file is the new run's alone
    (run / name).write_text(json.dumps(decode_file("2026-12-12T00:00:00+00:00", [("dense", 1, 300.0, 1.0)], layers=4)))
    bench.main(["--merge", str(tmp_path / "run"), "--out", str(tmp_path / "results"), "--docs", str(doc)])
    assert [r["variant"] for r in json.loads((root / name).read_text())["rows"]] == ["dense"]
