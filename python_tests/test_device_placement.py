"""Every layer builds and runs without creating a tensor on the default device.

On a GPU, a tensor made without ``device=`` lands on the CPU while the weights are on the GPU, and the
op that mixes them fails (``log_levels`` did, in quantize_log / log_lut: found on an H200, never on
the CPU-only CI). Here the default device is set to "meta" while the weights stay on the CPU: a tensor
made without a device is then a meta tensor, and mixing it with the CPU weights fails the same way.
"""
import pytest
import torch
from torch import nn

from reparam_kernels.bench import variants


def _build_and_run(kind, rng):
    lin = nn.Linear(256, 192)  # made before the default changes: real CPU tensors
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 256, generator=rng, device="cpu") / 16)
    torch.set_default_device("meta")
    try:
        layer = variants.make(kind, lin)
        return layer(torch.randn(3, 256, generator=rng, device="cpu"))
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("kind", variants.available())
def test_layer_makes_no_tensor_on_the_default_device(kind, rng):
    y = _build_and_run(kind, rng)
    assert y.device.type == "cpu" and y.shape == (3, 192) and torch.isfinite(y).all()


def test_the_check_catches_a_tensor_made_without_a_device(rng, monkeypatch):
    """The check can fail: log_lut building its levels on the default device (the H200 bug) is caught."""
    from reparam_kernels.compress import quantize as Q

    levels = Q.log_levels
    monkeypatch.setattr(Q, "log_levels", lambda bits, dtype=torch.float32, device=None: levels(bits, dtype))
    with pytest.raises(RuntimeError, match="device"):
        _build_and_run("lut_log4", rng)
