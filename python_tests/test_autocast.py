"""Every layer under torch.autocast: the op runs in the autocast dtype (side data cast like F.linear's
weight), the result matches the fp32 layer to bf16 accuracy, and gradients reach the fp32 parameters."""
import pytest
import torch

from reparam_kernels import nn as rnn

BUILDERS = {
    "lowrank": lambda lin: rnn.LowRankLinear.from_linear(lin, rank=12),
    "int8": lambda lin: rnn.Int8Linear.from_linear(lin),
    "int4": lambda lin: rnn.Int4Linear.from_linear(lin, group_size=32),
    "lut": lambda lin: rnn.LUTLinear.from_linear(lin),
    "block_circulant": lambda lin: rnn.BlockCirculantLinear.from_linear(lin, block_size=16),
    "toeplitz": lambda lin: rnn.ToeplitzLinear.from_linear(lin),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_layer_under_cpu_autocast(kind):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    layer = BUILDERS[kind](lin)
    x = torch.randn(3, 5, 64)
    want = layer(x).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).norm() / want.norm()
    assert err < 2e-2, f"{kind}: relative error {err:.2e} under bf16 autocast"
    trainable = [p for p in layer.parameters() if p.is_floating_point() and p.requires_grad]
    if trainable:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().mean()
        loss.backward()
        for p in trainable:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all()
    # outside autocast the layer is back to fp32
    assert layer(x).dtype == torch.float32


def test_autocast_leaves_spectra_fp32():
    """The structured ops take their spectrum in fp32 by format: autocast casts x and bias only."""
    lin = torch.nn.Linear(32, 32)
    layer = rnn.BlockCirculantLinear.from_linear(lin, block_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 32))
    assert y.dtype == torch.bfloat16 and layer.w_spectrum.dtype == torch.float32
