"""GPTQ onto lookup tables (compress/gptq_table.py) and LUTLinear.from_linear(calib=...)."""
import pytest
import torch

from reparam_kernels.compress import quantize as Q
from reparam_kernels.compress.recipe import plan
from reparam_kernels.compress.gptq_table import gptq_table, refit_scales, refit_tables
from reparam_kernels.nn import LUTLinear


def _problem(seed, n=40, k=96, m=600):
    """A weight and inputs whose channels differ in energy and correlate (as an LLM's do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mix = torch.eye(k, dtype=torch.float64) + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5
    x = (torch.randn(m, k, generator=g, dtype=torch.float64) * (0.2 + 3 * torch.rand(k, generator=g,
                                                                                    dtype=torch.float64))) @ mix
    return w, x, g


def _out_err(w, x, approx):
    return float(((w - approx) @ x.t()).pow(2).sum())


def _tables(w, g, e=16):
    """Per-row tables spanning each row's range, sorted (a stand-in for k-means centroids)."""
    lo, hi = w.min(1).values, w.max(1).values
    u = torch.rand(w.shape[0], e, generator=g, dtype=torch.float64).sort(1).values
    return lo[:, None] + (hi - lo)[:, None] * u


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_codes_lower_the_output_error_below_nearest_entry(act_order):
    w, x, g = _problem(0)
    T = _tables(w, g)
    nearest = (w[:, :, None] - T[:, None, :]).abs().argmin(-1)
    codes = gptq_table(w, x.t() @ x, T, act_order=act_order)
    assert codes.shape == w.shape and codes.dtype == torch.long and 0 <= int(codes.min()) <= int(codes.max()) < 16
    rtn, gptq = _out_err(w, x, T.gather(1, nearest)), _out_err(w, x, T.gather(1, codes))
    assert gptq < 0.9 * rtn, (gptq, rtn)


@pytest.mark.parametrize("rows_per_table", [1, 4])
def test_refit_tables_is_the_least_squares_solution(rows_per_table):
    w, x, g = _problem(1, n=8, k=48)
    T = _tables(w, g, e=6)[::rows_per_table]
    codes = torch.randint(0, 6, w.shape, generator=g)
    new = refit_tables(w, x.t() @ x, codes, T, rows_per_table)
    for t in range(T.shape[0]):  # brute force: the rows sharing table t, stacked, by lstsq in float64
        rows = range(t * rows_per_table, (t + 1) * rows_per_table)
        A = torch.cat([x @ torch.nn.functional.one_hot(codes[r], 6).to(torch.float64) for r in rows])
        b = torch.cat([x @ w[r] for r in rows])
        torch.testing.assert_close(new[t], torch.linalg.lstsq(A, b[:, None]).solution[:, 0], rtol=1e-5, atol=1e-7)


def test_an_entry_no_code_uses_keeps_its_value():
    w, x, g = _problem(2, n=6, k=32)
    T = _tables(w, g, e=5)
    codes = torch.randint(0, 4, w.shape, generator=g)  # entry 4 unused
    new = refit_tables(w, x.t() @ x, codes, T)
    torch.testing.assert_close(new[:, 4], T[:, 4], rtol=1e-6, atol=1e-9)


def test_refit_scales_is_the_least_squares_scale():
    w, x, g = _problem(3, n=5, k=40)
    z = Q.log_levels(4, torch.float64)[torch.randint(0, 16, w.shape, generator=g)]
    s = refit_scales(w, x.t() @ x, z)
    for i in range(5):
        a, b = x @ z[i], x @ w[i]
        assert float(s[i]) == pytest.approx(float(a @ b / (a @ a)), rel=1e-9)
    assert float(refit_scales(w[:1], x.t() @ x, torch.zeros(1, 40, dtype=torch.float64))[0]) == 1.0


def test_more_rounds_never_end_worse_than_one():
    from reparam_kernels.compress.gptq_table import gptq_log, gptq_vq

    w, x, g = _problem(6)
    H = x.t() @ x
    T = _tables(w, g)
    one, three = gptq_vq(w, H, T, rounds=1), gptq_vq(w, H, T, rounds=3)
    assert _out_err(w, x, three[1].gather(1, three[0])) <= _out_err(w, x, one[1].gather(1, one[0]))
    lv = Q.log_levels(4, torch.float64)
    (c1, s1), (c3, s3) = (gptq_log(w, H, w.abs().amax(1), lv, rounds=r) for r in (1, 3))
    assert _out_err(w, x, s3[:, None] * lv[c3]) <= _out_err(w, x, s1[:, None] * lv[c1])


