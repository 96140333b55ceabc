"""Int8Linear, Int4Linear, LUTLinear: from_linear / to_dense / forward, GPTQ path, fallbacks, compile."""
import pytest
import torch

from reparam_kernels import _dispatch
from reparam_kernels.nn import Int4Linear, Int8Linear, LUTLinear
from conftest import rel_err


def make_linear(rng, k=128, n=48, bias=True, dtype=torch.float32):
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) / k ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=rng))
    return lin.to(dtype)


# tol bounds the relative output error against the original layer: ~7 or more standard deviations above
# its mean over fresh draws (150 draws without bias, where it is largest: int8 0.0065 ± 0.0003, int4 g32
# 0.072 ± 0.003, g64 sym 0.108 ± 0.005, log4 0.180 ± 0.007, vq b4 0.100 ± 0.006, vq b3 0.188 ± 0.008)
LAYERS = [
    ("int8", lambda lin: Int8Linear.from_linear(lin), 0.01),
    ("int4 g32 asym", lambda lin: Int4Linear.from_linear(lin, group_size=32), 0.12),
    ("int4 g64 sym", lambda lin: Int4Linear.from_linear(lin, group_size=64, symmetric=True), 0.15),
    ("log4", lambda lin: LUTLinear.from_linear(lin, method="log", bits=4), 0.35),
    ("vq d1 b4", lambda lin: LUTLinear.from_linear(lin, method="vq", bits=4, iters=10), 0.14),
    ("vq d1 b3 per 8 rows", lambda lin: LUTLinear.from_linear(lin, method="vq", bits=3, rows_per_codebook=8, iters=10), 0.25),
]


@pytest.mark.parametrize("name,build,tol", LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_and_original(rng, name, build, tol, bias):
    lin = make_linear(rng, bias=bias)
    layer = build(lin)
    x = torch.randn(3, 5, 128, generator=rng)
    y = layer(x)
    dense = torch.nn.functional.linear(x.double(), layer.to_dense().double(),
                                       None if lin.bias is None else lin.bias.double())
    assert y.shape == (3, 5, 48)
    assert rel_err(y, dense) <= 1e-5  # the op computes exactly the layer's dense weight
    assert rel_err(y, lin(x).detach()) <= tol  # and that weight is close to the original
    assert rel_err(layer.to_dense(), lin.weight.detach()) <= tol * 1.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_layers_keep_dtype(rng, dtype):
    lin = make_linear(rng, dtype=dtype)
    x = torch.randn(4, 128, generator=rng).to(dtype)
    for layer in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, group_size=128),
                  LUTLinear.from_linear(lin, method="log")):
        y = layer(x)
        assert y.dtype == dtype and layer.to_dense().dtype == dtype
        ref = x.double() @ layer.to_dense().double().t() + lin.bias.double()
        assert rel_err(y, ref) <= (5e-3 if dtype == torch.float16 else 2e-2)


def test_int4_gptq_layer_beats_rtn_on_its_calibration_distribution(rng):
    k = 256
    lin = make_linear(rng, k=k, n=64)
    mix = torch.randn(k, k, generator=rng) / k ** 0.5 + 0.3 * torch.eye(k)
    calib = torch.randn(1024, k, generator=rng) @ mix
    x = torch.randn(256, k, generator=rng) @ mix
    y = lin(x).detach()
    e_gptq = rel_err(Int4Linear.from_linear(lin, group_size=128, calib=calib)(x), y)
    e_rtn = rel_err(Int4Linear.from_linear(lin, group_size=128)(x), y)
    print(f"Int4Linear g128 output rel. error: GPTQ {e_gptq:.4f}, RTN {e_rtn:.4f}")
    assert e_gptq < 0.85 * e_rtn


def test_int8_gptq_layer(rng):
    lin = make_linear(rng)
    calib = torch.randn(512, 128, generator=rng)
    layer = Int8Linear.from_linear(lin, calib=calib)
    assert layer.qweight.dtype == torch.int8
    x = torch.randn(6, 128, generator=rng)
    assert rel_err(layer(x), lin(x).detach()) <= 0.01


@pytest.mark.parametrize("kw", [dict(method="vq", d=2, bits=10, iters=2), dict(method="vq", d=1, bits=9, iters=2)])
def test_lut_fallback_settings_warn_and_stay_correct(rng, kw):
    """Codes of more than 8 bits (int16) have no kernel: the dense weight, with a warning."""
    lin = make_linear(rng)
    layer = LUTLinear.from_linear(lin, **kw)
    assert not layer.uses_kernel
    x = torch.randn(3, 128, generator=rng)
    _dispatch._WARNED.discard(("LUTLinear", layer.bits, layer.d))  # warned once a process: maybe already
    with pytest.warns(RuntimeWarning, match="more than 8 bits"):
        y = layer(x)
    dense = x.double() @ layer.to_dense().double().t() + lin.bias.double()
    assert rel_err(y, dense) <= 1e-5
    assert rel_err(y, lin(x).detach()) <= 0.4


@pytest.mark.parametrize("bits, d, code_dtype", [(8, 2, torch.uint8), (8, 1, torch.uint8), (10, 2, torch.int16)])
def test_lut_fallback_codes_take_the_narrowest_integer(rng, bits, d, code_dtype):
    """Codes of the dense-fallback settings are stored in the narrowest integer holding 2^bits values (they
    were int32: vq d=2, bits=8 stored 16 bits per weight instead of 4); int32 codes of older checkpoints load."""
    lin = make_linear(rng)
    layer = LUTLinear.from_linear(lin, method="vq", d=d, bits=bits, iters=3)
    assert layer.codes.dtype == code_dtype
    old = {k: (v.to(torch.int32) if k == "codes" else v) for k, v in layer.state_dict().items()}
    again = LUTLinear(128, 48, bits=bits, d=d, num_tables=layer.num_tables)
    again.load_state_dict(old)
    assert torch.equal(again.to_dense(), layer.to_dense())


def test_state_dict_round_trip(rng):
    lin = make_linear(rng)
    a = Int4Linear.from_linear(lin, group_size=64)
    b = Int4Linear(128, 48, group_size=64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 128, generator=rng)
    assert torch.equal(a(x), b(x))
    c = LUTLinear(128, 48, bits=4, num_tables=48)
    c.load_state_dict(LUTLinear.from_linear(lin, method="log").state_dict())


def test_bad_arguments():
    lin = torch.nn.Linear(96, 8)
    with pytest.raises(ValueError, match="`group_size`"):
        Int4Linear.from_linear(lin, group_size=64)
    with pytest.raises(ValueError, match="`method`"):
        LUTLinear.from_linear(lin, method="nf4")
    with pytest.raises(ValueError, match="`calib`"):
        LUTLinear.from_linear(lin, calib=torch.randn(4, 80))
    with pytest.raises(ValueError, match="`calib`"):
        Int4Linear.from_linear(torch.nn.Linear(128, 8), group_size=64, calib=torch.randn(4, 96))
    with pytest.raises(ValueError, match="`linear`"):
        Int8Linear.from_linear(torch.nn.ReLU())


def test_compile_fullgraph(rng):
    lin = make_linear(rng)
    net = torch.nn.Sequential(Int4Linear.from_linear(lin, group_size=32), torch.nn.ReLU(),
                              Int8Linear.from_linear(make_linear(rng, k=48, n=48)),
                              LUTLinear.from_linear(make_linear(rng, k=48, n=16), method="log"))
    x = torch.randn(5, 128, generator=rng)
    eager = net(x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), eager) <= 1e-6
