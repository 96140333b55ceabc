"""compress(model, recipe, calib): recipes, validation, block-by-block calibration, report."""
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress import register_method  # noqa: E402
from reparam_kernels.compress.methods import METHODS  # noqa: E402
from reparam_kernels.nn import LowRankLinear  # noqa: E402


def tiny_llama(seed=0, layers=2, hidden=48, ffn=80):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n=6, length=24, seed=1):
    return torch.randint(0, 101, (n, length), generator=torch.Generator().manual_seed(seed))


MLP = "model.layers.*.mlp.*_proj"


def test_inplace_false_leaves_model_untouched_and_report_is_consistent():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, rep = rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.3}}, calib=_ids(), progress=False)
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert isinstance(out.model.layers[1].mlp.up_proj, LowRankLinear)
    assert len(rep.layers) == 6
    for layer in rep.layers:
        assert layer.params_after < 0.7 * layer.params_before + 1
        assert 0 < layer.output_error < 1 and 0 < layer.weight_error < 1
    t = rep.totals()
    assert t["params_before"] == sum(l.params_before for l in rep.layers)
    assert 0.3 <= t["param_reduction"] < 0.4
    json.dumps(rep.to_dict())
    assert "total (6 layers)" in rep.table()


def test_whitened_beats_plain_on_the_model_output():
    model = tiny_llama(seed=3)
    ids, held = _ids(8, 32, seed=4), _ids(4, 32, seed=5)
    with torch.no_grad():
        ref = model(held).logits
    errs = {}
    for whiten in (False, True):
        m, rep = rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.4, "whiten": whiten}}, calib=ids,
                             progress=False)
        with torch.no_grad():
            errs[whiten] = (torch.linalg.norm(m(held).logits - ref) / torch.linalg.norm(ref)).item()
        errs[(whiten, "layer")] = rep.totals()["mean_output_error"]
    print("logit error plain", errs[False], "whitened", errs[True])
    assert errs[(True, "layer")] < errs[(False, "layer")]
    assert errs[True] < errs[False]


def test_block_by_block_matches_hooks_on_the_compressed_model():
    """Block i's statistics are taken on the outputs of the already-compressed blocks < i."""
    model = tiny_llama(seed=6, layers=3)
    ids = _ids(4, 16, seed=7)
    recipe = {"model.layers.*.mlp.down_proj": {"method": "lowrank", "rank": 8}}
    out, rep = rk.compress(model, recipe, calib=ids, progress=False, batch_size=2)
    # recompute layer 2's input Gram on the compressed model and check the reported output error
    from reparam_kernels.compress.calib import collect_inputs
    from reparam_kernels.compress.svd import output_error
    dense = model.model.layers[2].mlp.down_proj
    probe = out.model.layers[2].mlp.down_proj
    with torch.no_grad(), collect_inputs({"p": probe}) as st:
        out(ids)
    got = output_error(dense.weight, probe.to_dense(), st["p"].gram)
    assert abs(got - rep.layers[2].output_error) < 1e-4


