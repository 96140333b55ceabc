"""The grouped forward of int4 / int8 / GPTVQ / 4-bit LUT / low-rank experts (compress/experts.py:
UnfusedExperts.group, reparam.grouped_int4_linear, grouped_int8_linear, grouped_vq_linear, grouped_lut_linear,
grouped_lowrank_linear):
the per-expert path's outputs, the experts' tensors as views of the stacked storage, regrouping after .to() /
load / copy, the per-expert path kept for training and other formats, no graph break under torch.compile."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress.experts import UnfusedExperts, group_experts  # noqa: E402
from test_experts import EXPERTS, _ids, tiny_moe  # noqa: E402

INT4 = {EXPERTS: {"method": "int4", "group_size": 32}}
# docs/compression.md's MoE recipe: down projections int8, the rest int4
MIXED = {"{blocks}.*.mlp.experts.*.down_proj": "int8", EXPERTS: {"method": "int4", "group_size": 32}}
# the gptvq recipe's rule on the experts (a codebook per 16 rows here: the tiny experts have 32 or 128)
GPTVQ = {EXPERTS: {"method": "vq", "d": 2, "bits": 8, "rows_per_codebook": 16, "gptq": True}}
# 4-bit lookup tables: log (a table a row) on the down projections, k-means (a table per 16 rows) on the rest
LUT4 = {"{blocks}.*.mlp.experts.*.down_proj": {"method": "log", "bits": 4},
        EXPERTS: {"method": "vq", "d": 1, "bits": 4, "rows_per_codebook": 16}}
# the default recipe's rule on the experts (pivoted factors, ranks from one global allocation: ragged), and plain
# factors at per-layer ratios
LOWRANK_PIVOTED = {EXPERTS: {"method": "lowrank", "ratio": 0.3, "whiten": True, "allocate": "global", "pivoted": True}}
LOWRANK = {EXPERTS: {"method": "lowrank", "ratio": 0.5}}


def experts_of(model):
    return [m for m in model.modules() if isinstance(m, UnfusedExperts)]


def per_expert(model, ids):
    """The logits through the per-expert path (the grouping dropped on a copy)."""
    other = copy.deepcopy(model)
    for m in experts_of(other):
        m._grouped = None
    with torch.no_grad():
        return other(ids).logits


@pytest.mark.parametrize("arch,recipe", [("mixtral", INT4), ("gpt_oss", INT4), ("qwen3_moe", INT4), ("olmoe", INT4),
                                         ("deepseek_v3", INT4), ("mixtral", MIXED), ("gpt_oss", MIXED),
                                         ("mixtral", GPTVQ), ("mixtral", LUT4), ("gpt_oss", LUT4),
                                         ("mixtral", LOWRANK_PIVOTED),
                                         ("gpt_oss", LOWRANK_PIVOTED), ("qwen3_moe", LOWRANK)])
def test_grouped_forward_gives_the_per_expert_outputs(arch, recipe, monkeypatch):
    model, ids = tiny_moe(arch), _ids(8, 16)
    small, _ = rk.compress(model, recipe, calib=ids, progress=False)
    assert all(m._grouped is not None for m in experts_of(small))
    calls = []
    real = UnfusedExperts._forward_grouped
    monkeypatch.setattr(UnfusedExperts, "_forward_grouped", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad():
        got = small(_ids()).logits
    assert len(calls) == 2  # both layers took the grouped path
    torch.testing.assert_close(got, per_expert(small, _ids()), rtol=1e-5, atol=1e-5)


def test_experts_tensors_are_views_of_the_stacked_storage():
    small, _ = rk.compress(tiny_moe(), INT4, calib=_ids(8, 16), progress=False)
    ex = experts_of(small)[0]
    op, (q, s, z), consts, b, names, _ = ex._grouped["down_proj"]
    assert op is rk.ops.grouped_int4_linear and consts == (32,) and b is None
    assert names == ("qweight", "scales", "zeros")
    assert q.shape == (4, 32, 32) and s.shape == (4, 32, 2)
    for e in range(4):
        layer = ex.expert(e).down_proj
        assert layer.qweight.data_ptr() == q[e].data_ptr() and layer.zeros.data_ptr() == z[e].data_ptr()
        assert isinstance(layer.scales, torch.nn.Parameter) and not layer.scales.requires_grad
    stored = {t.untyped_storage().data_ptr() for m in ex.modules() for t in m.buffers()}
    assert len(stored) == 2  # qweight of both projections, one storage each: no copy kept per expert


def test_to_and_cast_group_again():
    small, _ = rk.compress(tiny_moe(), INT4, calib=_ids(8, 16), progress=False)
    want = per_expert(small, _ids())
    small.double()
    ex = experts_of(small)[1]
    q, s, z = ex._grouped["gate_up_proj"].tensors
    assert s.dtype == torch.float64 and ex.expert(3).gate_up_proj.scales.data_ptr() == s[3].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(small(_ids()).logits.float(), want, rtol=1e-4, atol=1e-4)


def test_save_load_and_copies_come_back_grouped(tmp_path):
    small, _ = rk.compress(tiny_moe("qwen3_moe"), INT4, calib=_ids(8, 16), progress=False)
    rk.save_compressed(small, tmp_path / "ck")
    back = rk.load_pretrained(tmp_path / "ck")
    assert all(m._grouped is not None for m in experts_of(back))
    twin = copy.deepcopy(small)  # the stacked tensors and the experts' copied apart: regrouped at the forward
    with torch.no_grad():
        want = small(_ids()).logits
        torch.testing.assert_close(back(_ids()).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(twin(_ids()).logits, want, rtol=0, atol=0)
    ex = experts_of(twin)[0]
    assert ex.expert(2).down_proj.qweight.data_ptr() == ex._grouped["down_proj"].tensors[0][2].data_ptr()


def test_other_formats_and_training_take_the_per_expert_path(monkeypatch):
    model, ids = tiny_moe(), _ids(8, 16)
    mixed = {"{blocks}.*.mlp.experts.0.*": "int8", EXPERTS: {"method": "int4", "group_size": 32}}
    small, _ = rk.compress(model, mixed, calib=ids, progress=False)
    assert not group_experts(small) and all(m._grouped is None for m in experts_of(small))
    circulant = {"{blocks}.*.mlp.experts.*.down_proj": {"method": "block_circulant", "block_size": 16}, **INT4}
    small, _ = rk.compress(model, circulant, calib=ids, progress=False)
    ex = experts_of(small)[0]
    assert ex._grouped is None  # block-circulant has no grouped op: gate_up is not stacked either (nothing changed)
    ptrs = {ex.expert(e).gate_up_proj.qweight.untyped_storage().data_ptr() for e in range(4)}
    assert len(ptrs) == 4
    small, _ = rk.compress(model, INT4, calib=ids, progress=False)
    monkeypatch.setattr(UnfusedExperts, "_forward_grouped", lambda *a: pytest.fail("grouped path while training"))
    for p in small.parameters():
        p.requires_grad_(p.is_floating_point())
    small(ids).logits.sum().backward()  # scales and zeros train through the per-expert int4_linear
    assert small.get_submodule("model.layers.0.mlp.experts.1.down_proj").scales.grad is not None


def test_x_gradient_through_the_grouped_path():
    """Experts frozen, grad mode on (a LoRA or an upstream layer training): the grouped op passes x's
    gradient, the same as the per-expert path's."""
    small, _ = rk.compress(tiny_moe(), INT4, calib=_ids(8, 16), progress=False)
    ex = experts_of(small)[0]
    h = torch.randn(6, 32, requires_grad=True)
    idx, w = torch.tensor([[0, 2], [1, 2], [3, 0], [2, 1], [0, 3], [1, 0]]), torch.rand(6, 2)
    assert ex._grouped_ok()
    (ex(h, idx, w) ** 2).sum().backward()
    g_grouped = h.grad.clone()
    h.grad = None
    ex._grouped = None
    (ex(h, idx, w) ** 2).sum().backward()
    torch.testing.assert_close(g_grouped, h.grad, rtol=1e-5, atol=1e-6)


