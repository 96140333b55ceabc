"""Fisher-weighted whitened SVD and global rank allocation (compress/fisher.py, compress/allocate.py)."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress import svd  # noqa: E402
from reparam_kernels.compress.allocate import allocate_ranks, choose_ranks, layer_spectra  # noqa: E402
from reparam_kernels.compress.fisher import channel_weights, output_fisher  # noqa: E402

from test_compress_pipeline import MLP, _ids, tiny_llama  # noqa: E402

ATTN = "model.layers.*.self_attn.*_proj"


def test_output_fisher_matches_autograd_on_the_outputs():
    model = tiny_llama(seed=3)
    ids = _ids(4, 16, seed=4)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    got = output_fisher(model, [ids[:2], ids[2:]], names)
    want = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    for b in ids.split(1):
        outs = {}
        hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in names]
        logits = model(input_ids=b).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for h in hs:
            h.remove()
        for n, g in zip(names, grads):
            want[n] += g.double().reshape(-1, g.shape[-1]).pow(2).sum(0)
    for n in names:
        torch.testing.assert_close(got[n], want[n] / ids.numel(), rtol=1e-5, atol=0)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients formed


def test_weighted_svd_minimizes_the_weighted_output_error():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    X = torch.randn(200, 30, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 30, dtype=torch.float64)
    d = torch.rand(40, generator=g, dtype=torch.float64) * 5 + 0.05

    def werr(u, v):
        return float(torch.linalg.norm((X @ (W - u @ v).t()) * d))

    uw, vw, sig = svd.whitened_svd(W, X, rank=7, out_weight=d, damping=1e-12)
    up, vp, _ = svd.whitened_svd(W, X, rank=7, damping=1e-12)
    # Eckart–Young in the weighted norm: the error is the tail of the weighted spectrum, and no worse than unweighted
    assert werr(uw, vw) == pytest.approx(float(sig[7:].pow(2).sum().sqrt()), rel=1e-6)
    assert werr(uw, vw) < werr(up, vp)
    uc, vc, _ = svd.whitened_svd(W, X, rank=7, out_weight=torch.full((40,), 3.0, dtype=torch.float64), damping=1e-12)
    torch.testing.assert_close(uc @ vc, up @ vp)  # a constant weight changes nothing
    with pytest.raises(ValueError, match="out_weight"):
        svd.whitened_svd(W, X, rank=7, out_weight=-d)


def test_choose_ranks_spends_the_budget_where_the_loss_estimate_drops_most():
    g = torch.Generator().manual_seed(6)
    shapes = {"a": (64, 64), "b": (32, 96), "c": (80, 40)}
    spectra = {n: (torch.rand(min(s), generator=g, dtype=torch.float64) * (i + 1) ** 3).sort(descending=True).values
               for i, (n, s) in enumerate(shapes.items())}
    ranks = choose_ranks(spectra, shapes, 0.4)
    dense = sum(o * i for o, i in shapes.values())
    cost = lambda rk: sum(shapes[n][0] * shapes[n][1] if r is None else r * sum(shapes[n]) for n, r in rk.items())  # noqa: E731
    loss = lambda rk: sum(0.0 if r is None else float(spectra[n][r:].sum()) for n, r in rk.items())  # noqa: E731
    assert cost(ranks) <= 0.6 * dense
    uniform = {n: svd.rank_for_ratio(*shapes[n], 0.4) for n in shapes}
    assert cost(uniform) <= 0.6 * dense
    assert loss(ranks) < loss(uniform)
    with pytest.raises(ValueError, match="ratio"):
        choose_ranks(spectra, shapes, 0.999)


@pytest.mark.parametrize("pivoted", [False, True])
def test_choose_ranks_are_multiples_of_8_from_16_on_and_keep_the_budget(pivoted):
    g = torch.Generator().manual_seed(7)
    shapes = {"a": (576, 576), "b": (1536, 576), "c": (576, 1536), "d": (40, 24)}
    spectra = {n: (torch.rand(min(s), generator=g, dtype=torch.float64) * (i + 1)).sort(descending=True).values
               for i, (n, s) in enumerate(shapes.items())}
    ranks = choose_ranks(spectra, shapes, 0.2, pivoted=pivoted)
    size = lambda n, r: r * (sum(shapes[n]) - (r if pivoted else 0))  # noqa: E731
    cost = sum(shapes[n][0] * shapes[n][1] if r is None else size(n, r) for n, r in ranks.items())
    assert cost <= 0.8 * sum(o * i for o, i in shapes.values())
    assert any(r is not None and r >= 16 for r in ranks.values())
    assert all(r is None or r < 16 or r % 8 == 0 for r in ranks.values()), ranks


def test_allocate_global_in_a_recipe_matches_allocate_ranks_and_keeps_the_budget():
    model = tiny_llama(seed=11, layers=2)
    ids = _ids(8, 32, seed=12)
    rule = {"method": "lowrank", "ratio": 0.4, "fisher": True, "allocate": "global"}
    out, rep = rk.compress(model, {ATTN: rule, MLP: rule}, calib=ids, progress=False)
    recipe = allocate_ranks(model, ids, [ATTN, MLP], 0.4, progress=False)
    mods = dict(model.named_modules())
    dense = sum(mods[r["match"]].weight.numel() for r in recipe["rules"])
    kept = sum(mods[r["match"]].weight.numel() if r["method"] == "skip" else r["rank"] * sum(mods[r["match"]].weight.shape)
               for r in recipe["rules"])
    assert kept <= 0.6 * dense
    by = {l.name: l for l in rep.layers}
    assert len(by) == 14 and abs(rep.totals()["param_reduction"] - (1 - kept / dense)) < 1e-9
    for r in recipe["rules"]:
        if r["method"] == "skip":
            assert by[r["match"]].method == "skip" and isinstance(out.get_submodule(r["match"]), torch.nn.Linear)
        else:
            assert out.get_submodule(r["match"]).rank == r["rank"]
    with torch.no_grad():
        assert torch.isfinite(out(ids).logits).all()


def test_allocation_and_fisher_settings_are_validated():
    model = tiny_llama(seed=1)
    ids = _ids()
    with pytest.raises(ValueError, match="allocate"):
        rk.compress(model, {MLP: {"method": "lowrank", "rank": 4, "allocate": "global"}}, calib=ids, progress=False)
    with pytest.raises(ValueError, match="allocate"):
        rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.2, "allocate": "best"}}, calib=ids, progress=False)
    with pytest.raises(ValueError, match="fisher"):
        rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.2, "whiten": False, "fisher": True}},
                    calib=ids, progress=False)
    with pytest.raises(ValueError, match="same `ratio`"):
        rk.compress(model, {MLP: {"method": "lowrank", "ratio": 0.2, "allocate": "global"},
                            ATTN: {"method": "lowrank", "ratio": 0.3, "allocate": "global"}}, calib=ids, progress=False)


def test_layer_spectra_are_the_weighted_whitened_singular_values():
    model = tiny_llama(seed=2, layers=2)
    ids = _ids(6, 24, seed=3)
    name = "model.layers.1.mlp.up_proj"
    fisher = output_fisher(model, [ids], [name])
    spec = layer_spectra(model, [ids], [name], fisher, progress=False)[name]
    X = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: X.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    _, _, sig = svd.whitened_svd(model.get_submodule(name).weight, X[0], rank=1,
                                 out_weight=channel_weights(fisher[name]))
    torch.testing.assert_close(spec[: sig.numel()].float(), sig.pow(2).float(), rtol=1e-3, atol=1e-6 * float(spec[0]))


def test_lowrank_int4_with_global_allocation_quantizes_every_layer():
    from reparam_kernels.compress.methods import group_near
    from reparam_kernels.nn.factored import FactoredLinear

    model = tiny_llama(seed=13, layers=2, hidden=64, ffn=96)
    ids = _ids(8, 32, seed=14)
    rule = {"method": "lowrank_int4", "ratio": 0.2, "fisher": True, "allocate": "global"}
    out, rep = rk.compress(model, {ATTN: rule, MLP: rule}, calib=ids, progress=False)
    kinds = {type(out.get_submodule(l.name)).__name__ for l in rep.layers}
    assert kinds <= {"FactoredLinear", "Int4Linear"} and len(rep.layers) == 14  # nothing left in fp32
    for l in rep.layers:
        m = out.get_submodule(l.name)
        if isinstance(m, FactoredLinear):
            assert m.rank % 32 == 0 and m.second.group_size == group_near(m.rank)
        assert l.output_error < 0.6
    with torch.no_grad():
        assert torch.isfinite(out(ids).logits).all()
    assert group_near(576) == 96 and group_near(1536) == 128 and group_near(224) == 224 and group_near(64) == 64
    assert group_near(48) is None


def test_lowrank_int4_refits_u_to_the_quantized_v():
    from reparam_kernels.compress.calib import CalibStats
    from reparam_kernels.compress.methods import get_method
    from reparam_kernels.nn.quant import Int4Linear

    g = torch.Generator().manual_seed(15)
    lin = torch.nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g) @ torch.diag(torch.linspace(0.05, 2, 128)))
    X = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)
    st = CalibStats.from_inputs(X)
    W = lin.weight.detach()
    err = lambda D: float(torch.linalg.norm(X @ (W - D.detach()).t()) / torch.linalg.norm(X @ W.t()))  # noqa: E731
    combo = get_method("lowrank_int4").build(lin, {"rank": 64, "whiten": True}, st)
    lowrank = get_method("lowrank").build(lin, {"rank": 64, "whiten": True}, st)
    # naive combination: round each factor of the same factorization to int4, no GPTQ, no refit
    v = torch.nn.Linear(128, 64, bias=False)
    u = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        v.weight.copy_(lowrank.v)
        u.weight.copy_(lowrank.u)
    naive = Int4Linear.from_linear(u, group_size=64).to_dense() @ Int4Linear.from_linear(v, group_size=128).to_dense()
    print("output error: low rank", err(lowrank.to_dense()), "naive int4 factors", err(naive),
          "calibrated", err(combo.to_dense()))
    assert combo.rank == 64 and err(combo.to_dense()) < 0.85 * err(naive)
    assert err(combo.to_dense()) < 2 * err(lowrank.to_dense())


def test_globally_allocated_model_saves_and_reloads_bit_identically(tmp_path):
    from reparam_kernels.compress import load_compressed, save_compressed

    model = tiny_llama(seed=21, layers=2)
    ids = _ids(8, 32, seed=22)
    rule = {"method": "lowrank", "ratio": 0.3, "fisher": True, "allocate": "global"}
    out, rep = rk.compress(model, {ATTN: rule, MLP: rule}, calib=ids, progress=False)
    with torch.no_grad():
        ref = out(ids).logits
    path = save_compressed(out, tmp_path / "ck")
    skeleton = tiny_llama(seed=99, layers=2)
    load_compressed(skeleton, path)
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, ref)
    assert any(l.method == "skip" for l in rep.layers)  # some layers stayed dense: those reload too
    for l in rep.layers:
        if l.method != "skip":
            assert skeleton.get_submodule(l.name).rank == out.get_submodule(l.name).rank


def test_int4_scale_and_zero_gradients_match_autograd_through_the_dequantized_weight():
    from reparam_kernels.ops.int4_linear import int4_linear
    from reparam_kernels.reference.int4_linear import dequantize_int4

    g = torch.Generator().manual_seed(31)
    n, k, gs = 24, 96, 32
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // gs, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    zeros = (torch.rand(n, k // gs, generator=g, dtype=torch.float64) * 15).requires_grad_(True)
    x = torch.randn(3, 5, k, generator=g, dtype=torch.float64)
    gy = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    (int4_linear(x, qweight, scales, zeros, gs) * gy).sum().backward()
    s2, z2 = scales.detach().clone().requires_grad_(True), zeros.detach().clone().requires_grad_(True)
    ((x @ dequantize_int4(qweight, s2, z2, gs, torch.float64).t()) * gy).sum().backward()
    torch.testing.assert_close(scales.grad, s2.grad)
    torch.testing.assert_close(zeros.grad, z2.grad)


@pytest.mark.parametrize("tables", [1, 4, 24])
def test_lut_table_gradients_match_autograd_through_the_decoded_weight(tables):
    from reparam_kernels.compress.quantize import pack_int4
    from reparam_kernels.ops.lut_linear import lut_linear
    from reparam_kernels.reference.lut_linear import dequantize_lut

    g = torch.Generator().manual_seed(32)
    n, k = 24, 96
    codes = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
    lut = torch.randn(tables, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(3, 5, k, generator=g, dtype=torch.float64)
    gy = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    (lut_linear(x, codes, lut) * gy).sum().backward()
    l2 = lut.detach().clone().requires_grad_(True)
    ((x @ dequantize_lut(codes, l2, torch.float64).t()) * gy).sum().backward()
    torch.testing.assert_close(lut.grad, l2.grad)
    assert torch.autograd.gradcheck(lambda t: lut_linear(x[0, :2], codes, t), (lut.detach().clone().requires_grad_(True),))


def test_distillation_trains_lut_tables_and_keeps_the_codes():
    model = tiny_llama(seed=19, layers=2, hidden=64, ffn=96)
    ids = _ids(8, 32, seed=20)
    out, _ = rk.compress(model, {MLP: {"method": "vq", "rows_per_codebook": 1, "gptq": True}}, calib=ids,
                         progress=False)
    q = out.model.layers[0].mlp.up_proj
    before = (q.lut.detach().clone(), q.codes.clone())
    rk.distill(out, model, ids, steps=3, lr=1e-2, progress=False)
    assert not torch.equal(q.lut.detach(), before[0]) and torch.equal(q.codes, before[1])
    assert not q.lut.requires_grad


def test_distillation_trains_int4_scales_of_a_lowrank_int4_model():
    model = tiny_llama(seed=17, layers=2, hidden=64, ffn=96)
    ids = _ids(8, 32, seed=18)
    out, _ = rk.compress(model, {MLP: {"method": "lowrank_int4", "ratio": 0.2}}, calib=ids, progress=False)
    q = out.model.layers[0].mlp.up_proj.second
    before = (q.scales.detach().clone(), q.qweight.clone())
    rk.distill(out, model, ids, steps=3, lr=1e-2, progress=False)
    assert not torch.equal(q.scales.detach(), before[0]) and torch.equal(q.qweight, before[1])
    assert not q.scales.requires_grad  # frozen again after distillation