def test_dead_inputs_are_handled():
    w, x, g = _problem(4)
    x[:, 5] = 0  # an input that never fires: H_55 = 0
    codes = gptq_table(w, x.t() @ x, _tables(w, g))
    assert codes.shape == w.shape


@pytest.mark.parametrize("method,kw", [("log", {}), ("vq", {"rows_per_codebook": 1}), ("vq", {"rows_per_codebook": 8}),
                                       ("vq", {})])
def test_lut_layer_with_calib_beats_round_to_nearest_on_its_inputs(method, kw):
    w, x, _ = _problem(5, n=32, k=128)
    lin = torch.nn.Linear(128, 32, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w.float())
    xf = x.float()
    energy = xf.pow(2).mean(0)
    rtn = LUTLinear.from_linear(lin, method=method, bits=4, input_energy=energy, **kw)
    cal = LUTLinear.from_linear(lin, method=method, bits=4, calib=xf, rounds=2, **kw)
    assert cal.uses_kernel and cal.codes.dtype == torch.uint8
    e_rtn, e_cal = (_out_err(w, x, m.to_dense().double()) for m in (rtn, cal))
    assert e_cal < 0.95 * e_rtn, (e_cal, e_rtn)
    with torch.no_grad():  # the forward decodes the same tables
        torch.testing.assert_close(cal(xf[:7]), xf[:7] @ cal.to_dense().t() + lin.bias, rtol=1e-4, atol=1e-4)


def test_settings_refused_clearly():
    lin = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="rounds"):
        LUTLinear.from_linear(lin, method="log", calib=torch.randn(50, 32), rounds=0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    for rule, match in [({"method": "log", "gptq_rounds": 2}, "give gptq"),
                        ({"method": "vq", "gptq": True, "weighted_grid": True}, "not with gptq"),
                        ({"method": "log", "gptq": True, "gptq_rounds": 0}, "gptq_rounds")]:
        with pytest.raises(ValueError, match=match):
            plan(model, {"0": rule}, has_calib=True)
    plan(model, {"0": {"method": "vq", "gptq": True, "gptq_rounds": 2}}, has_calib=True)
    with pytest.raises(ValueError, match="needs calibration data"):
        plan(model, {"0": {"method": "log", "gptq": True}}, has_calib=False)


def test_compress_with_lut_gptq_lowers_the_model_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    import reparam_kernels as rk

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for gptq in (False, True):
        rule = {"method": "vq", "bits": 4, "rows_per_codebook": 1, "gptq": gptq}
        small, _ = rk.compress(model, {"model.layers.*": rule}, calib=ids, progress=False)
        assert sum(isinstance(m, LUTLinear) for m in small.modules()) == 14
        with torch.no_grad():
            errs[gptq] = float((small(ids).logits - ref).pow(2).mean())
    assert errs[True] < errs[False], errs
    rk.save_compressed(small, tmp_path / "c")
    with rk.empty_weights():
        skeleton = transformers.LlamaForCausalLM(cfg)
    back = rk.load_compressed(skeleton, tmp_path / "c").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, small(ids).logits)


@pytest.mark.gpu
def test_on_the_gpu_codes_tables_and_table_gradients_match_the_cpu():
    """gptq_table / refit_tables on CUDA tensors reach the CPU's output error; the lut_linear kernel's table
    gradient (a Python backward around the CUDA forward) matches the CPU's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from reparam_kernels.compress.quantize import pack_int4
    from reparam_kernels.ops.lut_linear import lut_linear

    w, x, g = _problem(7, n=64, k=256)
    H = x.t() @ x
    T = _tables(w, g)
    errs = []
    for dev in ("cpu", "cuda"):
        codes = gptq_table(w.to(dev), H.to(dev), T.to(dev))
        t2 = refit_tables(w.to(dev), H.to(dev), codes, T.to(dev))
        errs.append(_out_err(w, x, t2.cpu().gather(1, codes.cpu())))
    assert errs[1] == pytest.approx(errs[0], rel=0.02), errs
    codes = pack_int4(torch.randint(0, 16, (64, 256), generator=g, dtype=torch.uint8))
    lut = torch.randn(8, 16, generator=g, dtype=torch.float32)
    xs, gy = torch.randn(5, 256, generator=g), torch.randn(5, 64, generator=g)
    grads = []
    for dev in ("cpu", "cuda"):
        t = lut.to(dev, torch.float16).requires_grad_(True)
        (lut_linear(xs.to(dev, torch.float16), codes.to(dev), t).float() * gy.to(dev)).sum().backward()
        grads.append(t.grad.float().cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)
