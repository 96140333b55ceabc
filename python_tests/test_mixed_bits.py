"""int4 / int8 mixed precision under one size budget: the `mean_bits` setting of int4 (compress/allocate_bits.py)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress.allocate_bits import (allocate_bits, choose, correction_losses,  # noqa: E402
                                                    deployed_bits, plan_mixed, quantization_loss)
from reparam_kernels.compress.calib import CalibStats  # noqa: E402
from reparam_kernels.compress.recipe import plan  # noqa: E402
from reparam_kernels.nn.corrected import CorrectedLinear  # noqa: E402
from reparam_kernels.nn.quant import Int4Linear, Int8Linear  # noqa: E402

from test_compress_pipeline import _ids, tiny_llama  # noqa: E402

ALL = "model.layers.*"


def _model():
    return tiny_llama(seed=11, hidden=64, ffn=96)  # in_features multiples of 32, for int4 groups


def test_quantization_loss_is_the_fisher_weighted_output_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 32, generator=g)
    approx = w + 0.01 * torch.randn(12, 32, generator=g)
    x = torch.randn(50, 32, generator=g, dtype=torch.float64)
    fisher = torch.rand(12, generator=g, dtype=torch.float64)
    st = CalibStats(32)
    st.gram, st.count = x.t() @ x, 50
    want = 0.5 * float(((x @ (approx - w).double().t()) ** 2 * fisher).sum()) / 50
    assert quantization_loss(w, approx, fisher, st) == pytest.approx(want, rel=1e-4)


def _menus(cands):
    """menus from {name: (bits4, bits8, loss4, loss8, params)}: int4 (choice 0) or int8."""
    return {n: (p, {0: (b4, l4), "int8": (b8, l8)}) for n, (b4, b8, l4, l8, p) in cands.items()}


def test_choose_spends_the_budget_on_the_most_loss_per_bit():
    # name: (bits4, bits8, loss4, loss8, params) — equal sizes, so the largest savings win
    cands = {n: (450, 800, l4, 0.1, 100) for n, l4 in zip("abcde", (5.0, 1.0, 9.0, 3.0, 0.05))}
    assert choose(_menus(cands), 4.5) == dict.fromkeys("abcde", 0)
    two = choose(_menus(cands), (3 * 450 + 2 * 800) / 500)
    assert {n for n, c in two.items() if c == "int8"} == {"c", "a"}
    every = choose(_menus(cands), 16)
    assert {n for n, c in every.items() if c == "int8"} == set("abcd")  # e: int8 would cost more loss, stays int4
    per_bit = {"big": (4500, 8000, 20.0, 0.0, 1000), "small": (450, 800, 5.0, 0.0, 100)}  # 5/350 > 20/3500
    assert choose(_menus(per_bit), (4500 + 800) / 1100) == {"big": 0, "small": "int8"}
    with pytest.raises(ValueError, match="int4 alone takes 4.500"):
        choose(_menus(cands), 4.2)


def test_choose_walks_each_layers_convex_hull():
    # a: corrections with diminishing returns, then int8; b: a rank-8 step worth less per bit than rank 16's
    # (off b's hull: 0 → 16 saves 5 for 100 bits) and an int8 worse than its rank 16 (off the hull too)
    menus = {"a": (100, {0: (400, 10.0), 8: (450, 4.0), 16: (500, 2.0), "int8": (800, 0.5)}),
             "b": (100, {0: (400, 6.0), 8: (450, 5.5), 16: (500, 1.0), "int8": (800, 1.2)})}
    assert choose(menus, 4.0) == {"a": 0, "b": 0}
    assert choose(menus, 4.5) == {"a": 16, "b": 0}  # a 6/50, then b's 5/100 does not fit, a's 2/50 does
    assert choose(menus, 4.75) == {"a": 8, "b": 16}  # b's step fits; a's next no longer does
    assert choose(menus, 5.0) == {"a": 16, "b": 16}
    assert choose(menus, 8.0) == {"a": "int8", "b": 16}


def test_correction_losses_match_the_corrections_built():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    approx = w + 0.1 * torch.randn(24, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 40, generator=g,
                                                                                        dtype=torch.float64)
    approx += 0.01 * torch.randn(24, 40, generator=g, dtype=torch.float64)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) * torch.rand(40, generator=g, dtype=torch.float64)
    fisher = torch.rand(24, generator=g, dtype=torch.float64) + 0.1
    st = CalibStats.from_inputs(x)
    losses = correction_losses(w, approx, fisher, st, [0, 1, 4, 24])
    assert losses[0] == pytest.approx(quantization_loss(w, approx, fisher, st), rel=1e-6)
    assert losses[0] > 10 * losses[1] and losses[1] > losses[4] > 0 and losses[24] == pytest.approx(0, abs=1e-12)
    from reparam_kernels.compress.svd import whitened_svd
    u, v, _ = whitened_svd(w - approx, st, rank=4, out_weight=fisher.sqrt(), damping=1e-12)
    assert quantization_loss(w, approx + u @ v, fisher, st) == pytest.approx(losses[4], rel=1e-4)


def test_covariance_root_is_computed_once_per_set_of_inputs():
    g = torch.Generator().manual_seed(5)
    st = CalibStats.from_inputs(torch.randn(6, 10, generator=g, dtype=torch.float64))  # rank 6 of 10
    r = st.covariance_root("cpu")
    torch.testing.assert_close(r @ r.t(), st.gram / 6, atol=1e-6, rtol=1e-6)  # XᵀX summed from fp32
    assert st.covariance_root("cpu") is r  # q, k and v share the statistics and this eigh
    st.add(torch.randn(30, 10, generator=g, dtype=torch.float64))
    r2 = st.covariance_root("cpu")
    assert r2 is not r
    torch.testing.assert_close(r2 @ r2.t(), st.gram / 36, atol=1e-6, rtol=1e-6)


def test_compress_with_mean_bits_keeps_the_budget_and_lowers_the_estimated_loss():
    model, ids = _model(), _ids(8, 32, seed=2)
    recipe = {ALL: {"method": "int4", "mean_bits": 6.0}}
    chosen, menus = plan_mixed(model, plan(model, recipe, has_calib=True), list(ids.split(4)), progress=False)
    assert 0 < sum(c == "int8" for c in chosen.values()) < len(chosen) and set(chosen.values()) <= {0, "int8"}
    bits = sum(menus[n][1][c][0] for n, c in chosen.items())
    assert bits <= 6.0 * sum(p for p, _ in menus.values())
    assert sum(menus[n][1][c][1] for n, c in chosen.items()) < sum(o[0][1] for _, o in menus.values())

    out, rep = rk.compress(model, recipe, calib=ids, progress=False)
    got = {r.name: r.method for r in rep.layers}
    assert got == {n: "int8" if c == "int8" else "int4" for n, c in chosen.items()}
    for n, c in chosen.items():
        layer = out.get_submodule(n)
        assert isinstance(layer, Int8Linear if c == "int8" else Int4Linear)
        assert "mean_bits" not in layer._reparam_settings
        assert deployed_bits(layer) == menus[n][1][c][0]
    # the report counts both ways: as stored (this model is fp32: scales at 32 bits) and as mean_bits does
    t = rep.totals()
    assert t["bits_per_weight_16bit"] == pytest.approx(bits / sum(p for p, _ in menus.values()))
    assert t["bits_per_weight"] > t["bits_per_weight_16bit"] + 0.1
    assert f"({t['bits_per_weight_16bit']:.2f} in fp16)" in rep.table()
    _, rep16 = rk.compress(model.to(torch.bfloat16), recipe, calib=ids, progress=False)
    t16 = rep16.totals()
    assert t16["bits_per_weight"] == t16["bits_per_weight_16bit"] <= 6.0 and "in fp16" not in rep16.table()


def _wide_model():
    """Layers wide enough for rank-8 corrections to cost less than int8 (1 bit per weight at 256 × 256), and a
    few heavy input channels, as trained LLMs have (where round to nearest's error is expensive)."""
    model = tiny_llama(seed=3, hidden=256, ffn=384)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 30
            layer.post_attention_layernorm.weight[:4] *= 30
    return model


def test_mean_bits_chooses_corrections_with_correction_rank_auto():
    model, ids = _wide_model(), _ids(8, 32, seed=2)
    recipe = {ALL: {"method": "int4", "mean_bits": 5.0, "correction_rank": "auto"}}
    chosen, menus = plan_mixed(model, plan(model, recipe, has_calib=True), list(ids.split(4)), progress=False)
    ranks = [c for c in chosen.values() if c != "int8"]
    assert 0 in ranks and any(r > 0 for r in ranks) and all(r % 8 == 0 for r in ranks)
    params = sum(p for p, _ in menus.values())
    assert sum(menus[n][1][c][0] for n, c in chosen.items()) <= 5.0 * params
    plain = choose({n: (p, {c: o[c] for c in (0, "int8")}) for n, (p, o) in menus.items()}, 5.0)
    loss = sum(menus[n][1][c][1] for n, c in chosen.items())
    assert loss < 0.9 * sum(menus[n][1][c][1] for n, c in plain.items())  # the corrections pay for their bits

    out, rep = rk.compress(model, recipe, calib=ids, progress=False)
    for n, c in chosen.items():
        layer = out.get_submodule(n)
        if c == "int8":
            assert isinstance(layer, Int8Linear)
        elif c:
            assert isinstance(layer, CorrectedLinear) and layer.rank == c and layer._reparam_settings["fisher"]
        else:
            assert isinstance(layer, Int4Linear)
        assert deployed_bits(layer) == menus[n][1][c][0]
    assert rep.totals()["bits_per_weight_16bit"] == pytest.approx(
        sum(menus[n][1][c][0] for n, c in chosen.items()) / params)
    written = allocate_bits(model, ids, ALL, 5.0, progress=False, correction_rank="auto")
    via, _ = rk.compress(model, written, calib=ids, progress=False)
    x = _ids(2, 16, seed=6)
    torch.testing.assert_close(via(input_ids=x).logits, out(input_ids=x).logits, rtol=0, atol=0)


def test_allocate_bits_writes_out_the_choice_compress_makes():
    model, ids = _model(), _ids(8, 32, seed=5)
    recipe = allocate_bits(model, ids, ALL, 5.5, progress=False)
    direct, rep = rk.compress(model, {ALL: {"method": "int4", "mean_bits": 5.5}}, calib=ids, progress=False)
    assert [(r["match"], r["method"]) for r in recipe["rules"]] == [(r.name, r.method) for r in rep.layers]
    via, _ = rk.compress(model, recipe, calib=ids, progress=False)
    x = _ids(2, 16, seed=6)
    torch.testing.assert_close(via(input_ids=x).logits, direct(input_ids=x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="match no"):
        allocate_bits(model, ids, "nothing.*", 5.5)


def test_mean_bits_checkpoint_reloads_bit_identical(tmp_path):
    model, ids = _model(), _ids(8, 32, seed=3)
    out, _ = rk.compress(model, {ALL: {"method": "int4", "mean_bits": 5.5}}, calib=ids, progress=False)
    rk.save_compressed(out, tmp_path / "ck")
    skeleton = rk.load_compressed(_model(), tmp_path / "ck")
    x = _ids(2, 16, seed=4)
    torch.testing.assert_close(skeleton(input_ids=x).logits, out(input_ids=x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("rules, calib, match", [
    ({ALL: {"method": "int4", "mean_bits": 5}}, None, "calib"),
    ({ALL: {"method": "int4", "mean_bits": 3}}, "ids", "mean_bits"),
    ({ALL: {"method": "int4", "mean_bits": "5"}}, "ids", "mean_bits"),
    ({ALL: {"method": "int4", "mean_bits": 4.01}}, "ids", "int4 alone takes"),
    ({"model.layers.0.*": {"method": "int4", "mean_bits": 5}, "model.layers.1.*": {"method": "int4", "mean_bits": 6}},
     "ids", "same value"),
])
def test_bad_mean_bits_is_refused_before_anything_changes(rules, calib, match):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        rk.compress(model, rules, calib=_ids(4, 16) if calib else None, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
