"""Structured projections (exactness, optimality, errors) and the structured layers."""
import math

import pytest
import torch

from reparam_kernels.compress import ldr, structured as st
from reparam_kernels.nn import BlockCirculantLinear, CirculantLinear, LDRLinear, ToeplitzLinear
from conftest import rel_err


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: with other jobs on the cores, intra-op threads only spin.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense(rng, n, k):
    return torch.randn(n, k, generator=rng, dtype=torch.float64)


@pytest.mark.parametrize("n,k,b", [(12, 12, 4), (10, 7, 4), (13, 21, 6), (5, 9, 9), (8, 8, 1)])
def test_block_circulant_projection_exact_and_optimal(rng, n, k, b):
    fit = st.project_block_circulant(dense(rng, n, k), b)
    assert fit.rel_error < 1e-14 if b == 1 else 0 < fit.rel_error < 1  # 1×1 blocks: every matrix
    # a block-circulant matrix projects to itself
    w = st.block_circulant_to_dense(torch.randn(fit.columns.shape, generator=rng, dtype=torch.float64), n, k)
    again = st.project_block_circulant(w, b)
    assert again.rel_error < 1e-13 and rel_err(again.to_dense(), w) < 1e-13
    # optimal: no other block-circulant matrix is closer (random ones and small perturbations)
    target = dense(rng, n, k)
    best = st.project_block_circulant(target, b)
    d_best = (best.to_dense() - target).norm()
    assert abs(best.rel_error - d_best / target.norm()) < 1e-12
    for scale in (1.0, 1e-2, 1e-4):
        other = best.columns + scale * torch.randn(best.columns.shape, generator=rng, dtype=torch.float64)
        assert (st.block_circulant_to_dense(other, n, k) - target).norm() >= d_best


def test_circulant_projection_is_mean_of_wrapped_diagonals(rng):
    w = dense(rng, 6, 6)
    fit = st.project_circulant(w)
    for d in range(6):
        assert abs(fit.columns[0, 0, d] - torch.stack([w[(s + d) % 6, s] for s in range(6)]).mean()) < 1e-14


@pytest.mark.parametrize("n,k", [(9, 9), (7, 12), (15, 4)])
def test_toeplitz_projection_exact_and_optimal(rng, n, k):
    t = torch.randn(n + k - 1, generator=rng, dtype=torch.float64)
    w = st.toeplitz_to_dense(t, n, k)
    fit = st.project_toeplitz(w)
    assert fit.rel_error < 1e-13 and rel_err(fit.diagonals, t) < 1e-13
    target = dense(rng, n, k)
    best = st.project_toeplitz(target)
    d_best = (best.to_dense() - target).norm()
    for scale in (1.0, 1e-3):
        other = best.diagonals + scale * torch.randn(n + k - 1, generator=rng, dtype=torch.float64)
        assert (st.toeplitz_to_dense(other, n, k) - target).norm() >= d_best


def test_ldr_displacement_rank_reconstruction_and_matvec(rng):
    n = 11
    toe = st.toeplitz_to_dense(torch.randn(2 * n - 1, generator=rng, dtype=torch.float64), n, n)
    assert torch.linalg.matrix_rank(ldr.displacement(toe)) <= 2
    assert ldr.ldr_approximate(toe, 2).rel_error < 1e-12  # exact for displacement rank ≤ r
    w = dense(rng, n, n)
    z1, zm1 = ldr.shift_matrix(n, 1.0), ldr.shift_matrix(n, -1.0)
    assert rel_err(ldr.displacement(w), z1 @ w - w @ zm1) < 1e-14
    errs = [ldr.ldr_approximate(w, r).rel_error for r in (1, 3, 6, 9, n)]
    assert errs[-1] < 1e-12 and errs[3] < errs[1]
    fit = ldr.ldr_approximate(w, 4)
    x = torch.randn(3, n, generator=rng, dtype=torch.float64)
    assert rel_err(ldr.ldr_matvec(x, fit.g, fit.h), x @ fit.to_dense().t()) < 1e-12