def test_sentinel_experts_and_compile_without_graph_breaks():
    small, _ = rk.compress(tiny_moe(), INT4, calib=_ids(8, 16), progress=False)
    ex = experts_of(small)[0]
    h = torch.randn(5, 32)
    idx = torch.tensor([[0, 4], [4, 4], [3, 1], [2, 2 + 2], [1, 0]])  # 4: an expert-parallel sentinel (skipped)
    w = torch.rand(5, 2)
    with torch.no_grad():
        got = ex(h, idx, w)
        compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")(h, idx, w)
        ex._grouped = None
        want = ex(h, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled, want, rtol=1e-5, atol=1e-6)
    assert not got[1].any()


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [INT4, LOWRANK_PIVOTED])
def test_grouped_experts_on_the_gpu_in_a_cuda_graph(recipe):
    """fp16 on the GPU (the Triton kernel): the per-expert outputs, and a captured forward replayed with other
    routing gives that routing's outputs (no host sync in the grouped path)."""
    small, _ = rk.compress(tiny_moe(), recipe, calib=_ids(8, 16), progress=False)
    small = small.to("cuda", torch.float16)
    ex = experts_of(small)[0]
    assert ex._grouped is not None and ex._grouped["down_proj"][0].is_cuda
    h = torch.randn(3, 32, device="cuda", dtype=torch.float16)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]], device="cuda")
    w = torch.rand(3, 2, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ex(h, idx, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ex(h, idx, w)
        idx.copy_(torch.tensor([[3, 0], [0, 1], [2, 0]]))
        graph.replay()
        grouped = ex._grouped
        ex._grouped = None
        want = ex(h, idx, w)
        ex._grouped = grouped
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_experts_no_rule_compressed_are_fused_again(arch, tmp_path):
    """A recipe that leaves the experts dense gives back transformers' own experts module (its fast, sync-free
    implementation), the same weights in their own storage; the checkpoint keeps the original layout."""
    from reparam_kernels.compress.experts import fused_experts_names
    from reparam_kernels.compress.sharing_copy import shares_storage

    model, ids = tiny_moe(arch), _ids(8, 16)
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n}
    small, _ = rk.compress(model, {"{blocks}.*.self_attn.*": "int8"}, calib=ids, progress=False)
    assert not experts_of(small) and fused_experts_names(small) == fused_experts_names(model)
    after = {n: p for n, p in small.named_parameters() if ".mlp.experts." in n}
    assert after.keys() == experts_before.keys()
    assert all(torch.equal(after[n], w) for n, w in experts_before.items())
    assert not shares_storage(small, model)
    h = torch.randn(5, 32)
    idx, w = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]]), torch.rand(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(small.model.layers[0].mlp.experts(h, idx, w),
                                   model.model.layers[0].mlp.experts(h, idx, w), rtol=0, atol=0)
    rk.save_compressed(small, tmp_path / "ck")
    back = rk.load_pretrained(tmp_path / "ck")
    assert not experts_of(back) and fused_experts_names(back)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits, rtol=0, atol=0)


