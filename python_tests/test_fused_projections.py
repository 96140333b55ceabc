"""fuse_projections: siblings of one input (q/k/v, gate/up) run as one layer of their format, the model's code
unchanged; the outputs are the unfused model's, compiled with fullgraph=True too, and unfusing gives back
the same tensors."""
import os

import pytest
import torch
from torch import nn

import reparam_kernels
from reparam_kernels.bench import variants
from reparam_kernels.nn import (FusedLowRank, FusedProjections, Int4Linear, Int8Linear, LowRankLinear, LUTLinear,
                                ProjectionSlice)
from reparam_kernels._linear import linear_from
from reparam_kernels.nn.fused import fuse_projections, unfuse_projections
from reparam_kernels.nn.permuted import PermutedInputLinear

transformers = pytest.importorskip("transformers")
BACKEND = os.environ.get("REPARAM_COMPILE_BACKEND", "aot_eager")


class Attn(nn.Module):
    """Calls its three projections on one input, in an order that is not the group's."""

    def __init__(self, make, sizes=(48, 16, 16), k=64):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (make(k, n, i) for i, n in enumerate(sizes))

    def forward(self, x):
        v = self.v_proj(x)
        return torch.cat([self.q_proj(x), self.k_proj(x) * 2, v * 3], -1)


def _from(layer_fn, seed=0):
    def make(k, n, i):
        torch.manual_seed(seed + i)
        return layer_fn(nn.Linear(k, n, bias=i != 1))  # k_proj without a bias: the fused bias has zeros there
    return make


PERM64 = torch.randperm(64, generator=torch.Generator().manual_seed(7))


def _act_order(lin, perm=PERM64):
    """int4 as an act-order GPTQ checkpoint loads: columns in `perm`'s order, x gathered (siblings share it)."""
    inner = Int4Linear.from_linear(linear_from(lin.weight.detach()[:, perm], lin.bias), group_size=32)
    return PermutedInputLinear(inner, perm)


FORMATS = {
    "linear": lambda lin: lin,
    "int4_act_order": _act_order,
    "int8": Int8Linear.from_linear,
    "int4_g32": lambda lin: Int4Linear.from_linear(lin, group_size=32),
    "log4": lambda lin: LUTLinear.from_linear(lin, method="log", bits=4),  # a table a row
    "vq_d2_8rows": lambda lin: LUTLinear.from_linear(lin, method="vq", d=2, bits=4, rows_per_codebook=8, iters=2),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fused_outputs_and_unfused_tensors_are_the_originals(fmt):
    model = Attn(_from(FORMATS[fmt])).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model.q_proj)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = model(x)
        assert fuse_projections(model) == {"": [["q_proj", "k_proj", "v_proj"]]}
        owner = model.fused_q_proj_k_proj_v_proj
        assert isinstance(owner, FusedProjections) and isinstance(model.k_proj, ProjectionSlice)
        assert owner.layer.out_features == 80 and type(owner.layer) is cls
        out = model(x)
        assert owner._cache is None  # the last slice let go of the fused output
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        # the fused model's tensors are the fused layer's only (the slices hold none)
        assert all(k.startswith("fused_q_proj_k_proj_v_proj.layer.") for k in model.state_dict())
        assert unfuse_projections(model) == 1
        after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert torch.equal(model(x), ref)


def test_one_launch_a_group_and_a_new_input_runs_again():
    model = Attn(_from(FORMATS["int4_g32"])).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
        fuse_projections(model)
        calls = []
        layer = model.fused_q_proj_k_proj_v_proj.layer
        layer.register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
        assert len(calls) == 1
        # a slice called alone (another input each time, as cross-attention's k / v would be): still right
        y = torch.randn(2, 64)
        torch.testing.assert_close(model.q_proj(y), Attn(_from(FORMATS["int4_g32"])).q_proj(y), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)  # the stale y result is not reused
        assert len(calls) == 3


def test_mixed_formats_fuse_the_siblings_that_match_and_leave_the_rest():
    fmts = [FORMATS["int4_g32"], FORMATS["int8"], FORMATS["int8"]]

    def make(k, n, i):
        torch.manual_seed(i)
        return fmts[i](nn.Linear(k, n))
    model = Attn(make).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        assert fuse_projections(model) == {"": [["k_proj", "v_proj"]]}
        assert type(model.q_proj) is Int4Linear
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    # other group sizes, a low-rank layer: nothing to fuse
    other = Attn(lambda k, n, i: Int4Linear.from_linear(nn.Linear(k, n), group_size=32 if i else 64))
    assert fuse_projections(other) == {"": [["k_proj", "v_proj"]]}
    pivoted = Attn(lambda k, n, i: variants.make("lowrank_40_pivoted", nn.Linear(k, n)))
    with pytest.warns(UserWarning, match="no sibling projections share a fusable format .found PivotedLowRankLinear"):
        assert fuse_projections(pivoted) == {}


