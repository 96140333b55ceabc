"""Fused mixture-of-experts weights (transformers 5) split into per-expert Linears (compress/experts.py), so
recipes reach them: same outputs, routed-token calibration, compress / save / load."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels._linear import linear_from  # noqa: E402
from reparam_kernels.compress.calib import collect_inputs  # noqa: E402
from reparam_kernels.compress.experts import UnfusedExperts, fused_experts_names, unfuse_experts  # noqa: E402
from reparam_kernels.compress.sharing_copy import shares_storage  # noqa: E402
from reparam_kernels.nn import Int4Linear  # noqa: E402

# per architecture: the config's MoE settings (4 experts, 2 a token)
ARCHS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[], head_dim=8),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None),
    # weights stored [in, out], gate and up interleaved, biases, its own clamped gate
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0,
                        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1, num_key_value_heads=4),
}
EXPERTS = "{blocks}.*.mlp.experts.*.*"


def tiny_moe(arch="mixtral", seed=0, **overrides):
    kw = {"num_key_value_heads": 2, **ARCHS[arch], **overrides}
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=97, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                            **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # some architectures leave the 3-D experts at zero until loaded
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.1)
    return model


def _ids(n=4, length=12, seed=1):
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("arch", list(ARCHS))
def test_unfused_experts_give_the_fused_outputs(arch):
    model, ids = tiny_moe(arch), _ids()
    want = model(ids).logits
    fused = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert fused
    names = unfuse_experts(model)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(p.dim() == 3 for p in model.parameters())
    ex = model.get_submodule("model.layers.1.mlp.experts.3")
    assert isinstance(ex.down_proj, torch.nn.Linear) and ex.down_proj.out_features == 32
    storages = {p.untyped_storage().data_ptr() for p in fused.values()}
    assert ex.down_proj.weight.untyped_storage().data_ptr() in storages  # a view, not a copy


@torch.no_grad()
def test_expert_linears_see_only_their_routed_tokens():
    model, ids = tiny_moe(), _ids()
    routed = []
    gate = model.get_submodule("model.layers.0.mlp.gate")
    h = gate.register_forward_hook(lambda m, a, out: routed.append(out[-1]))  # (logits, weights, top-k index)
    unfuse_experts(model)
    lins = {f"e{e}": model.get_submodule(f"model.layers.0.mlp.experts.{e}.gate_up_proj") for e in range(4)}
    with collect_inputs(lins) as stats:
        model(ids)
    h.remove()
    top = routed[0]
    for e in range(4):
        assert stats[f"e{e}"].count == int((top == e).any(-1).sum())
    assert sum(stats[f"e{e}"].count for e in range(4)) == ids.numel() * 2


def test_compress_reaches_the_experts_and_leaves_the_model_as_it_was():
    model, ids = tiny_moe(), _ids(32, 16)  # ~256 tokens an expert, past every expert Linear's input width
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "3+-dim tensors stay dense" warning, no "few tokens" one
        small, report = rk.compress(model, {EXPERTS: {"method": "int4", "group_size": 32, "gptq": True}},
                                    calib=ids, progress=False)
    assert len(report.layers) == 2 * 4 * 2 and {r.method for r in report.layers} == {"int4"}
    assert fused_experts_names(model) and not fused_experts_names(small)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not shares_storage(small, model)
    for r in report.layers:  # each expert's own weight, GPTQ'd on the tokens routed to it
        layer, e = small.get_submodule(r.name), int(r.name.split(".")[5])
        w = getattr(model.get_submodule(r.name.rsplit(".", 2)[0]), r.name.rsplit(".", 1)[1])[e].detach()
        assert type(layer).__name__ == "Int4Linear"
        err = float((layer.to_dense().detach() - w).norm() / w.norm())
        assert err == pytest.approx(r.weight_error, rel=1e-3) and err < 0.25
        assert r.output_error < 0.85 * r.weight_error  # GPTQ trades weight error for the routed outputs' (RTN: ≥ 0.88)
    with torch.no_grad():
        ref, got = model(ids).logits, small(ids).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.3


def test_compressed_experts_save_and_load(tmp_path):
    model, ids = tiny_moe("qwen3_moe"), _ids(8, 16)
    # down projections int8, the rest of the experts stay dense Linears: both must come back
    small, _ = rk.compress(model, {"{blocks}.*.mlp.experts.*.down_proj": "int8"}, calib=ids, progress=False)
    rk.save_compressed(small, tmp_path / "ck")
    back = rk.load_pretrained(tmp_path / "ck")
    assert isinstance(back.get_submodule("model.layers.0.mlp.experts"), UnfusedExperts)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits, rtol=0, atol=0)


def test_default_recipe_compresses_a_moe_model():
    model, ids = tiny_moe(), _ids(8, 16)
    small, report = rk.compress(model, "default", calib=ids, progress=False)
    names = {r.name for r in report.layers}
    assert any(".mlp.experts." in n for n in names) and any("self_attn" in n for n in names)
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()


def test_experts_no_calibration_token_reached_are_built_without_statistics():
    model = tiny_moe(num_local_experts=8, num_experts_per_tok=1)
    ids = _ids(1, 3)  # 3 tokens, one of 8 experts each: 5+ experts a layer see none
    rule = {"method": "int4", "group_size": 32, "gptq": True}
    with pytest.warns(UserWarning, match="no calibration token reached"):
        small, report = rk.compress(model, {EXPERTS: rule}, calib=ids, progress=False)
    assert report.uncalibrated and all(".mlp.experts." in n for n in report.uncalibrated)
    built = {r.name: r.settings for r in report.layers}
    assert all(built[n]["gptq"] is False for n in report.uncalibrated)  # what they were built with
    assert small.get_submodule(report.uncalibrated[0])._reparam_settings["gptq"] is False
    for name in report.uncalibrated:  # round to nearest, as without calibration data
        e, proj = int(name.split(".")[5]), name.rsplit(".", 1)[1]
        w = getattr(model.get_submodule(name.rsplit(".", 2)[0]), proj)[e].detach()
        want = Int4Linear.from_linear(linear_from(w), group_size=32)
        torch.testing.assert_close(small.get_submodule(name).to_dense(), want.to_dense(), rtol=0, atol=0)
    assert all(n.endswith(".down_proj") for n in report.uncalibrated)  # the up projections: pooled (next test)
    with torch.no_grad():
        assert torch.isfinite(small(_ids()).logits).all()


def test_unreached_experts_up_projections_take_their_siblings_pooled_inputs():
    """Every expert of a block reads the block's hidden states (the router picks rows): an expert no calibration
    token reached gets its gate_up GPTQ'd on the pooled inputs of its siblings — with one expert a token, every
    token of the block once — and is listed in report.pooled, not as uncalibrated."""
    from reparam_kernels.compress.calib import CalibStats

    model = tiny_moe(num_local_experts=8, num_experts_per_tok=1)
    ids = _ids(1, 3)
    seen = []
    h = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        model(ids)
    h.remove()
    rule = {"method": "int4", "group_size": 32, "gptq": True}
    with pytest.warns(UserWarning, match="no calibration token reached"):
        small, report = rk.compress(model, {EXPERTS: rule}, calib=ids, progress=False)
    assert report.pooled and all(n.endswith(".gate_up_proj") for n in report.pooled)
    assert not set(report.pooled) & set(report.uncalibrated)
    layer0 = [n for n in report.pooled if n.startswith("model.layers.0.")]
    assert layer0
    built = {r.name: r.settings for r in report.layers}
    pool = CalibStats.from_inputs(seen[0])  # layer 0's MoE inputs: the original model's (its attention kept)
    for name in layer0:
        assert built[name]["gptq"] is True
        e = int(name.split(".")[5])
        w = model.model.layers[0].mlp.experts.gate_up_proj[e].detach()
        want = Int4Linear.from_linear(linear_from(w), group_size=32, calib=pool)
        torch.testing.assert_close(small.get_submodule(name).to_dense(), want.to_dense(), rtol=1e-5, atol=1e-6)


def test_the_docs_recipe_quantizes_the_experts_only():
    model, ids = tiny_moe(), _ids(8, 16)
    recipe = {"{blocks}.*.mlp.experts.*.down_proj": "int8",  # docs/compression.md § Mixture-of-experts models
              "{blocks}.*.mlp.experts.*": {"method": "int4", "gptq": True}}
    small, report = rk.compress(model, recipe, calib=ids, progress=False)
    methods = {r.name: r.method for r in report.layers}
    assert len(methods) == 2 * 4 * 2 and not any("self_attn" in n for n in methods)
    assert all(m == ("int8" if n.endswith("down_proj") else "int4") for n, m in methods.items())


def test_default_recipe_on_a_moe_model_with_a_device_gives_the_same_model(monkeypatch):
    """compress(device=) moves one block at a time (the planning passes too); a CPU "device" takes that path
    when same_device says no (test_fisher_blockwise.py)."""
    from reparam_kernels.compress import blocks, pipeline

    model, ids = tiny_moe(), _ids(8, 16)
    monkeypatch.setattr(blocks, "same_device", lambda a, b: False)
    monkeypatch.setattr(pipeline, "same_device", lambda a, b: False)
    away, rep_away = rk.compress(model, "default", calib=ids, progress=False, device="cpu")
    monkeypatch.setattr(blocks, "same_device", lambda a, b: True)
    monkeypatch.setattr(pipeline, "same_device", lambda a, b: True)
    home, rep = rk.compress(model, "default", calib=ids, progress=False)
    assert [(r.name, r.settings) for r in rep_away.layers] == [(r.name, r.settings) for r in rep.layers]
    with torch.no_grad():
        torch.testing.assert_close(away(_ids()).logits, home(_ids()).logits, rtol=1e-4, atol=1e-4)


def test_distillation_trains_compressed_experts():
    teacher, ids = tiny_moe(), _ids(8, 16)
    student, _ = rk.compress(teacher, {EXPERTS: {"method": "lowrank", "ratio": 0.5}}, calib=ids, progress=False)
    hist = rk.distill(student, teacher, _ids(16, 16, seed=2), steps=20, lr=3e-3, batch_size=4, progress=False)
    assert hist["loss"][-1] < hist["loss"][0]


@torch.no_grad()
def test_unfused_experts_take_transformers_without_the_post_norm_flag():
    """transformers 5.17's experts (the H200 image's) have no has_post_expert_norm: unfusing read it and failed
    there; a missing flag now means its default (no norm), and the unfused experts still compute the same."""
    model = tiny_moe()
    fused = next(m for m in model.modules() if hasattr(m, "has_post_expert_norm"))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, model.config.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(fused.num_experts, generator=g)[:2] for _ in range(7)])
    w = torch.rand(7, 2, generator=g)
    want = fused(h, idx, w)  # (this release's own forward reads the flag: computed before it goes)
    del fused.has_post_expert_norm
    unfused = UnfusedExperts(fused)
    assert "post_expert_norm" not in unfused._modules
    torch.testing.assert_close(unfused(h, idx, w), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("flags", [dict(has_gate=False, has_post_expert_norm=True),
                                   dict(is_transposed=True, has_bias=True, is_concatenated=True)])
@torch.no_grad()
def test_unfused_experts_follow_transformers_layout_flags(flags):
    """Every layout flag of transformers' experts decorator, against its own batched implementation."""
    from types import SimpleNamespace

    from transformers.integrations.moe import use_experts_implementation

    hidden, ffn, n = 24, 40, 5
    gated = flags.get("has_gate", True)

    @use_experts_implementation(**flags)
    class Toy(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, self.act_fn = n, torch.nn.GELU()
            up, out = ("gate_up_proj", 2 * ffn) if gated else ("up_proj", ffn)
            shapes = {up: (n, out, hidden), "down_proj": (n, hidden, ffn)}
            for name, (e, o, i) in shapes.items():
                setattr(self, name, torch.nn.Parameter(torch.randn(e, i, o) if flags.get("is_transposed")
                                                       else torch.randn(e, o, i)))
                if flags.get("has_bias"):
                    setattr(self, name + "_bias", torch.nn.Parameter(torch.randn(e, o)))
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = torch.nn.LayerNorm(hidden)
                self.post_expert_norm.weight.normal_()

    toy = Toy(SimpleNamespace(_experts_implementation="batched_mm"))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, hidden, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g)
    want = toy(h, idx, w)
    unfused = UnfusedExperts(toy)
    torch.testing.assert_close(unfused(h, idx, w), want, rtol=1e-5, atol=1e-4)
    assert {n for n, _ in unfused.named_parameters()} >= {"0.down_proj.weight", "4.down_proj.weight"}