def test_distilled_int4_experts_still_group_with_their_trained_tensors():
    """distill trains the experts' scales and zeros through the per-expert path; the grouped forward afterwards
    reads the trained values (the experts' Parameters are views of the stacked storage)."""
    teacher, ids = tiny_moe(), _ids(8, 16)
    student, _ = rk.compress(teacher, INT4, calib=ids, progress=False)
    before = student.get_submodule("model.layers.0.mlp.experts.2.down_proj").scales.detach().clone()
    rk.distill(student, teacher, _ids(16, 16, seed=2), steps=5, lr=1e-2, batch_size=4, progress=False)
    after = student.get_submodule("model.layers.0.mlp.experts.2.down_proj").scales
    assert not torch.equal(before, after.detach())
    for m in experts_of(student):
        m.requires_grad_(False)
    assert all(m._grouped_ok() for m in experts_of(student))
    with torch.no_grad():
        got = student(_ids()).logits
    torch.testing.assert_close(got, per_expert(student, _ids()), rtol=1e-5, atol=1e-5)


def test_generate_through_grouped_experts():
    small, _ = rk.compress(tiny_moe(), MIXED, calib=_ids(8, 16), progress=False)
    other = copy.deepcopy(small)
    for m in experts_of(other):
        m._grouped = None
    ids = _ids(2, 5, seed=3)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(small.generate(ids, **kw), other.generate(ids, **kw))


