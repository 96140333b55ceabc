"""fold_act_order: an act-order down_proj's input gather folded into its MLP's gate / up rows — the same outputs
bit for bit, and only where the module's forward is shown to combine the projections element by element."""
import pytest
import torch
from torch import nn

import reparam_kernels as rk
from reparam_kernels.nn import Int4Linear, Int8Linear, LowRankLinear, PermutedInputLinear


def random_int4(k, n, gen, bias=False):
    layer = Int4Linear(k, n, group_size=32, bias=bias)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=gen, dtype=torch.uint8))
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen) * 0.02 + 0.01)
        layer.zeros.copy_(torch.randint(0, 16, layer.zeros.shape, generator=gen).float())
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen))
    return layer


def permuted(layer, gen):
    return PermutedInputLinear(layer, torch.randperm(layer.in_features, generator=gen))


def act_order_llama(layers=2, hidden=64, inter=96):
    """A tiny Llama whose MLPs look like a loaded act-order GPTQ checkpoint: every projection int4 behind a
    gather, gate / up sharing theirs (one input), down_proj its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = LlamaConfig(vocab_size=80, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        mlp, perm = layer.mlp, torch.randperm(hidden, generator=gen)
        mlp.gate_proj = PermutedInputLinear(random_int4(hidden, inter, gen), perm)
        mlp.up_proj = PermutedInputLinear(random_int4(hidden, inter, gen), perm)
        mlp.down_proj = permuted(random_int4(inter, hidden, gen), gen)
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):  # as load_int4_pretrained marks them
            proj._reparam_method, proj._reparam_settings = "gptq", {"act_order": True}
    return model


def test_llama_mlps_fold_and_give_the_same_logits():
    model = act_order_llama()
    ids = torch.randint(0, 80, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        folded = rk.fold_act_order(model)
        after = model(ids).logits
    assert folded == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(type(layer.mlp.down_proj) is Int4Linear for layer in model.model.layers)
    assert model.model.layers[0].mlp.down_proj._reparam_method == "gptq"
    assert torch.equal(before, after)  # each output from the same row and x: bit for bit
    assert rk.fold_act_order(model) == []  # nothing left to fold


def test_folded_model_fuses_saves_and_loads(tmp_path):
    model = act_order_llama(layers=1)
    rk.fold_act_order(model)
    ids = torch.randint(0, 80, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
        rk.fuse_projections(model)  # gate / up still share their input order: one gather, one launch
        mlp = model.model.layers[0].mlp
        assert isinstance(mlp.gate_proj, rk.nn.ProjectionSlice) and isinstance(mlp.up_proj, rk.nn.ProjectionSlice)
        assert torch.equal(model(ids).logits, ref)
        rk.unfuse_projections(model)
    rk.save_compressed(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(rk.load_pretrained(tmp_path / "m")(ids).logits, ref)


class GateUpMLP(nn.Module):
    """Phi-3's MLP: one gate_up_proj, gate rows then up rows; `interleaved`: gate and up alternate (as some
    MoE exports store them), which a block reordering of rows does not keep."""

    def __init__(self, gate_up, down, interleaved=False):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.interleaved = gate_up, down, interleaved

    def forward(self, x):
        gu = self.gate_up_proj(x)
        gate, up = (gu[..., 0::2], gu[..., 1::2]) if self.interleaved else gu.chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class Mixer(nn.Module):
    """Not element by element: the hidden vector is mixed across features before down_proj."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x):
        return self.down_proj(torch.cumsum(self.gate_proj(x) * self.up_proj(x), dim=-1))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gate_up_in_one_layer(interleaved):
    gen = torch.Generator().manual_seed(2)
    mlp = GateUpMLP(random_int4(64, 2 * 96, gen, bias=True), permuted(random_int4(96, 64, gen), gen), interleaved)
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        before = mlp(x)
        folded = rk.fold_act_order(mlp)
        after = mlp(x)
    assert folded == ([] if interleaved else ["down_proj"])  # the probe sees the interleaved rows would not fold
    assert isinstance(mlp.down_proj, PermutedInputLinear) == interleaved
    assert torch.equal(before, after)


def test_modules_left_alone():
    gen = torch.Generator().manual_seed(3)
    # mixing across hidden features: the probe says no
    mixer = Mixer(random_int4(64, 96, gen), random_int4(64, 96, gen), permuted(random_int4(96, 64, gen), gen))
    # a producer whose rows this cannot reorder (a low-rank factorization keeps no rows)
    lowrank = GateUpMLP(LowRankLinear(64, 192, 8), permuted(random_int4(96, 64, gen), gen))
    x = torch.randn(2, 64, generator=gen)
    for mod in (mixer, lowrank):
        with torch.no_grad():
            before = mod(x)
            assert rk.fold_act_order(mod) == []
            assert torch.equal(mod(x), before)
        assert isinstance(mod.down_proj, PermutedInputLinear)


def test_dense_and_int8_producers_fold_too():
    gen = torch.Generator().manual_seed(5)
    gate = nn.Linear(64, 96)
    up = Int8Linear.from_linear(nn.Linear(64, 96))
    mixer = Mixer(gate, up, permuted(random_int4(96, 64, gen), gen))
    mixer.forward = lambda x: mixer.down_proj(nn.functional.gelu(mixer.gate_proj(x)) * mixer.up_proj(x))
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        before = mixer(x)
        assert rk.fold_act_order(mixer) == ["down_proj"]
        assert torch.equal(mixer(x), before)