@torch.no_grad()
def test_upcycled_model_of_the_moe_benchmark_computes_what_the_dense_one_does():
    """benchmarks/quality_moe_upcycled.py measures on SmolLM2 upcycled into a Mixtral; its premise: the same
    outputs (Mixtral renormalizes the chosen experts' weights, and every expert is the MLP)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from quality_moe_upcycled import upcycle

    from test_compress_pipeline import tiny_llama

    dense = tiny_llama(seed=2)
    dense.config.head_dim = dense.config.hidden_size // dense.config.num_attention_heads
    moe = upcycle(dense, experts=4, top_k=2)
    assert fused_experts_names(moe)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


def test_compress_in_place_splits_the_model_itself():
    model, ids = tiny_moe(), _ids(8, 16)
    with torch.no_grad():
        want = model(ids).logits
    same, report = rk.compress(model, {"{blocks}.*.mlp.experts.0.*": "int8"}, calib=ids, inplace=True, progress=False)
    assert same is model and isinstance(model.get_submodule("model.layers.0.mlp.experts"), UnfusedExperts)
    assert len(report.layers) == 2 * 2  # expert 0's two Linears in each of the 2 blocks; the others stay dense
    assert type(model.get_submodule("model.layers.0.mlp.experts.1.down_proj")) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0.05, atol=0.05)


def test_global_ranks_give_experts_no_calibration_token_reached_the_uniform_ratio():
    """The loss estimate of an expert nothing was routed to is zero for lack of evidence, not because it is
    cheap: the global allocation would cut it to the smallest rank. It keeps the rule's own ratio instead."""
    model = tiny_moe(num_local_experts=8, num_experts_per_tok=1)
    with pytest.warns(UserWarning, match="no calibration token reached"):
        small, report = rk.compress(model, "default", calib=_ids(1, 3), progress=False)
    layers = {r.name: r for r in report.layers}
    # block 0 only: the allocation routes the dense model's hidden states, compression the compressed blocks'
    # outputs, so past block 0 the two passes may route a few tokens differently (an expert reached in one only)
    first = [n for n in report.uncalibrated if n.startswith("model.layers.0.")]
    assert first
    for name in first:  # pivoted factors: r·(out + in − r) parameters, as the allocation counts
        s, (o, i) = layers[name].settings, layers[name].shape
        assert "allocate" not in s and "ratio" not in s
        r = s["rank"]
        assert r % 8 == 0 and r * (o + i - r) <= 0.8 * o * i < (r + 8) * (o + i - r - 8)