def test_lm_head_outside_blocks_and_data_free_methods():
    model = tiny_llama(seed=8)
    recipe = {"rules": [{"match": "lm_head", "method": "lowrank", "rank": 20},
                        {"match": "re:model\\.layers\\.0\\.self_attn\\.(q|k)_proj", "method": "lowrank",
                         "rank": 8, "whiten": False}]}
    out, rep = rk.compress(model, recipe, calib=_ids(), progress=False)
    assert isinstance(out.lm_head, LowRankLinear) and isinstance(out.model.layers[0].self_attn.k_proj, LowRankLinear)
    assert isinstance(out.model.layers[0].self_attn.v_proj, nn.Linear)
    assert {l.name for l in rep.layers} == {"lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    # data-free: no calibration needed with whiten=false; no output error then
    out2, rep2 = rk.compress(model, {MLP: {"method": "lowrank", "rank": 5, "whiten": False}}, progress=False)
    assert all(l.output_error is None for l in rep2.layers)


def test_recipe_files_yaml_and_json(tmp_path):
    model = tiny_llama()
    rules = {"rules": [{"match": MLP, "method": "lowrank", "energy": 0.9, "whiten": False}]}
    (tmp_path / "r.json").write_text(json.dumps(rules))
    (tmp_path / "r.yaml").write_text(f"rules:\n  - match: '{MLP}'\n    method: lowrank\n    energy: 0.9\n    whiten: false\n")
    a, _ = rk.compress(model, tmp_path / "r.json", progress=False)
    b, _ = rk.compress(model, str(tmp_path / "r.yaml"), progress=False)
    assert torch.equal(a.model.layers[0].mlp.up_proj.u, b.model.layers[0].mlp.up_proj.u)


@pytest.mark.parametrize("recipe, calib, match", [
    ({MLP: {"method": "magic"}}, None, "unknown method 'magic'"),
    ({"model.layers.*.attn_nothing": {"method": "skip"}}, None, "matches no nn.Linear"),
    ({MLP: {"method": "lowrank", "rank": 500, "whiten": False}}, None, "does not fit layer"),
    ({MLP: {"method": "lowrank", "ratio": 0.2, "bogus": 1}}, None, "takes no setting"),
    ({MLP: {"method": "lowrank", "ratio": 0.2}}, None, "`calib`"),
    ({MLP: {"method": "lowrank", "rank": 3, "ratio": 0.2, "whiten": False}}, None, "exactly one"),
    ({"rules": [], "x": 1}, None, "unknown top-level"),
    ({MLP: {"method": "int4", "group_size": 40}}, None, "group_size"),
    ({MLP: {"method": "lowrank", "rank": 3}}, torch.randn(2, 5), "`calib`"),
    ({MLP: {"method": "log", "bits": 3}}, None, "`bits` must be 4 or 8"),
    ({MLP: {"method": "vq", "d": 3}}, None, "down_proj.*`d` = 3 does not divide"),  # gate/up (in 48) would take it
    ({MLP: {"method": "lowrank", "rank": 3}}, torch.full((2, 5), 101), r"\[0, 101\) \(the model's vocabulary\)"),
    ({MLP: {"method": "lowrank", "rank": 3}}, [torch.zeros(1, 4, dtype=torch.long), -torch.ones(1, 4, dtype=torch.long)],
     "from -1 to -1"),
])
def test_recipe_errors_are_clear_and_change_nothing(recipe, calib, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        rk.compress(model, recipe, calib=calib, inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_registry_plugs_in_new_methods_and_reports_missing_layers():
    model = tiny_llama()

    def build_scaled(linear, settings, stats):
        new = nn.Linear(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(linear.weight * settings["scale"])
        new.to_dense = lambda: new.weight
        return new

    register_method("test_scaled", build_scaled, ("scale",))
    try:
        out, rep = rk.compress(model, {MLP: {"method": "test_scaled", "scale": 0.5}}, progress=False)
        assert abs(rep.layers[0].weight_error - 0.5) < 1e-6
    finally:
        del METHODS["test_scaled"]
    # a method whose layer module is missing says so
    with pytest.raises(ValueError, match="not available"):
        from reparam_kernels.compress.registry import layer_class
        layer_class("no_such_module", "X", "demo")


def test_quantized_and_combined_methods():
    model = tiny_llama(seed=9, hidden=64, ffn=96)  # widths that int4 groups of 32 divide
    ids = _ids()
    recipe = {"rules": [
        {"match": "model.layers.0.mlp.*", "method": "int4", "gptq": True},
        {"match": "model.layers.1.mlp.*", "method": "int8"},
        {"match": "model.layers.0.self_attn.*", "method": "lowrank_int4", "ratio": 0.3, "group_size": 32}]}
    from reparam_kernels.nn.factored import FactoredLinear
    out, rep = rk.compress(model, recipe, calib=ids, progress=False)
    by = {l.name: l for l in rep.layers}
    q = out.model.layers[0].self_attn.q_proj
    assert isinstance(q, FactoredLinear) and q.rank == 32  # rank 22 from the ratio, raised to one whole int4 group
    assert by["model.layers.0.mlp.up_proj"].bits_per_weight < 6
    assert by["model.layers.0.self_attn.q_proj"].output_error < 0.5
    with torch.no_grad():
        assert torch.isfinite(out(ids).logits).all()


def test_calib_random_draws_tokens_from_the_model_vocabulary():
    """calib="random": compress draws calib.random_tokens(model) (16 x 512 ids of the vocabulary, fixed seed,
    at most the model's positions)
    and calibrates on them, e.g. the data-free weighted grid of int4; a method that needs data without calib
    names the option; any other string is refused."""
    from reparam_kernels.compress.calib import random_tokens
    model = tiny_llama(seed=10, hidden=64, ffn=96)
    ids = random_tokens(model)
    assert ids.shape == (16, 64) and ids.dtype == torch.int64 and int(ids.max()) < 101  # 64 positions
    assert torch.equal(ids, random_tokens(model)) and not torch.equal(ids, random_tokens(model, seed=1))
    assert len(torch.unique(ids)) == 101  # the whole vocabulary is drawn from
    recipe = {MLP: {"method": "int4", "weighted_grid": True, "group_size": 32}}
    out, rep = rk.compress(model, recipe, calib="random", progress=False)
    same, _ = rk.compress(model, recipe, calib=ids, progress=False)
    plain, _ = rk.compress(model, {MLP: {"method": "int4", "group_size": 32}}, progress=False)
    up = [m.model.layers[1].mlp.up_proj for m in (out, same, plain)]
    assert torch.equal(up[0].qweight, up[1].qweight) and torch.equal(up[0].zeros, up[1].zeros)
    assert not torch.equal(up[0].zeros, up[2].zeros)
    assert all(l.output_error is not None for l in rep.layers)  # measured on the random tokens
    with pytest.raises(ValueError, match="calib='random'"):
        rk.compress(model, recipe, progress=False)
    with pytest.raises(ValueError, match="'random'"):
        rk.compress(model, recipe, calib="text", progress=False)


def test_weighted_grid_auto_uses_calibration_data_when_given():
    """weighted_grid defaults to 'auto': with calibration data round to nearest's grid search is weighted by the
    inputs' energies (the same as true), without it plain (the same as false); GPTQ is not affected; a value
    other than true / false / 'auto' is refused by name."""
    model = tiny_llama(seed=12, hidden=64, ffn=96)
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(3))

    def up(rule, calib):
        out, _ = rk.compress(model, {MLP: rule}, calib=calib, progress=False)
        return out.model.layers[1].mlp.up_proj

    for base in ({"method": "int4", "group_size": 32}, {"method": "vq", "bits": 4, "rows_per_codebook": 1},
                 {"method": "log", "bits": 4}):
        auto, on = up(base, ids), up({**base, "weighted_grid": True}, ids)
        off, free = up({**base, "weighted_grid": False}, ids), up(base, None)
        state = lambda m: {k: v for k, v in m.state_dict().items()}  # noqa: E731
        for k, v in state(auto).items():
            assert torch.equal(v, state(on)[k]) and torch.equal(state(off)[k], state(free)[k]), (base, k)
        assert any(not torch.equal(v, state(off)[k]) for k, v in state(auto).items()), base
    gptq = {"method": "int4", "group_size": 32, "gptq": True}
    a, b = up(gptq, ids), up({**gptq, "weighted_grid": False}, ids)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.zeros, b.zeros)
    with pytest.raises(ValueError, match="weighted_grid"):
        rk.compress(model, {MLP: {"method": "int4", "weighted_grid": "yes"}}, calib=ids, progress=False)


def test_refine_steps_auto_polishes_the_weighted_grid_only():
    """refine_steps 'auto' (the default): 5 rounds of least-squares polish where round to nearest's grid is
    weighted by input energy, none for the unweighted grid or GPTQ; an explicit value wins; others refused."""
    model = tiny_llama(seed=13, hidden=64, ffn=96)
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(4))

    def up(rule, calib=ids):
        out, _ = rk.compress(model, {MLP: {"method": "int4", "group_size": 32, **rule}}, calib=calib, progress=False)
        return out.model.layers[1].mlp.up_proj.state_dict()

    def same(a, b):
        return all(torch.equal(v, b[k]) for k, v in a.items())

    assert same(up({}), up({"refine_steps": 5})) and not same(up({}), up({"refine_steps": 0}))
    assert same(up({"weighted_grid": False}), up({"weighted_grid": False, "refine_steps": 0}))
    assert same(up({}, None), up({"refine_steps": 0}, None))
    assert same(up({"gptq": True}), up({"gptq": True, "refine_steps": 0}))
    with pytest.raises(ValueError, match="refine_steps"):
        rk.compress(model, {MLP: {"method": "int4", "refine_steps": "some"}}, calib=ids, progress=False)


def test_calib_random_warns_for_methods_that_need_text():
    """Random tokens stand in for text only for the input energies; whitened SVD, GPTQ and Fisher weights get a
    warning naming the rule, the data-free weighted grid none."""
    import warnings
    model = tiny_llama(seed=11, hidden=64, ffn=96)
    for rule, warned in [({"method": "int4", "weighted_grid": True, "group_size": 32}, False),
                         ({"method": "int4", "gptq": True, "group_size": 32}, True),
                         ({"method": "lowrank", "rank": 8}, True),  # whiten defaults to true
                         ({"method": "lowrank", "rank": 8, "whiten": False}, False)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rk.compress(model, {MLP: rule}, calib="random", progress=False)
        ours = [w for w in caught if "calib='random'" in str(w.message)]
        assert len(ours) == int(warned), rule
        if warned:
            assert MLP in str(ours[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # text calibration: no warning
        rk.compress(model, {MLP: {"method": "lowrank", "rank": 8}}, calib=torch.randint(0, 101, (4, 16)),
                    progress=False)


def test_default_recipe_file_matches_the_builtin_default():
    from pathlib import Path

    from reparam_kernels.compress.recipe import DEFAULT_RECIPE, parse_recipe

    path = Path(rk.__file__).parent / "recipes" / "default.yaml"
    assert [r.to_dict() for r in parse_recipe(path)] == [r.to_dict() for r in parse_recipe(DEFAULT_RECIPE)]


def test_builtin_recipes_by_name(tmp_path, monkeypatch):
    """compress(model, "int4") and --recipe int4 take the recipes shipped in reparam_kernels/recipes by name
    (setup.py's package_data puts them in the wheel); a file of that name wins; an unknown name lists them."""
    from reparam_kernels.compress.recipe import DEFAULT_RECIPE, builtin_recipes, parse_recipe
    from reparam_kernels.nn import Int4Linear, Int8Linear

    assert {"default", "int8", "int4", "int4-mixed", "int4-gptq"} <= set(builtin_recipes())
    assert [r.to_dict() for r in parse_recipe("default")] == [r.to_dict() for r in parse_recipe(DEFAULT_RECIPE)]
    assert [r.to_dict() for r in parse_recipe("int4-gptq")] == [
        {"match": "{blocks}.*", "method": "int4", "gptq": True}]
    model = tiny_llama(seed=13, hidden=64, ffn=96)
    for name, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        out, _ = rk.compress(model, name, progress=False)
        assert all(isinstance(m, cls) for n, m in out.named_modules() if n.endswith("_proj"))
    out, _ = rk.compress(model, "int4-mixed", calib="random", progress=False)  # mean_bits 5: some of each
    kinds = {type(m) for n, m in out.named_modules() if n.endswith("_proj")}
    assert kinds == {Int4Linear, Int8Linear}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int4").write_text("rules:\n  - match: 'model.layers.*.mlp.*'\n    method: int8\n")
    assert [r.method for r in parse_recipe("int4")] == ["int8"]
    with pytest.raises(ValueError, match="built-in recipe .*int4-gptq"):
        parse_recipe("int5")


def _tiny(arch):
    """Tiny random causal LMs whose blocks live under different names (none downloaded)."""
    t = transformers
    if arch == "llama":
        return tiny_llama(seed=2, hidden=64, ffn=96), "model.layers"
    if arch == "gpt2":  # Conv1D layers
        from test_compress_conv1d import tiny_gpt2
        return tiny_gpt2(), "transformer.h"
    torch.manual_seed(0)
    if arch == "opt":
        cfg = t.OPTConfig(vocab_size=101, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=64, max_position_embeddings=64)
        return t.OPTForCausalLM(cfg).eval(), "model.decoder.layers"
    cfg = t.GPTNeoXConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64)
    return t.GPTNeoXForCausalLM(cfg).eval(), "gpt_neox.layers"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_builtin_recipes_find_each_architectures_blocks(arch):
    """"{blocks}" in a pattern is the model's list of transformer blocks, so the built-in recipes (written
    with it) compress the same Linears whatever the architecture names them; lm_head stays dense."""
    from reparam_kernels.compress.recipe import builtin_recipes, is_conv1d, parse_recipe, plan

    assert all(r.pattern.startswith("{blocks}") for name in builtin_recipes() for r in parse_recipe(name))
    model, prefix = _tiny(arch)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)}
    inside = {n for n in linears if n.startswith(prefix + ".")}
    assert inside and linears - inside  # some Linears outside the blocks (lm_head)
    for name in ("default", "int8", "int4", "int4-gptq", "int4-mixed"):  # (gptvq's 64-row codebooks: too big here)
        assert set(plan(model, name, has_calib=True)) == inside, name
    assert set(plan(model, {"re:{blocks}\\.0\\..*": "int8"}, has_calib=False)) == {
        n for n in inside if n.startswith(prefix + ".0.")}
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    out, rep = rk.compress(model, "default", calib=ids, progress=False)
    assert {r.name for r in rep.layers} == inside and torch.isfinite(out(ids[:1]).logits).all()


def test_default_recipe_plans_as_the_two_llama_rules_it_replaced():
    """The default recipe was two rules (model.layers.*.self_attn.*_proj, model.layers.*.mlp.*_proj) with one
    global budget; "{blocks}.*" matches the same Linears of a Llama-style model, so the ranks are the same."""
    from reparam_kernels.compress.recipe import DEFAULT_RECIPE

    rule = {k: v for k, v in DEFAULT_RECIPE["rules"][0].items() if k != "match"}
    old = {"rules": [{"match": "model.layers.*.self_attn.*_proj", **rule}, {"match": MLP, **rule}]}
    model, ids = tiny_llama(seed=4, hidden=64, ffn=96), _ids(8, 16, seed=3)
    _, new_rep = rk.compress(model, "default", calib=ids, progress=False)
    _, old_rep = rk.compress(model, old, calib=ids, progress=False)
    assert sorted((r.name, r.method, r.settings.get("rank")) for r in new_rep.layers) == sorted(
        (r.name, r.method, r.settings.get("rank")) for r in old_rep.layers)
    assert any(r.method == "lowrank" for r in new_rep.layers)


def test_compress_says_when_3d_weights_stay_dense(recwarn):
    """Weights in tensors of 3+ dimensions that no method reaches stay dense, and compress says so rather than
    look like it compressed the whole model. transformers 5's fused experts are the exception: compress splits
    them into per-expert Linears first (test_experts.py), so a Mixtral gives no warning."""
    model = tiny_llama()
    model.model.bank = torch.nn.Module()
    model.model.bank.table = torch.nn.Parameter(torch.randn(4, 96, 96))  # not a transformers experts module
    with pytest.warns(UserWarning, match=r"weights are in 1 tensors of 3\+ dimensions .*bank\.table") as w:
        rk.compress(model, "int8", progress=False)
    assert w[0].filename == __file__  # attributed to the caller's line, not to compress's decorators
    cfg = transformers.MixtralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    torch.manual_seed(0)
    rk.compress(transformers.MixtralForCausalLM(cfg).eval(), "int8", progress=False)
    rk.compress(tiny_llama(), "int8", progress=False)
    assert not [w for w in recwarn if "3+ dimensions" in str(w.message)]


def test_blocks_in_a_pattern_needs_a_list_of_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no list of them"):
        rk.compress(model, {"{blocks}.*": "int8"}, progress=False)
    one = tiny_llama(layers=1)  # a list of one block is still the list of blocks
    from reparam_kernels.compress.recipe import plan
    assert len(plan(one, {"{blocks}.*": "int8"}, has_calib=False)) == 7


def test_the_copy_shares_only_what_it_replaces_and_ends_sharing_nothing():
    from reparam_kernels.compress.sharing_copy import copy_sharing, shares_storage

    model = tiny_llama()
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    twin = copy_sharing(model, names)
    for name, m in model.named_modules():
        t = twin.get_submodule(name)
        if name in names:
            assert t.weight is not m.weight and t.weight.data_ptr() == m.weight.data_ptr()
        elif isinstance(m, nn.Linear):
            assert not shares_storage(t, m)
    # a global allocation keeps some of the matched layers dense: they must not stay tied to the original
    before = {k: (v.clone(), v.device) for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    out, rep = rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.2, "allocate": "global"}},
                           calib=_ids(), progress=False, device="cpu")
    kept = [l.name for l in rep.layers if l.method == "skip"]
    assert kept and not shares_storage(out, model)
    assert all(p is params[n] for n, p in model.named_parameters())  # the original's objects, values, devices
    assert all(torch.equal(before[k][0], v) and before[k][1] == v.device for k, v in model.state_dict().items())
    with torch.no_grad():
        out.get_submodule(kept[0]).weight.add_(1.0)  # training the result leaves the original alone
    assert torch.equal(before[kept[0] + ".weight"][0], model.get_submodule(kept[0]).weight)


def test_compress_runs_float32_matmuls_in_full_precision():
    """A user's set_float32_matmul_precision("high") (TF32 on a GPU) is lifted while compressing, restored after."""
    model = tiny_llama(seed=14, hidden=64, ffn=96)
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(torch.get_float32_matmul_precision()))
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.3}}, calib=_ids(), progress=False, inplace=True)
        assert seen and set(seen) == {"highest"} and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_token_id_check_passes_over_a_model_without_a_known_embedding():
    from reparam_kernels.compress.blocks import check_token_ids

    class NoEmbedding(nn.Module):
        def get_input_embeddings(self):  # as transformers' base class does where it finds none
            raise NotImplementedError

    check_token_ids(NoEmbedding(), [torch.full((1, 3), 10 ** 6)], "calib")  # nothing to check against
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        check_token_ids(tiny_llama(), [torch.full((1, 3), 101)], "calib")
