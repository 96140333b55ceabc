"""compress(device=) for a model kept elsewhere: the planning passes run one block at a time on the device
(compress/fisher_blockwise.py, blocks.visit_layers), with the results of the whole-model passes.

On the CPU the device is the model's own, so the block-by-block path is forced by making `same_device`
say no; the GPU test at the end moves a CPU model's blocks to the GPU for real."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress import allocate, allocate_bits, blocks, fisher_blockwise, pipeline  # noqa: E402
from reparam_kernels.compress.fisher import output_fisher  # noqa: E402
from reparam_kernels.compress.recipe import conv1d_as_linear  # noqa: E402

from test_compress_conv1d import tiny_gpt2  # noqa: E402
from test_compress_pipeline import _ids, tiny_llama  # noqa: E402

LLAMA_NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.2.self_attn.q_proj",
               "lm_head"]
# lowrank with Fisher weights and a global budget on attention, int4 / int8 under mean_bits on the MLPs
MIXED = {"rules": [
    {"match": "model.layers.*.self_attn.*_proj", "method": "lowrank", "ratio": 0.3, "whiten": True, "fisher": True,
     "allocate": "global"},
    {"match": "model.layers.*.mlp.*_proj", "method": "int4", "group_size": 32, "mean_bits": 6.0}]}


@pytest.fixture
def blockwise(monkeypatch):
    """device="cpu" then takes the block-by-block path, as a CPU model with device="cuda" does."""
    monkeypatch.setattr(blocks, "same_device", lambda a, b: False)  # output_fisher reads it from blocks
    monkeypatch.setattr(pipeline, "same_device", lambda a, b: False)


def _llama():
    return tiny_llama(seed=3, layers=3, hidden=64, ffn=96)


def _gpt2_with_linears():
    model = tiny_gpt2()
    for blk in model.transformer.h:
        blk.mlp.c_fc = conv1d_as_linear(blk.mlp.c_fc)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_blockwise_fisher_matches_the_whole_model_pass(arch, blockwise):
    if arch == "llama":
        model, names, ids = _llama(), LLAMA_NAMES, _ids(5, 16, seed=4)
    else:  # blocks return tuples; the head is ln_f + a tied lm_head
        model, ids = _gpt2_with_linears(), torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(2))
        names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "lm_head"]
    batches = list(ids.split(2))
    got = output_fisher(model, batches, names, progress=False, device="cpu")
    blocks.same_device = lambda a, b: True  # the whole-model pass (monkeypatch restores it)
    want = output_fisher(model, batches, names, progress=False, device="cpu")
    for n in names:
        assert want[n].abs().max() > 0
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6 * float(want[n].abs().max()))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # given back as they were


def test_blockwise_fisher_runs_each_block_on_batches_once_forward_and_once_backward(blockwise, monkeypatch):
    model, ids = _llama(), _ids(6, 16, seed=5)
    calls = {i: 0 for i in range(3)}
    for i, blk in enumerate(model.model.layers):
        blk.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))  # runs that finish
    active = []
    real = fisher_blockwise.on_device

    def one_at_a_time(block, device):
        active.append(block)
        assert len(active) == 1, "two blocks on the device at once"
        return _Exit(real(block, device), active)

    monkeypatch.setattr(fisher_blockwise, "on_device", one_at_a_time)
    output_fisher(model, list(ids.split(3)), ["model.layers.1.mlp.up_proj"], progress=False, device="cpu")
    # 2 batches: every block forward once a batch; blocks 2 and 1 again for the backward; the head pass,
    # a sequence at a time, runs no block (stand-ins)
    assert calls == {0: 2, 1: 4, 2: 4}


class _Exit:
    def __init__(self, ctx, active):
        self.ctx, self.active = ctx, active

    def __enter__(self):
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        self.active.pop()
        return self.ctx.__exit__(*exc)


def test_compress_plans_with_one_fisher_pass(monkeypatch):
    model, ids = _llama(), _ids(8, 16, seed=6)
    passes = []
    real = pipeline.output_fisher
    monkeypatch.setattr(pipeline, "output_fisher", lambda *a, **k: passes.append(1) or real(*a, **k))
    for mod in (allocate, allocate_bits):
        monkeypatch.setattr(mod, "output_fisher", lambda *a, **k: pytest.fail("a second Fisher pass"))
    _, rep = rk.compress(model, MIXED, calib=ids, progress=False)
    assert passes == [1]
    assert {r.method for r in rep.layers} >= {"lowrank", "int4", "int8"}


LM_HEAD = {"match": "lm_head", "method": "lowrank", "ratio": 0.3, "whiten": True}  # statistics after the blocks


# lm_head inside the global allocations: in the rank budget, in the mean_bits budget
PLANNED_LM_HEAD = [{"rules": MIXED["rules"] + [{**MIXED["rules"][0], "match": "lm_head"}]},
                   {"rules": MIXED["rules"] + [{**MIXED["rules"][1], "match": "lm_head"}]}]


@pytest.mark.parametrize("recipe", [MIXED, {"rules": MIXED["rules"] + [LM_HEAD]}, *PLANNED_LM_HEAD],
                         ids=["blocks", "with-lm_head", "lm_head-in-rank-budget", "lm_head-in-mean-bits"])
def test_compress_with_a_device_gives_the_same_model(recipe, blockwise):
    model, ids = _llama(), _ids(8, 16, seed=6)
    out_dev, rep_dev = rk.compress(model, recipe, calib=ids, progress=False, device="cpu")
    blocks.same_device = pipeline.same_device = lambda a, b: True
    out, rep = rk.compress(model, recipe, calib=ids, progress=False)
    assert [(r.name, r.method, r.settings) for r in rep_dev.layers] == [(r.name, r.method, r.settings) for r in rep.layers]
    x = _ids(2, 16, seed=7)
    torch.testing.assert_close(out_dev(x).logits, out(x).logits, rtol=1e-4, atol=1e-4)


def test_lm_head_statistics_with_a_device_run_no_block_again(blockwise):
    """With device=, the Linears after the blocks get their inputs from the blocks' kept outputs (the head
    alone on the device), not from a whole-model forward that would run every block once more."""
    model, ids = _llama(), _ids(8, 16, seed=6)
    runs = []
    for blk in model.model.layers:
        blk.register_forward_hook(lambda m, a, o: runs.append(1))
    recipe = {"rules": [{"match": "model.layers.*.mlp.*_proj", "method": "int4", "group_size": 32}, LM_HEAD]}
    _, rep = rk.compress(model, recipe, calib=ids, progress=False, inplace=True, device="cpu")
    assert {r.name: r.method for r in rep.layers}["lm_head"] == "lowrank"
    assert len(runs) == 3 * 2 * 2  # 3 blocks × 2 batches × (statistics + outputs)


@pytest.mark.parametrize("names", [["model.layers.1.mlp.up_proj", "lm_head"], ["lm_head"]], ids=["both", "lm_head"])
@pytest.mark.parametrize("away", [False, True], ids=["whole-model", "block-by-block"])
def test_visit_layers_gives_lm_head_the_final_norms_outputs(names, away, monkeypatch):
    """The global allocations' pass (blocks.visit_layers) reaches Linears after the blocks: lm_head's
    statistics are those of its real inputs, with the model's home device or a device away from it."""
    model, ids = _llama(), _ids(6, 16, seed=8)
    batches = list(ids.split(4))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    hook.remove()
    x = torch.cat(seen).double()
    if away:
        monkeypatch.setattr(blocks, "same_device", lambda a, b: False)
    got, runs = {}, []
    for blk in model.model.layers:
        blk.register_forward_hook(lambda m, a, o: runs.append(1))
    blocks.visit_layers(model, batches, names, lambda n, lin, st: got.setdefault(n, st), "test", progress=False,
                        device="cpu" if away else None)
    assert list(got) == names and got["lm_head"].count == x.shape[0]
    torch.testing.assert_close(got["lm_head"].gram, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))
    # per batch: up_proj's statistics take blocks 0 and 1 (block 1 once more for its outputs when the walk goes
    # on); then at home one whole-model forward, away the last block's outputs for the head alone
    inner = len(names) - 1
    assert len(runs) == ((3 + inner) if away else (3 + 2 * inner)) * len(batches)


