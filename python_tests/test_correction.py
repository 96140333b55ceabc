"""Low-rank correction of the quantization error: CorrectedLinear and the recipe's correction_rank
(compress/correction.py)."""
import pytest
import torch
from torch import nn

import reparam_kernels as rk
from reparam_kernels.compress.calib import CalibStats
from reparam_kernels.compress.distill import compressed_parameters
from reparam_kernels.compress.serialize import empty_weights, load_compressed, save_compressed
from reparam_kernels.nn.corrected import CorrectedLinear
from reparam_kernels.nn.lowrank import LowRankLinear
from reparam_kernels.nn.quant import Int4Linear, Int8Linear, LUTLinear

transformers = pytest.importorskip("transformers")

from conftest import TOL, rel_err  # noqa: E402
from test_compress_pipeline import _ids, tiny_llama  # noqa: E402

ALL = "model.layers.*"


def _layer(seed=0, n=96, k=128):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, dtype=torch.float64)
    with torch.no_grad():
        # a weight with outliers and a decaying spectrum, inputs with uneven channel energies: the
        # error a correction can remove is not white noise
        lin.weight.copy_(torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.randn(8, k, generator=g,
                         dtype=torch.float64) / 8 + 0.05 * torch.randn(n, k, generator=g, dtype=torch.float64))
        lin.weight[:, :4] *= 6
        lin.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
    x = torch.randn(600, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64) * 3
    return lin, x


def _out_err(lin, w, x):
    w = w.detach()
    return float((x @ (lin.weight.detach() - w).t()).norm() / (x @ lin.weight.detach().t()).norm())


@pytest.mark.parametrize("make_base", [
    lambda lin: Int4Linear.from_linear(lin, group_size=32),
    lambda lin: Int8Linear.from_linear(lin),
    lambda lin: LUTLinear.from_linear(lin, method="log", bits=4),
])
def test_forward_is_base_plus_correction_against_float64(make_base):
    lin, x = _layer()
    layer = CorrectedLinear.from_linear(lin, make_base(lin), 12, calib=x)
    base, c = layer.base, layer.correction
    y = layer(x)
    assert torch.allclose(y, base(x) + x @ (c.u @ c.v).t(), rtol=1e-9, atol=1e-9)
    dense = x @ (base.to_dense() + c.u @ c.v).t() + lin.bias  # the kernels' references compute in fp32
    assert torch.allclose(y, dense, rtol=1e-5, atol=1e-5 * float(dense.detach().abs().max()))
    assert torch.allclose(layer.to_dense(), base.to_dense() + c.u @ c.v, atol=1e-12)
    assert layer.bias is base.bias and c.bias is None and layer.rank == 12


def test_correction_lowers_the_error_it_targets_and_full_rank_is_exact():
    lin, x = _layer(1)
    base = Int4Linear.from_linear(lin, group_size=32)
    errs = [_out_err(lin, base.to_dense(), x)]
    for r in (4, 16, 48):
        errs.append(_out_err(lin, CorrectedLinear.from_linear(lin, base, r, calib=x).to_dense(), x))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.6 * errs[0]
    # whitened by the inputs beats the plain SVD of the residual on those inputs; the plain one wins on weights
    plain = CorrectedLinear.from_linear(lin, base, 8).to_dense()
    white = CorrectedLinear.from_linear(lin, base, 8, calib=CalibStats.from_inputs(x)).to_dense()
    assert _out_err(lin, white, x) < _out_err(lin, plain, x)
    assert (lin.weight - plain).norm() < (lin.weight - white).norm()
    full = CorrectedLinear.from_linear(lin, base, 96).to_dense()
    assert torch.allclose(full, lin.weight, atol=1e-10)


def test_bad_parts_are_refused():
    lin, _ = _layer()
    base = Int8Linear.from_linear(lin)
    with pytest.raises(ValueError, match="`correction` must be a LowRankLinear"):
        CorrectedLinear(base, nn.Linear(128, 96, bias=False))
    with pytest.raises(ValueError, match="no bias"):
        CorrectedLinear(base, LowRankLinear(128, 96, 4, bias=True))
    with pytest.raises(ValueError, match="maps 128 → 96 features but `correction` 96 → 128"):
        CorrectedLinear(base, LowRankLinear(96, 128, 4, bias=False))


def _model():
    return tiny_llama(seed=5, hidden=64, ffn=96)