def test_act_order_siblings_fuse_only_when_their_orders_agree():
    orders = [PERM64, PERM64, PERM64.flip(0)]  # v_proj's columns in another order
    model = Attn(lambda k, n, i: _act_order(nn.Linear(k, n), orders[i])).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
        assert fuse_projections(model) == {"": [["q_proj", "k_proj"]]}
        assert isinstance(model.v_proj, PermutedInputLinear) and torch.equal(model(x), ref)


def test_lowrank_siblings_stack_their_right_factors():
    # ranks 24 / 8 / 12, k_proj without a bias; the fused layer makes one product with the stacked v
    model = Attn(lambda k, n, i: LowRankLinear.from_linear(_from(lambda lin: lin)(k, n, i), rank=(24, 8, 12)[i])).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = model(x)
        assert fuse_projections(model) == {"": [["q_proj", "k_proj", "v_proj"]]}
        layer = model.fused_q_proj_k_proj_v_proj.layer
        assert isinstance(layer, FusedLowRank) and layer.v.shape == (44, 64) and layer.out_features == 80
        products = []
        real = torch.nn.functional.linear
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "linear", lambda *a: products.append(a[1].shape) or real(*a))
            out = model(x)
        assert products == [(44, 64), (48, 24), (16, 8), (16, 12)], products  # 4 products, not 6
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert unfuse_projections(model) == 1
        assert all(type(getattr(model, n)) is LowRankLinear for n in ("q_proj", "k_proj", "v_proj"))
        assert model.k_proj.bias is None
        after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


def tiny_llama(kind, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if kind != "dense":
        variants.replace_linears(model, kind, random=True)
    return model


@pytest.mark.parametrize("kind", ["dense", "int4_g128", "int8", "lowrank_40"])
def test_llama_logits_eager_and_fullgraph_compiled(kind):
    torch._dynamo.reset()
    model = tiny_llama(kind)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        done = fuse_projections(model)
        assert len(done) == 4 and all(len(v) == 1 for v in done.values())  # 2 layers x (attention, MLP)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
        torch.testing.assert_close(compiled(ids).logits, ref, rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # the slices' state is back where it began
            compiled(ids.flip(0))
    assert all(m._cache is None for m in model.modules() if isinstance(m, FusedProjections))


def test_fused_models_are_refused_where_they_cannot_go(tmp_path):
    model = tiny_llama("int8")
    fuse_projections(model)
    with pytest.raises(ValueError, match="fused projections already"):
        fuse_projections(model)
    with pytest.raises(ValueError, match="save_compressed: the model has fused projections"):
        reparam_kernels.save_compressed(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match="compress: the model has fused projections"):
        reparam_kernels.compress(model, {"default": "int8"}, calib=None, progress=False)
    assert reparam_kernels.unfuse_projections(model) == 4
    reparam_kernels.save_compressed(model, tmp_path / "ckpt")


def test_unfused_compressed_model_saves_and_loads(tmp_path):
    # unfuse_projections gives the siblings back compress()'s marks: save_compressed writes them as compressed
    # layers (without the marks it wrote int4 tensors the skeleton's Linears had no place for)
    model, _ = reparam_kernels.compress(tiny_llama("dense"), {"{blocks}.*": "int4"}, calib=None, progress=False)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        fuse_projections(model)
        assert unfuse_projections(model) == 4
        reparam_kernels.save_compressed(model, tmp_path / "ckpt")
        back = reparam_kernels.load_pretrained(tmp_path / "ckpt")
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int4_g128", "int8", "lowrank_40"])
def test_fused_llama_decode_under_cuda_graphs(kind):
    """reduce-overhead (CUDA graphs) replays of the fused model match the unfused eager model, step after step."""
    torch._dynamo.reset()
    model = tiny_llama(kind).to(device="cuda", dtype=torch.float16)
    fused = tiny_llama(kind).to(device="cuda", dtype=torch.float16)
    fuse_projections(fused)
    step = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for i in range(4):
            ids = torch.randint(0, 101, (2, 1), device="cuda", generator=None)
            got = step(ids).logits.float().clone()
            torch.testing.assert_close(got, model(ids).logits.float(), rtol=2e-2, atol=2e-2)


def test_generate_with_fused_projections_picks_the_same_tokens():
    # transformers' generate (its own cache, one token a step after the prompt) on the fused model: the same
    # greedy tokens and logits as the unfused one
    model = tiny_llama("int4_g128")
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        fuse_projections(model)
        out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