def test_bias_and_x_gradients_through_the_grouped_path():
    """GPT-OSS's experts have biases (trainable Parameters by default): in grad mode the grouped path still
    runs and their gradients, and x's, are the per-expert path's."""
    small, _ = rk.compress(tiny_moe("gpt_oss"), INT4, calib=_ids(8, 16), progress=False)
    ex = experts_of(small)[0]
    assert ex._grouped_ok() and ex.expert(1).down_proj.bias.requires_grad
    h = torch.randn(6, 32, requires_grad=True)
    idx, w = torch.tensor([[0, 2], [1, 2], [3, 0], [2, 1], [0, 3], [1, 0]]), torch.rand(6, 2)
    grads = []
    for grouped in (True, False):
        if not grouped:
            ex._grouped = None
        h.grad = None
        ex.zero_grad()
        (ex(h, idx, w) ** 2).sum().backward()
        grads.append((h.grad.clone(), [ex.expert(e).down_proj.bias.grad.clone() for e in range(4)],
                      [ex.expert(e).gate_up_proj.bias.grad.clone() for e in range(4)]))
    (gx, gd, gu), (lx, ld, lu) = grads
    torch.testing.assert_close(gx, lx, rtol=1e-5, atol=1e-6)
    for a, b in zip(gd + gu, ld + lu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lowrank_experts_of_ragged_ranks_are_views_of_flat_storage(tmp_path):
    """A global allocation gives each expert its own rank and keeps some dense: the factors are stacked flat (no
    padding), each expert's u, w and perm (a dense expert's weight) views of it; the same after a save / load and
    .double()."""
    small, _ = rk.compress(tiny_moe(), LOWRANK_PIVOTED, calib=_ids(8, 16), progress=False)
    rk.save_compressed(small, tmp_path / "ck")
    back = rk.load_pretrained(tmp_path / "ck")
    assert all(m._grouped is not None for m in experts_of(back))
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, small(_ids()).logits, rtol=0, atol=0)
    ex = experts_of(small)[0]
    kinds = {type(getattr(ex.expert(e), p)).__name__ for e in range(4) for p in ("gate_up_proj", "down_proj")}
    assert kinds == {"PivotedLowRankLinear", "Linear"}  # (the allocation kept some gate_up experts dense)
    for proj, n, k in (("gate_up_proj", 128, 32), ("down_proj", 32, 64)):
        st = ex._grouped[proj]
        assert st.op is rk.ops.grouped_lowrank_linear
        layers = [getattr(ex.expert(e), proj) for e in range(4)]
        ranks = [getattr(m, "rank", min(n, k)) for m in layers]
        u, w, perm = st.tensors
        fo, n_out, max_rank, row_align = st.consts
        assert fo[0].tolist() == [0] + torch.tensor(ranks).cumsum(0).tolist() and n_out == n
        assert max_rank == max(ranks) and u.numel() == n * sum(ranks) and perm.shape == (4, k)
        assert row_align == next(a for a in (8, 4, 2, 1) if all(r % a == 0 for r in ranks + [k - r for r in ranks]))
        for e, m in enumerate(layers):
            views = st.views(e)
            names = ("weight",) if type(m) is torch.nn.Linear else ("u", "w", "perm")
            assert tuple(views) == names
            for name in names:
                assert getattr(m, name).data_ptr() == views[name].data_ptr() and getattr(m, name).is_contiguous()
    small.double()
    assert experts_of(small)[0]._grouped["down_proj"].tensors[0].dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(small(_ids()).logits, per_expert(small, _ids()), rtol=1e-10, atol=1e-10)


# one projection compressed, the other left dense (nn.Linear experts): the dense one joins as exact factors
GATE_UP_LOWRANK = {"{blocks}.*.mlp.experts.*.gate_up_proj": {"method": "lowrank", "ratio": 0.5}}
DOWN_INT8 = {"{blocks}.*.mlp.experts.*.down_proj": "int8"}


@pytest.mark.parametrize("recipe,dense,n,k", [(GATE_UP_LOWRANK, "down_proj", 32, 64), (DOWN_INT8, "gate_up_proj", 128, 32)])
def test_a_projection_left_dense_groups_beside_a_compressed_one(recipe, dense, n, k, tmp_path):
    small, _ = rk.compress(tiny_moe(), recipe, calib=_ids(8, 16), progress=False)
    for ex in experts_of(small):
        assert ex._grouped is not None and ex._grouped[dense].op is rk.ops.grouped_lowrank_linear
        layers = [getattr(ex.expert(e), dense) for e in range(4)]
        assert all(type(m) is torch.nn.Linear for m in layers)
        u = ex._grouped[dense].tensors[0]  # the weights are views of the flat factors (out < in: v = W, u = I)
        assert all(m.weight.untyped_storage().data_ptr() == ex._grouped[dense].tensors[0 if n >= k else 1]
                   .untyped_storage().data_ptr() for m in layers)
        assert u.numel() == 4 * n * min(n, k)
    with torch.no_grad():
        got = small(_ids()).logits
    torch.testing.assert_close(got, per_expert(small, _ids()), rtol=1e-5, atol=1e-5)
    rk.save_compressed(small, tmp_path / "ck")
    back = rk.load_pretrained(tmp_path / "ck")
    assert all(m._grouped is not None for m in experts_of(back))
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, got, rtol=0, atol=0)


def test_lowrank_experts_compile_and_save_load(tmp_path):
    small, _ = rk.compress(tiny_moe("qwen3_moe"), LOWRANK, calib=_ids(8, 16), progress=False)
    ex = experts_of(small)[0]
    st = ex._grouped["down_proj"]
    assert tuple(st.views(1)) == ("u", "v") and len(st.tensors) == 2 and st.consts[0] is None  # plain: no perm
    h, w = torch.randn(5, 32), torch.rand(5, 2)
    idx = torch.tensor([[0, 4], [4, 4], [3, 1], [2, 2], [1, 0]])  # 4: a sentinel
    with torch.no_grad():
        got = ex(h, idx, w)
        compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")(h, idx, w)
    torch.testing.assert_close(compiled, got, rtol=1e-5, atol=1e-6)
    rk.save_compressed(small, tmp_path / "ck")
    back = rk.load_pretrained(tmp_path / "ck")
    assert all(m._grouped is not None for m in experts_of(back))
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, small(_ids()).logits, rtol=0, atol=0)
