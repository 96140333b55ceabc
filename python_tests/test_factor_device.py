"""Factorizations (SVD, whitening, spectra, pivoting) run on the weight's GPU, in float64, and give the
CPU's result there; REPARAM_FACTOR_DEVICE=cpu keeps them on the CPU."""
import pytest
import torch

from reparam_kernels.compress import svd
from reparam_kernels.compress.calib import CalibStats, collect_inputs
from reparam_kernels.nn.pivoted import expand_right_factor, greedy_pivots, pivot_factors


def _layer_and_inputs(out_f=96, in_f=160, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    # decaying spectrum and uneven input channels, as trained layers have
    W = torch.randn(out_f, 24, generator=g) @ torch.randn(24, in_f, generator=g) + 0.05 * torch.randn(out_f, in_f, generator=g)
    X = torch.randn(n, in_f, generator=g) * torch.logspace(-1, 1, in_f)
    return W, X


def _rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def test_cpu_weights_factor_on_the_cpu(monkeypatch):
    W, X = _layer_and_inputs()
    assert svd.factor_device(W) == torch.device("cpu")
    monkeypatch.setenv("REPARAM_FACTOR_DEVICE", "cuda")  # only a CUDA weight moves the work to its GPU
    assert svd.factor_device(W) == torch.device("cpu")
    u, v, _ = svd.whitened_svd(W, CalibStats.from_inputs(X), rank=16)
    assert u.device.type == v.device.type == "cpu"


def test_pivot_factors_are_exact_on_the_cpu():
    W, _ = _layer_and_inputs()
    u, v, _ = svd.truncated_svd(W, rank=20)
    up, w, perm = pivot_factors(u, v)
    assert _rel(up @ expand_right_factor(w, perm), u.double() @ v.double()) < 1e-10


@pytest.mark.parametrize("r,n,seed", [(16, 200, 0), (64, 300, 1), (96, 1000, 2)])
def test_greedy_pivots_choose_lapacks_columns(r, n, seed):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    v = torch.randn(r, n, generator=g, dtype=torch.float64) * scales
    _, lapack = scipy_linalg.qr(v.numpy(), mode="r", pivoting=True)
    assert greedy_pivots(v).tolist() == lapack[:r].tolist()


def test_pivot_factors_without_scipy(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    W, _ = _layer_and_inputs()
    u, v, _ = svd.truncated_svd(W, rank=20)
    with_scipy = pivot_factors(u, v)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    up, w, perm = pivot_factors(u, v)
    assert perm.tolist() == with_scipy[2].tolist()
    assert _rel(up, with_scipy[0]) < 1e-12 and _rel(w, with_scipy[1]) < 1e-10


@pytest.mark.gpu
def test_gpu_factorizations_match_the_cpu(monkeypatch):
    monkeypatch.delenv("REPARAM_FACTOR_DEVICE", raising=False)
    W, X = _layer_and_inputs()
    stats = CalibStats.from_inputs(X)
    d = torch.rand(W.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    Wc = W.cuda()
    assert svd.factor_device(Wc) == Wc.device

    u, v, s = svd.truncated_svd(W, rank=20)
    uc, vc, sc = svd.truncated_svd(Wc, rank=20)
    assert uc.device.type == "cuda" and vc.dtype == torch.float32
    assert _rel(uc @ vc, u @ v) < 1e-5 and _rel(sc, s) < 1e-6

    u, v, s = svd.whitened_svd(W, stats, rank=20, out_weight=d)
    uc, vc, sc = svd.whitened_svd(Wc, stats, rank=20, out_weight=d.cuda())
    assert uc.device.type == "cuda"
    assert _rel(uc @ vc, u @ v) < 1e-5 and _rel(sc, s) < 1e-6

    spec = svd.whitened_spectrum(W, stats.gram, d)
    spec_c = svd.whitened_spectrum(Wc, stats.gram, d)
    assert spec_c.device.type == "cuda" and _rel(spec_c[:20], spec[:20]) < 1e-8

    approx = u @ v
    assert abs(svd.output_error(Wc, approx.cuda(), stats.gram) - svd.output_error(W, approx, stats.gram)) < 1e-5
    assert abs(svd.weight_error(Wc, approx.cuda()) - svd.weight_error(W, approx)) < 1e-9

    up, w, perm = pivot_factors(uc, vc)
    assert up.device.type == w.device.type == perm.device.type == "cuda"
    assert _rel(up @ expand_right_factor(w, perm), uc.double() @ vc.double()) < 1e-10

    monkeypatch.setenv("REPARAM_FACTOR_DEVICE", "cpu")
    uk, vk, _ = svd.whitened_svd(Wc, stats, rank=20, out_weight=d.cuda())
    assert uk.device.type == "cpu" and _rel(uk @ vk, u @ v) < 1e-6


@pytest.mark.gpu
def test_block_statistics_stay_on_the_gpu(monkeypatch):
    monkeypatch.delenv("REPARAM_FACTOR_DEVICE", raising=False)
    _, X = _layer_and_inputs()
    lin = torch.nn.Linear(X.shape[1], 32).cuda()
    with collect_inputs({"a": lin}, on_weight_device=True) as on_gpu, collect_inputs({"a": lin}) as on_cpu:
        lin(X.cuda())
    assert on_gpu["a"].gram.device.type == "cuda" and on_cpu["a"].gram.device.type == "cpu"
    assert _rel(on_gpu["a"].gram, on_cpu["a"].gram) < 1e-12
    monkeypatch.setenv("REPARAM_FACTOR_DEVICE", "cpu")
    with collect_inputs({"a": lin}, on_weight_device=True) as kept:
        lin(X.cuda())
    assert kept["a"].gram.device.type == "cpu"


@pytest.mark.gpu
def test_pipeline_on_a_gpu_model_matches_the_cpu(monkeypatch):
    """compress with the model on the GPU (whitened, Fisher-weighted, pivoted low rank: factorizations,
    pivots and statistics there) gives, up to float rounding, the CPU's model. Ranks come from the ratio, so
    no near-tie of a global allocation can make the two differ."""
    transformers = pytest.importorskip("transformers")
    import reparam_kernels as rk

    monkeypatch.delenv("REPARAM_FACTOR_DEVICE", raising=False)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(1))
    recipe = {"model.layers.*.*_proj": {"method": "lowrank", "ratio": 0.3, "whiten": True, "fisher": True,
                                        "pivoted": True}}
    cpu, rep_cpu = rk.compress(model, recipe, calib=ids, progress=False)
    gpu, rep_gpu = rk.compress(model.cuda(), recipe, calib=ids, progress=False)
    assert [(r.name, r.method, r.params_after) for r in rep_gpu.layers] == \
        [(r.name, r.method, r.params_after) for r in rep_cpu.layers]
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = cpu(x).logits, gpu(x.cuda()).logits.cpu()
    assert _rel(got, want) < 1e-3
