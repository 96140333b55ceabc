"""GPTQ onto codebooks of d-element sub-vectors (GPTVQ): compress/gptq_table.py with tables [L, E, d]."""
import pytest
import torch

from reparam_kernels.compress.gptq_table import gptq_table, gptq_vq, refit_tables
from reparam_kernels.compress.recipe import plan
from reparam_kernels.compress.vq import vq_dequantize, vq_quantize
from reparam_kernels.nn import LUTLinear


def _problem(seed, n=48, k=96, m=800):
    """A weight and inputs whose channels differ in energy and correlate (as an LLM's do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    mix = torch.eye(k, dtype=torch.float64) + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5
    scale = 0.2 + 3 * torch.rand(k, generator=g, dtype=torch.float64)
    x = (torch.randn(m, k, generator=g, dtype=torch.float64) * scale) @ mix
    return w, x, g


def _out_err(w, x, approx):
    return float(((w - approx) @ x.t()).pow(2).sum())


@pytest.mark.parametrize("d,bits,rows", [(2, 6, 48), (2, 5, 8), (3, 6, 48), (4, 6, 48)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptvq_codes_lower_the_output_error_below_the_nearest_vector(d, bits, rows, act_order):
    w, x, _ = _problem(d * 10 + bits)
    H = x.t() @ x
    codes, books = vq_quantize(w, d=d, bits=bits, rows_per_codebook=rows, input_energy=torch.diag(H))
    gcodes = gptq_table(w, H, books.double(), rows, act_order=act_order)
    assert gcodes.shape == codes.shape and gcodes.dtype == torch.long
    assert 0 <= int(gcodes.min()) and int(gcodes.max()) < 2 ** bits
    nearest = _out_err(w, x, vq_dequantize(codes, books, torch.float64))
    gptq = _out_err(w, x, vq_dequantize(gcodes, books, torch.float64))
    assert gptq < 0.9 * nearest, (gptq, nearest)


def test_with_uncorrelated_inputs_each_sub_vector_takes_its_energy_weighted_nearest():
    """H diagonal and no damping: no error reaches another column, and the metric ‖(w − c)·U⁻¹‖² is
    Σ_j H_jj (w_j − c_j)², so the codes are exactly the weighted nearest neighbours."""
    g = torch.Generator().manual_seed(3)
    n, k, d = 12, 30, 3
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    h = 0.1 + 5 * torch.rand(k, generator=g, dtype=torch.float64)
    books = torch.randn(2, 20, d, generator=g, dtype=torch.float64)
    for act_order in (True, False):
        codes = gptq_table(w, torch.diag(h), books, rows_per_table=6, damp=0.0, act_order=act_order)
        pts = w.reshape(n, k // d, 1, d)
        cands = books.repeat_interleave(6, 0)[:, None]  # [n, 1, E, d]
        expect = ((pts - cands) ** 2 * h.reshape(1, k // d, 1, d)).sum(-1).argmin(-1)
        assert torch.equal(codes, expect)


def test_a_single_sub_vector_takes_the_codebook_vector_of_least_output_error():
    """K = d and no damping: the metric ‖(w − c)·U⁻¹‖² is (w − c)·H·(w − c)ᵀ, the output error, exactly."""
    g = torch.Generator().manual_seed(4)
    n, d = 40, 3
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.randn(50, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    H = x.t() @ x
    books = torch.randn(1, 30, d, generator=g, dtype=torch.float64)
    diff = w[:, None, :] - books[0][None]  # [n, E, d]
    expect = torch.einsum("ned,df,nef->ne", diff, H, diff).argmin(1)
    assert torch.equal(gptq_table(w, H, books, rows_per_table=n, damp=0.0)[:, 0], expect)


@pytest.mark.parametrize("d,rows,e", [(2, 1, 5), (2, 3, 5), (3, 6, 5), (2, 3, 40), (3, 2, 30)])
def test_refit_codebooks_is_the_least_squares_solution(d, rows, e):
    """e·d ≤ 64 numbers a table: the direct solve; more: conjugate gradients (run here to convergence)."""
    g = torch.Generator().manual_seed(d + rows + e)
    n, k = 6, 24
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(70, k, generator=g, dtype=torch.float64) * (0.5 + torch.rand(k, generator=g, dtype=torch.float64))
    books = torch.randn(n // rows, e, d, generator=g, dtype=torch.float64)
    codes = torch.randint(0, e, (n, k // d), generator=g)
    new = refit_tables(w, x.t() @ x, codes, books, rows, ridge=1e-12, cg_iters=None if e * d <= 64 else 2000)
    assert new.shape == books.shape
    for t in range(n // rows):  # brute force: x·ŵ_nᵀ is linear in the codebook's e·d numbers
        A, b = [], []
        for r in range(t * rows, (t + 1) * rows):
            sel = torch.zeros(k, e * d, dtype=torch.float64)
            sel[torch.arange(k), codes[r].repeat_interleave(d) * d + torch.arange(k) % d] = 1
            A.append(x @ sel)
            b.append(x @ w[r])
        sol = torch.linalg.lstsq(torch.cat(A), torch.cat(b)[:, None]).solution[:, 0]
        used = torch.zeros(e, d, dtype=torch.bool)
        used[codes[t * rows:(t + 1) * rows].unique()] = True
        torch.testing.assert_close(new[t][used], sol.reshape(e, d)[used], rtol=1e-6, atol=1e-8)


def test_each_conjugate_gradient_step_lowers_the_error():
    w, x, g = _problem(12)
    H = x.t() @ x
    codes, books = vq_quantize(w, d=2, bits=6, rows_per_codebook=16, input_energy=torch.diag(H), iters=3)
    errs = [_out_err(w, x, vq_dequantize(codes, books, torch.float64))]
    for it in (1, 2, 4, 8):
        errs.append(_out_err(w, x, vq_dequantize(codes, refit_tables(w, H, codes, books, 16, cg_iters=it), torch.float64)))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_rounds_of_codes_and_refit_lower_the_error_further():
    w, x, _ = _problem(9)
    H = x.t() @ x
    codes, books = vq_quantize(w, d=2, bits=6, input_energy=torch.diag(H))
    c1, b1 = gptq_vq(w, H, books, 48, rounds=1)
    c0 = gptq_table(w, H, books.double(), 48)
    assert b1.shape == books.shape
    assert _out_err(w, x, vq_dequantize(c1, b1, torch.float64)) < _out_err(w, x, vq_dequantize(c0, books, torch.float64))


def test_lut_layer_with_calib_and_d2_beats_weighted_k_means():
    w, x, _ = _problem(11, n=32, k=128)
    lin = torch.nn.Linear(128, 32)
    with torch.no_grad():
        lin.weight.copy_(w.float())
    xf = x.float()
    kw = {"method": "vq", "bits": 6, "d": 2, "rows_per_codebook": 16}
    rtn = LUTLinear.from_linear(lin, input_energy=xf.pow(2).mean(0), **kw)
    cal = LUTLinear.from_linear(lin, calib=xf, **kw)
    assert cal.kernel == "vq_linear" and cal.codes.shape == (32, 64) and cal.codebooks.shape == (2, 64, 2)
    e_rtn, e_cal = (_out_err(w, x, m.to_dense().double()) for m in (rtn, cal))
    assert e_cal < 0.8 * e_rtn, (e_cal, e_rtn)
    with torch.no_grad():
        torch.testing.assert_close(cal(xf[:5]), xf[:5] @ cal.to_dense().t() + lin.bias, rtol=1e-4, atol=1e-4)


def test_recipes_take_gptq_with_d_above_one():
    model = torch.nn.Sequential(torch.nn.Linear(32, 8))
    plan(model, {"0": {"method": "vq", "d": 2, "bits": 8, "gptq": True}}, has_calib=True)
    with pytest.raises(ValueError, match="does not divide"):
        plan(model, {"0": {"method": "vq", "d": 3, "bits": 8, "gptq": True}}, has_calib=True)


def test_the_gptvq_recipe_compresses_a_llama_through_vq_linear():
    transformers = pytest.importorskip("transformers")
    import reparam_kernels as rk
    from reparam_kernels.compress.recipe import builtin_recipes

    assert "gptvq" in builtin_recipes()
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(1))
    small, _ = rk.compress(model, "gptvq", calib=ids, progress=False)
    layers = [m for n, m in small.named_modules() if n.endswith("_proj")]
    assert len(layers) == 7 and all(isinstance(m, LUTLinear) and m.kernel == "vq_linear" and m.d == 2 for m in layers)
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()


@pytest.mark.gpu
def test_on_the_gpu_gptvq_and_codebook_gradients_match_the_cpu():
    """gptq_vq on CUDA tensors reaches the CPU's output error; vq_linear's codebook gradient (the Python
    backward around the CUDA forward, pairs on the small-M path) matches the CPU's; the `gptvq` recipe
    compresses a model on the GPU and runs it in fp16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from reparam_kernels.ops.vq_linear import vq_linear

    w, x, g = _problem(5, n=128, k=96)
    H = x.t() @ x
    _, books = vq_quantize(w.float(), d=2, bits=6, rows_per_codebook=64)
    errs = []
    for dev in ("cpu", "cuda"):
        codes, b2 = gptq_vq(w.to(dev), H.to(dev), books.double().to(dev), rows_per_table=64)
        errs.append(_out_err(w, x, vq_dequantize(codes.cpu(), b2.cpu(), torch.float64)))
    assert errs[1] == pytest.approx(errs[0], rel=0.02), errs
    codes = torch.randint(0, 64, (128, 48), generator=g, dtype=torch.uint8)
    xs, gy = torch.randn(5, 96, generator=g), torch.randn(5, 128, generator=g)
    grads = []
    for dev in ("cpu", "cuda"):
        b = books.to(dev, torch.float16).requires_grad_(True)
        (vq_linear(xs.to(dev, torch.float16), codes.to(dev), b).float() * gy.to(dev)).sum().backward()
        grads.append(b.grad.float().cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)
    transformers = pytest.importorskip("transformers")
    import reparam_kernels as rk

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().cuda()
    ids = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    small, _ = rk.compress(model, "gptvq", calib=ids, progress=False)
    small = small.half()
    with torch.no_grad():
        ref, out = model.half()(ids).logits.float(), small(ids).logits.float()
    assert torch.isfinite(out).all() and (out - ref).norm() < 0.2 * ref.norm()  # 0.034 in fp32 on the CPU