def test_blockwise_fisher_needs_a_list_of_blocks(blockwise):
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    model.get_input_embeddings = lambda: model[0]
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        output_fisher(model, [torch.zeros(1, 4, dtype=torch.long)], ["1"], progress=False, device="cpu")


@pytest.mark.gpu
def test_cpu_model_planned_on_the_gpu_matches_the_cpu():
    model, ids = _llama(), _ids(8, 16, seed=6)
    batches = list(ids.split(4))
    want = output_fisher(model, batches, LLAMA_NAMES, progress=False)
    got = output_fisher(model, batches, LLAMA_NAMES, progress=False, device="cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model stays where it was
    for n in LLAMA_NAMES:
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-4 * float(want[n].abs().max()))
    recipe = {"rules": MIXED["rules"] + [LM_HEAD]}
    out, rep_gpu = rk.compress(model, recipe, calib=ids, progress=False, device="cuda")
    assert all(p.device.type == "cpu" for p in out.parameters())  # compressed on the GPU, handed back on the CPU
    _, rep_cpu = rk.compress(model, recipe, calib=ids, progress=False)
    assert [(r.name, r.method) for r in rep_gpu.layers] == [(r.name, r.method) for r in rep_cpu.layers]


def test_stand_in_holds_no_weights_and_answers_for_the_block():
    from reparam_kernels.compress.fisher_blockwise import _StandIn

    block = torch.nn.Linear(4, 4)
    block.attention_type = "sliding_attention"  # read by some models' block loops
    stand = _StandIn(block, astuple=True)
    assert list(stand.parameters()) == [] and stand.attention_type == "sliding_attention"
    h = torch.randn(1, 2, 4)
    assert stand(h)[0] is h  # hands its input on, as a tuple like the real block's output
    stand.value = torch.zeros(1, 2, 4)
    assert stand(h)[0] is stand.value


def test_a_recipe_for_lm_head_alone_still_runs_the_blocks_on_the_device(blockwise, monkeypatch):
    """No block holds a matched Linear, yet with device= the blocks run there one at a time (once per batch)
    and lm_head's inputs come from the head alone — not from a whole-model forward where the model is."""
    model, ids = _llama(), _ids(8, 16, seed=6)
    runs, heads = [], []
    for blk in model.model.layers:
        blk.register_forward_hook(lambda m, a, o: runs.append(1))
    real = fisher_blockwise.head_only  # (blocks.outside_inputs looks it up there at each call)
    monkeypatch.setattr(fisher_blockwise, "head_only", lambda *a: heads.append(1) or real(*a))
    out_dev, rep_dev = rk.compress(model, {"rules": [LM_HEAD]}, calib=ids, progress=False, device="cpu")
    assert len(runs) == 3 * 2 and heads == [1]  # 3 blocks × 2 batches, once each; then the head alone
    blocks.same_device = pipeline.same_device = lambda a, b: True
    out, rep = rk.compress(model, {"rules": [LM_HEAD]}, calib=ids, progress=False)
    assert heads == [1] and rep_dev.layers[0].method == rep.layers[0].method == "lowrank"
    x = _ids(2, 16, seed=7)
    torch.testing.assert_close(out_dev(x).logits, out(x).logits, rtol=1e-4, atol=1e-4)
