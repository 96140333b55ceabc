"""int4 / int8 mixed precision under one size budget: the `mean_bits` setting of int4 (compress/allocate_bits.py)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress.allocate_bits import (allocate_bits, choose_int8, deployed_bits, plan_int8,  # noqa: E402
                                                    quantization_loss)
from reparam_kernels.compress.calib import CalibStats  # noqa: E402
from reparam_kernels.compress.recipe import plan  # noqa: E402
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


def test_choose_int8_spends_the_budget_on_the_most_loss_per_bit():
    # name: (bits4, bits8, loss4, loss8, params) — equal sizes, so the largest savings win
    cands = {n: (450, 800, l4, 0.1, 100) for n, l4 in zip("abcde", (5.0, 1.0, 9.0, 3.0, 0.05))}
    assert choose_int8(cands, 4.5) == dict.fromkeys("abcde", False)
    two = choose_int8(cands, (3 * 450 + 2 * 800) / 500)
    assert {n for n, up in two.items() if up} == {"c", "a"}
    every = choose_int8(cands, 16)
    assert {n for n, up in every.items() if up} == set("abcd")  # e: int8 would cost more loss, stays int4
    per_bit = {"big": (4500, 8000, 20.0, 0.0, 1000), "small": (450, 800, 5.0, 0.0, 100)}  # 5/350 > 20/3500
    assert choose_int8(per_bit, (4500 + 800) / 1100) == {"big": False, "small": True}
    with pytest.raises(ValueError, match="int4 alone takes 4.500"):
        choose_int8(cands, 4.2)


def test_compress_with_mean_bits_keeps_the_budget_and_lowers_the_estimated_loss():
    model, ids = _model(), _ids(8, 32, seed=2)
    recipe = {ALL: {"method": "int4", "mean_bits": 6.0}}
    chosen, cands = plan_int8(model, plan(model, recipe, has_calib=True), list(ids.split(4)), progress=False)
    assert 0 < sum(chosen.values()) < len(chosen)
    bits = sum(c[1] if chosen[n] else c[0] for n, c in cands.items())
    assert bits <= 6.0 * sum(c[4] for c in cands.values())
    assert sum(c[3] if chosen[n] else c[2] for n, c in cands.items()) < sum(c[2] for c in cands.values())

    out, rep = rk.compress(model, recipe, calib=ids, progress=False)
    got = {r.name: r.method for r in rep.layers}
    assert got == {n: "int8" if up else "int4" for n, up in chosen.items()}
    for n, up in chosen.items():
        layer = out.get_submodule(n)
        assert isinstance(layer, Int8Linear if up else Int4Linear)
        assert "mean_bits" not in layer._reparam_settings
        assert deployed_bits(layer) == cands[n][1 if up else 0]
    # the report counts both ways: as stored (this model is fp32: scales at 32 bits) and as mean_bits does
    t = rep.totals()
    assert t["bits_per_weight_16bit"] == pytest.approx(bits / sum(c[4] for c in cands.values()))
    assert t["bits_per_weight"] > t["bits_per_weight_16bit"] + 0.1
    assert f"({t['bits_per_weight_16bit']:.2f} in fp16)" in rep.table()
    _, rep16 = rk.compress(model.to(torch.bfloat16), recipe, calib=ids, progress=False)
    t16 = rep16.totals()
    assert t16["bits_per_weight"] == t16["bits_per_weight_16bit"] <= 6.0 and "in fp16" not in rep16.table()


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
