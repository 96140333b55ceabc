"""bench_decode.py --tiny: the end-to-end decode benchmark works on the CPU (the speed needs a GPU)."""
import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


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



def test_bench_decode_switch_variants(tmp_path, monkeypatch):
    # KIND:SWITCHES builds and times KIND with the switch set's variables on (and only then); a name outside
    # SWITCH_SETS stops the run before any model is built
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    seen = record_builds(decode, monkeypatch, lambda model, kind, fused: (
        kind, os.environ.get("REPARAM_SMALL_M_STREAM_K"), os.environ.get("REPARAM_SMALL_M_X_AHEAD")))
    monkeypatch.delenv("REPARAM_SMALL_M_STREAM_K", raising=False)
    monkeypatch.delenv("REPARAM_SMALL_M_X_AHEAD", raising=False)
    assert decode.main(["--tiny", "--variants", "dense,int8,int8:stream_k_x_ahead", "--context", "8", "--tokens", "1",
                        "--compile", "none", "--out", str(tmp_path)]) == 0
    assert seen == [(None, None, None), ("int8", None, None), ("int8", "1", "1")]
    assert "REPARAM_SMALL_M_STREAM_K" not in os.environ
    data = json.load(open(tmp_path / "cpu" / "decode.json"))
    assert [r["variant"] for r in data["rows"]] == ["dense", "int8", "int8:stream_k_x_ahead"]
    with pytest.raises(SystemExit, match="unknown switches"):
        decode.main(["--tiny", "--variants", "int8:fast", "--out", str(tmp_path)])


def record_builds(decode, monkeypatch, what):
    """bench_decode builds its models as before; returns the list of what(model, kind, fused) of each."""
    real, seen = decode.build_model, []

    def build(config, kind, dtype, device, **kw):
        model, swapped = real(config, kind, dtype, device, **kw)
        seen.append(what(model, kind, kw.get("fused", False)))
        return model, swapped

    monkeypatch.setattr(decode, "build_model", build)
    return seen


