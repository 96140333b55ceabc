"""A model using every layer type of reparam_kernels.nn compiles with fullgraph=True
(CPU, in CI) and, on a GPU, captures into a CUDA graph and replays correctly."""
import os

import pytest
import torch
from torch import nn

from reparam_kernels.bench import variants


class EveryLayer(nn.Module):
    """x -> layer_1 -> gelu -> layer_2 -> ... with one layer of each kind (shapes alternate)."""

    def __init__(self, kinds, dims, dtype, device, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.kinds = list(kinds)
        layers = []
        for i, kind in enumerate(self.kinds):
            # built from a Linear already in the target dtype/device: each layer keeps the
            # parameter dtypes its from_linear chooses (a blanket .to(dtype) would not)
            lin = nn.Linear(dims[i % 2], dims[(i + 1) % 2], bias=True, dtype=dtype, device=device)
            layers.append(variants.make(kind, lin))
        self.layers = nn.ModuleList(layers)
        if len(self.kinds) % 2:  # end on dims[0] to keep shapes chainable either way
            self.layers.append(nn.Linear(dims[1], dims[0], dtype=dtype, device=device))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


KINDS = variants.available()
# aot_eager runs every op through its fake (meta) function and functionalization,
# as inductor does, without compiling C++ on the (small) CI machine.
BACKEND = os.environ.get("REPARAM_COMPILE_BACKEND", "aot_eager")


def test_every_layer_type_is_covered():
    import reparam_kernels.nn as rnn

    layer_classes = {n for n in dir(rnn) if n.endswith("Linear") and isinstance(getattr(rnn, n), type)}
    built = {type(variants.make(k, nn.Linear(128, 64))).__name__ for k in KINDS}
    assert layer_classes <= built | {"FactoredLinear"}, f"layer types not in the compile test: {layer_classes - built}"
    assert len(KINDS) >= 1


def test_fullgraph_compile_every_layer_cpu():
    torch._dynamo.reset()
    model = EveryLayer(KINDS, (128, 96), torch.float32, "cpu").eval()
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(x)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_every_layer(dtype):
    model = EveryLayer(KINDS, (512, 384), dtype, "cuda").eval()
    x = torch.randn(4, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        eager = model(x).float()
        compiled = torch.compile(model, fullgraph=True)
        assert torch.allclose(compiled(x).float(), eager, rtol=2e-2, atol=2e-2)
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the capture (Triton compiles, lazy inits)
            model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        static_y.fill_(float("nan"))  # poison: the replay must overwrite it
        graph.replay()
        torch.cuda.synchronize()
        expected = model(new_x).float()
    assert torch.isfinite(static_y).all()
    assert torch.allclose(static_y.float(), expected, rtol=2e-2, atol=2e-2)