def test_compress_with_correction_lowers_the_output_error_and_reloads_bit_identically(tmp_path):
    model, ids = _model(), _ids(8, 32, seed=3)
    plain, rep0 = rk.compress(model, {ALL: {"method": "int4"}}, calib=ids, progress=False)
    out, rep = rk.compress(model, {ALL: {"method": "int4", "correction_rank": 8}}, calib=ids, progress=False)
    layers = {n: m for n, m in out.named_modules() if isinstance(m, CorrectedLinear)}
    assert len(layers) == len(rep.layers) == 14 and all(isinstance(m.base, Int4Linear) for m in layers.values())
    before = {r.name: r.output_error for r in rep0.layers}
    assert all(r.output_error < before[r.name] for r in rep.layers)
    assert all(r.params_after > next(p for p in rep0.layers if p.name == r.name).params_after for r in rep.layers)
    save_compressed(out, tmp_path / "ck")
    with empty_weights():
        skeleton = tiny_llama(seed=99, hidden=64, ffn=96)
    load_compressed(skeleton, tmp_path / "ck")
    for k, v in out.state_dict().items():
        assert torch.equal(skeleton.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(skeleton(ids[:2]).logits, out(ids[:2]).logits)


def test_iterated_and_fisher_weighted_corrections_build():
    model, ids = _model(), _ids(8, 32, seed=4)
    for extra in ({"correction_iters": 3}, {"fisher": True}, {"gptq": True}):
        out, rep = rk.compress(model, {ALL: {"method": "int4", "correction_rank": 8, **extra}}, calib=ids,
                               progress=False)
        assert all(isinstance(m, CorrectedLinear) for n, m in out.named_modules() if n.endswith("_proj"))
        assert all(0 < r.output_error < 0.5 for r in rep.layers), extra


def test_distill_trains_the_correction_and_scales_not_the_codes():
    model, ids = _model(), _ids(8, 32, seed=6)
    out, _ = rk.compress(model, {ALL: {"method": "int4", "correction_rank": 4}}, calib=ids, progress=False)
    layer = out.model.layers[0].mlp.down_proj
    trained = {id(p) for p in compressed_parameters(out)}
    assert {id(layer.correction.u), id(layer.correction.v), id(layer.base.scales)} <= trained
    codes, u = layer.base.qweight.clone(), layer.correction.u.detach().clone()
    rk.distill(out, model, ids, steps=3, lr=1e-2, progress=False)
    assert torch.equal(layer.base.qweight, codes) and not torch.equal(layer.correction.u, u)


@pytest.mark.parametrize("settings, match", [
    ({"correction_rank": -1}, "correction_rank"),
    ({"correction_rank": 2.5}, "correction_rank"),
    ({"correction_rank": 65}, r"0\.\.64"),
    ({"correction_rank": 4, "correction_iters": 0}, "correction_iters"),
    ({"fisher": True}, "give correction_rank > 0"),
    ({"correction_rank": 4, "mean_bits": 5.0}, "with mean_bits give 'auto'"),
    ({"correction_rank": "auto"}, "give mean_bits"),
])
def test_bad_correction_settings_are_refused_before_anything_changes(settings, match):
    model = _model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        rk.compress(model, {ALL: {"method": "int4", **settings}}, calib=_ids(4, 16), inplace=True, progress=False)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, CorrectedLinear) for m in model.modules())


def test_fisher_weighted_correction_needs_calibration():
    with pytest.raises(ValueError, match="calib"):
        rk.compress(_model(), {ALL: {"method": "int8", "correction_rank": 4, "fisher": True}}, progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 300])
def test_cuda_kernels_against_float64(dtype, m):
    """int4_linear + lowrank_linear on the GPU (odd N and rank) against the float64 effective weight."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    g = torch.Generator().manual_seed(m)
    torch.manual_seed(m)
    lin = nn.Linear(384, 200, dtype=torch.float32)
    x = torch.randn(m, 384, generator=g)
    layer = CorrectedLinear.from_linear(lin, Int4Linear.from_linear(lin, group_size=128), 13)
    layer = layer.to("cuda", dtype)
    xc = x.to("cuda", dtype)
    want = x.double() @ layer.to_dense().double().cpu().t() + layer.bias.double().cpu()
    assert rel_err(layer(xc).cpu(), want) <= TOL[dtype]
    graph_out = torch.zeros(m, 200, device="cuda", dtype=dtype)
    layer(xc)  # warm up outside the capture
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        graph_out.copy_(layer(xc))
    cuda_graph.replay()
    assert rel_err(graph_out.cpu(), layer(xc).cpu()) <= 1e-3  # split-K sums may add in another order