@pytest.mark.parametrize("make", [
    lambda lin: BlockCirculantLinear.from_linear(lin, 8),
    lambda lin: CirculantLinear.from_linear(lin),
    lambda lin: ToeplitzLinear.from_linear(lin),
    lambda lin: LDRLinear.from_linear(lin, 5),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layers_forward_to_dense_and_train(rng, make, dtype):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    lin = torch.nn.Linear(37, 21, dtype=dtype)
    layer = make(lin)
    assert 0 < layer.projection_error and math.isfinite(layer.projection_error)  # LDR of noise can exceed 1
    w = layer.to_dense()
    assert w.shape == (21, 37) and w.dtype == dtype
    assert abs(rel_err(w, lin.weight) - layer.projection_error) < 1e-5
    x = torch.randn(2, 3, 37, generator=rng).to(dtype)
    ref = x.double() @ w.double().t() + lin.bias.double()
    assert rel_err(layer(x), ref) <= (1e-5 if dtype == torch.float32 else 1e-12)
    # trainable: a few SGD steps toward the dense layer's outputs lower the loss
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    xs = torch.randn(64, 37, generator=rng).to(dtype)
    target = lin(xs).detach()
    losses = []
    for _ in range(5):
        loss = (layer(xs) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_layer_half_precision_and_to_linear(rng):
    lin = torch.nn.Linear(64, 48)
    full = BlockCirculantLinear.from_linear(lin, 16)
    spectrum = full.w_spectrum.detach().clone()
    layer = full.half()
    # .half() casts the bias but keeps the spectrum's float32 values (the ops take float32 spectra)
    assert layer.bias.dtype == torch.float16 and layer.w_spectrum.dtype == torch.float32
    assert torch.equal(layer.w_spectrum.detach(), spectrum) and isinstance(layer.w_spectrum, torch.nn.Parameter)
    x = torch.randn(5, 64, generator=rng).half()
    assert rel_err(layer(x), x.double() @ layer.to_dense().double().t() + layer.bias.double()) < 5e-3
    layer.w_spectrum.data = layer.w_spectrum.data.half()  # assigned by hand: the forward casts it per call
    assert rel_err(layer(x), x.double() @ layer.to_dense().double().t() + layer.bias.double()) < 5e-3
    back = BlockCirculantLinear.from_linear(lin, 16).to_linear()
    assert rel_err(back.weight, BlockCirculantLinear.from_linear(lin, 16).to_dense()) == 0


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="`block_size`"):
        BlockCirculantLinear(8, 8, 0)
    with pytest.raises(ValueError, match="`rank`"):
        LDRLinear(8, 6, 9)
    with pytest.raises(ValueError, match="`linear`"):
        ToeplitzLinear.from_linear(torch.nn.ReLU())
    with pytest.raises(ValueError, match="`weight`"):
        st.project_toeplitz(torch.randn(3))


def test_ldr_matvec_gradients_match_finite_differences(rng):
    n, r = 7, 2
    g, h = (torch.randn(n, r, generator=rng, dtype=torch.float64, requires_grad=True),
                         torch.randn(n, r, generator=rng, dtype=torch.float64, requires_grad=True))
    x = torch.randn(3, n, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, h: ldr.ldr_matvec(x, g, h), (x, g, h))


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float16)])
def test_spectra_and_generators_stay_float32_under_half_casts(rng, cast):
    lin = torch.nn.Linear(40, 24)
    model = torch.nn.Sequential(BlockCirculantLinear.from_linear(lin, 8), torch.nn.ReLU(),
                                ToeplitzLinear(24, 24), LDRLinear(24, 24, rank=2))
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("bias")}
    model[0].w_spectrum.grad = torch.ones_like(model[0].w_spectrum)
    cast(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.dtype in (torch.float16, torch.bfloat16), name
        else:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), kept[name]), name
    assert model[0].w_spectrum.grad.dtype == torch.float32
    x = torch.randn(3, 40, generator=rng).to(model[0].bias.dtype)
    assert model(x).dtype == x.dtype
    state = model.state_dict()
    assert state["0.w_spectrum"].dtype == torch.float32 and state["0.bias"].dtype == x.dtype
    model.double()  # a float64 cast still applies
    assert model[0].w_spectrum.dtype == torch.float64 and model[3].g.dtype == torch.float64