def test_cli_dry_run_names_the_experts(tmp_path, capsys):
    from reparam_kernels.__main__ import main

    from test_distill_save import _tokenizer

    tiny_moe().save_pretrained(tmp_path / "moe")
    transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token="</s>").save_pretrained(tmp_path / "moe")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - match: '{blocks}.*.mlp.experts.*.down_proj'\n    method: int8\n")
    assert main(["compress", "--model", str(tmp_path / "moe"), "--recipe", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| int8 | - | 8 |" in out and "model.layers.0.mlp.experts.0.down_proj [32×64]" in out


def test_planning_helpers_on_fused_experts_say_how_to_split_them():
    from reparam_kernels.compress.allocate import allocate_ranks

    from reparam_kernels.compress.recipe import plan

    model = tiny_moe()
    with pytest.raises(ValueError, match="still fused .*unfuse_experts"):
        plan(model, {EXPERTS: "int8"}, has_calib=False)
    with pytest.raises(ValueError, match="still fused .*unfuse_experts"):
        allocate_ranks(model, _ids(4, 16), ["{blocks}.*.mlp.experts.*"], 0.2, progress=False)
    unfuse_experts(model)
    recipe = allocate_ranks(model, _ids(4, 16), ["{blocks}.*.mlp.experts.*"], 0.2, progress=False)
    assert recipe


@pytest.mark.gpu
def test_compressed_experts_on_the_gpu_match_the_cpu():
    """The experts' int4 layers through the GPU kernels (fp16), and a CPU model compressed block by block on
    the GPU (device=), against the CPU model."""
    model, ids = tiny_moe(), _ids(8, 16)
    recipe = {EXPERTS: {"method": "int4", "group_size": 32, "gptq": True}}
    small, rep = rk.compress(model, recipe, calib=ids, progress=False)
    away, rep_away = rk.compress(model, recipe, calib=ids, progress=False, device="cuda")
    assert all(p.device.type == "cpu" for p in away.parameters())
    assert [r.name for r in rep_away.layers] == [r.name for r in rep.layers]
    with torch.no_grad():
        want = small(ids).logits.double()
        got = small.to("cuda", torch.float16)(ids.cuda()).logits.double().cpu()
        assert float((got - want).norm() / want.norm()) < 2e-2
        got = away.to("cuda", torch.float16)(ids.cuda()).logits.double().cpu()
        assert float((got - want).norm() / want.norm()) < 5e-2  # GPTQ on the GPU: other rounding ties
