"""Hugging Face GPT-2 style models: their projections are transformers' Conv1D (weight [in, out]),
which compress() matches like nn.Linear and swaps for the exact nn.Linear before compressing."""
import pytest
import torch

import reparam_kernels as rk
from reparam_kernels.compress.recipe import conv1d_as_linear, is_conv1d
from reparam_kernels.nn import Int8Linear, LowRankLinear

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_conv1d_as_linear_is_exact():
    conv = tiny_gpt2().transformer.h[0].mlp.c_fc
    assert is_conv1d(conv) and not is_conv1d(torch.nn.Linear(3, 4))
    lin = conv1d_as_linear(conv)
    x = torch.randn(5, 7, 64)
    assert (lin.in_features, lin.out_features) == (64, 256)
    assert torch.allclose(lin(x), conv(x), atol=1e-6)


def test_gpt2_compresses_block_by_block():
    model = tiny_gpt2()
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = {"transformer.h.*.mlp.c_fc": {"method": "lowrank", "rank": 64, "whiten": True},  # full rank: exact
              "transformer.h.*.attn.c_attn": "int8"}
    comp, report = rk.compress(model, recipe, calib=ids, progress=False)
    for block in comp.transformer.h:
        assert isinstance(block.mlp.c_fc, LowRankLinear) and isinstance(block.attn.c_attn, Int8Linear)
        assert is_conv1d(block.mlp.c_proj)  # matched by no rule: left as it was
    assert is_conv1d(model.transformer.h[0].mlp.c_fc)  # inplace=False: the original is untouched
    conv = model.transformer.h[1].attn.c_attn
    dense = comp.transformer.h[1].attn.c_attn.to_dense()
    assert (dense - conv.weight.t()).norm() / conv.weight.norm() < 1e-2  # the [out, in] weight, int8-rounded
    with torch.no_grad():
        a, b = model(ids).logits, comp(ids).logits
    assert (a - b).norm() / a.norm() < 2e-2
    assert len(report.layers) == 4


def test_gpt2_pattern_errors_name_conv1d():
    with pytest.raises(ValueError, match=r"matches no nn.Linear \(or Conv1D\).*transformer\.h\.0"):
        rk.compress(tiny_gpt2(), {"model.layers.*": "int8"}, progress=False)


def test_gpt2_save_load_bit_identical(tmp_path):
    model = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    comp, _ = rk.compress(model, {"transformer.h.*.mlp.c_proj": {"method": "lowrank", "ratio": 0.3, "whiten": False},
                                  "transformer.h.*.attn.c_attn": "int4"}, progress=False)
    rk.save_compressed(comp, tmp_path / "gpt2c")
    skeleton = tiny_gpt2()  # Conv1D where the compressed layers go: load_compressed replaces them
    rk.load_compressed(skeleton, tmp_path / "gpt2c")
    with torch.no_grad():
        assert torch.equal(comp(ids).logits, skeleton(ids).logits)


def test_gpt2_layers_kept_dense_stay_conv1d_and_reload(tmp_path):
    """A global allocation keeps some matched Conv1Ds dense: they must come back as Conv1D (same [in, out]
    layout as the skeleton), or a square one would load transposed without any shape error."""
    model = tiny_gpt2()
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(3))
    rule = {"method": "lowrank", "ratio": 0.2, "whiten": True, "fisher": True, "allocate": "global"}
    comp, report = rk.compress(model, {"transformer.h.*.attn.c_*": rule, "transformer.h.*.mlp.c_*": rule},
                               calib=ids, progress=False)
    kept = [r.name for r in report.layers if r.method == "skip"]
    assert kept, "the allocation was expected to keep some layer dense in this setting"
    for name in kept:
        assert is_conv1d(comp.get_submodule(name))
        assert torch.equal(comp.get_submodule(name).weight, model.get_submodule(name).weight)
    rk.save_compressed(comp, tmp_path / "g")
    skeleton = tiny_gpt2()
    rk.load_compressed(skeleton, tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(comp(ids).logits, skeleton(ids).logits)