def test_bench_decode_fused_variants(tmp_path, monkeypatch):
    # KIND+fused builds KIND with q/k/v and gate/up fused (4 fused layers in the tiny config's 2 decoder
    # layers), with switches too; another suffix stops the run before any model is built
    pytest.importorskip("transformers")
    import json

    from reparam_kernels.nn import FusedProjections

    decode = importlib.import_module("bench_decode")
    seen = record_builds(decode, monkeypatch, lambda model, kind, fused: (
        kind, fused, sum(isinstance(m, FusedProjections) for m in model.modules()),
        os.environ.get("REPARAM_SMALL_M_X_AHEAD")))
    monkeypatch.delenv("REPARAM_SMALL_M_X_AHEAD", raising=False)
    assert decode.main(["--tiny", "--variants", "dense,dense+fused,int8+fused:x_ahead", "--context", "8",
                        "--tokens", "1", "--compile", "none", "--out", str(tmp_path)]) == 0
    assert seen == [(None, False, 0, None), (None, True, 4, None), ("int8", True, 4, "1")]
    data = json.load(open(tmp_path / "cpu" / "decode.json"))
    assert [r["variant"] for r in data["rows"]] == ["dense", "dense+fused", "int8+fused:x_ahead"]
    assert not data["skipped"]
    with pytest.raises(SystemExit, match=r"unknown or repeated suffix \+fast"):
        decode.main(["--tiny", "--variants", "int8+fast", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"repeated suffix \+fused"):
        decode.main(["--tiny", "--variants", "int8+fused+fused", "--out", str(tmp_path)])


def test_bench_decode_head_variant(tmp_path, monkeypatch):
    # KIND+head swaps lm_head too (with +fused and switches in any order of suffixes); dense+head is refused
    pytest.importorskip("transformers")
    import json

    from reparam_kernels.nn import Int8Linear

    decode = importlib.import_module("bench_decode")
    seen = record_builds(decode, monkeypatch, lambda model, kind, fused: type(model.lm_head).__name__)
    assert decode.main(["--tiny", "--variants", "dense,int8+fused,int8+head+fused:x_ahead", "--context", "8",
                        "--tokens", "1", "--compile", "none", "--out", str(tmp_path)]) == 0
    assert seen == ["Linear", "Linear", Int8Linear.__name__]
    rows = json.load(open(tmp_path / "cpu" / "decode.json"))["rows"]
    assert [(r["variant"], r["lm_head"]) for r in rows] == [
        ("dense", "dense"), ("int8+fused", "dense"), ("int8+head+fused:x_ahead", "int8")]
    # the head is one more swapped Linear
    assert rows[2]["linears_swapped"] == rows[1]["linears_swapped"] + 1
    assert rows[2]["weight_bytes"] < rows[1]["weight_bytes"]
    with pytest.raises(SystemExit, match="dense has none"):
        decode.main(["--tiny", "--variants", "dense+head", "--out", str(tmp_path)])


def test_bench_decode_profile(tmp_path):
    # --profile N: each row gets N more steps' time by category (on the CPU: the operators' own times)
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    assert decode.main(["--tiny", "--variants", "int8+fused", "--context", "8", "--tokens", "1", "--profile", "2",
                        "--compile", "none", "--out", str(tmp_path)]) == 0
    (row,) = json.load(open(tmp_path / "cpu" / "decode.json"))["rows"]
    prof = row["profile"]
    assert prof["steps"] == 2 and prof["count_per_step"] > 0 and prof["wall_us_per_step"] > 0
    assert prof["us_per_step"]["reparam"] > 0 and prof["us_per_step"]["cuBLAS"] > 0  # int8 ops; lm_head's mm
    assert abs(sum(prof["us_per_step"].values()) - prof["sum_us_per_step"]) < 1e-6 * prof["sum_us_per_step"]
    # 2 layers x (qkv, o, gate_up, down) int8 launches a step
    assert [t["calls_per_step"] for t in prof["top"] if t["name"] == "reparam::int8_linear"] == [8]
    times = [t["us_per_step"] for t in prof["top"]]
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize("impl", ["flex_attention", "reparam_gqa_sdpa"])
def test_bench_decode_attention_implementation(tmp_path, monkeypatch, impl):
    # --attn: every variant's model built with it, recorded, in a file of its own (eager: flex's compiled
    # kernel needs a GPU)
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    seen = record_builds(decode, monkeypatch,
                         lambda model, kind, fused: model.model.layers[0].self_attn.config._attn_implementation)
    assert decode.main(["--tiny", "--variants", "dense,int8+fused", "--context", "8", "--tokens", "1",
                        "--attn", impl, "--compile", "none", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "cpu" / "decode.json").exists()
    data = json.load(open(tmp_path / "cpu" / f"decode_{impl}.json"))
    assert data["attn_implementation"] == impl and not data["skipped"]
    assert [r["variant"] for r in data["rows"]] == ["dense", "int8+fused"]
    assert seen == [impl, impl]


def test_bench_decode_a_failing_variant_is_recorded(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    real = decode.build_model

    def build(config, kind, dtype, device, **kw):
        if kind == "int8":
            raise RuntimeError("no kernel image for this GPU")
        return real(config, kind, dtype, device, **kw)

    monkeypatch.setattr(decode, "build_model", build)
    assert decode.main(["--tiny", "--variants", "int8,dense", "--context", "8", "--tokens", "1",
                        "--compile", "none", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "cpu" / "decode.json"))
    assert [r["variant"] for r in data["rows"]] == ["dense"]
    assert data["skipped"][0]["variant"] == "int8" and "no kernel image" in data["skipped"][0]["reason"]


def test_bench_decode_tiny_qwen3_moe_runs(tmp_path):
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    assert decode.main(["--tiny", "--model", "qwen3_30b_a3b", "--variants", "dense,int8", "--context", "16",
                        "--tokens", "2", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "cpu" / "decode_qwen3_30b_a3b.json"))
    rows = {r["variant"]: r for r in data["rows"]}
    assert data["config"]["num_experts"] == 8 and data["skipped"] == []
    assert rows["int8"]["experts"] == "reparam grouped" and rows["int8"]["linears_swapped"] == 2 * (4 + 16)


def test_bench_decode_tiny_mixtral_groups_the_experts(tmp_path):
    """--model mixtral_8x7b --tiny: the experts split, swapped (int4: 4 experts × 2 Linears a layer besides the
    attention's 4) and grouped again, compiled and checked against eager; the dense baseline keeps transformers'
    fused experts. Its own results file."""
    pytest.importorskip("transformers")
    import json

    decode = importlib.import_module("bench_decode")
    assert decode.main(["--tiny", "--model", "mixtral_8x7b", "--variants", "dense,int4_g128,lowrank_40",
                        "--context", "16", "--tokens", "2", "--out", str(tmp_path)]) == 0
    data = json.load(open(tmp_path / "cpu" / "decode_mixtral_8x7b.json"))
    assert data["config"]["num_local_experts"] == 4 and data["skipped"] == []
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["dense"]["experts"].startswith("transformers ")
    assert rows["int4_g128"]["experts"] == "reparam grouped" and rows["int4_g128"]["linears_swapped"] == 2 * (4 + 8)
    assert rows["lowrank_40"]["experts"] == "reparam grouped"  # (grouped_lowrank_linear since session 32)
    assert all(r["compiled_vs_eager_rel_diff"] < 5e-2 for r in rows.values())
    assert not (tmp_path / "cpu" / "decode.json").exists()


def test_kernel_categories_of_gpu_names():
    from reparam_kernels.bench.kernel_profile import category

    names = {"void reparam::small_m::kernel<reparam::Int4Frag<__half>, 0>(reparam::small_m::Problem<...>)": "reparam",
             "_int4_linear_kernel": "reparam Triton", "triton_poi_fused_add_mul_0": "inductor Triton",
             "triton_red_fused__to_copy_mean_pow_rsqrt_1": "inductor Triton",
             "nvjet_hsh_64x32_64x16_2x4_v_bz_splitK_TNT": "cuBLAS",
             "void gemv2T_kernel_val<int, int, __half>": "cuBLAS",
             "void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64>>": "attention",
             "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::Half>>": "other"}
    assert {n: category(n) for n in names} == names


def test_decode_steps_walk_the_positions_on_the_device():
    # the timed steps take positions from a device tensor, one after the other, past the prompt
    pytest.importorskip("transformers")
    import torch

    decode = importlib.import_module("bench_decode")
    config = decode.llama_config(dict(decode.TINY, num_hidden_layers=1))
    config.architectures = ["LlamaForCausalLM"]
    model, _ = decode.build_model(config, None, torch.float32, "cpu")
    seen = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["cache_position"].tolist()), with_kwargs=True)
    tps, diff, prof = decode.decode_speed(model, config, 1, 8, 3, "none", "cpu", warmup=2, profile=2)
    assert tps > 0 and diff < 1e-6 and prof["steps"] == 2
    # prefill, the eager reference step, prefill again, the compiled first step; then 2 + 3 + 2 steps
    assert seen == [list(range(8)), [8], list(range(8)), [8]] + [[p] for p in range(9, 16)]
