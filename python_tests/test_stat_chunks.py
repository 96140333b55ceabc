"""A block whose calibration statistics pass a memory budget is calibrated a chunk of whole experts at a time,
the rest last (compress/stat_chunks.py) — with the same statistics, so the same compressed model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress.experts import unfuse_experts  # noqa: E402
from reparam_kernels.compress.stat_chunks import chunks, gram_bytes  # noqa: E402

from test_experts import _ids, tiny_moe  # noqa: E402

E = 8


def _block():
    model = tiny_moe(num_local_experts=E, num_experts_per_tok=2)
    unfuse_experts(model)
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and "gate" != n.rsplit(".", 1)[-1]]
    return block, names


def test_chunks_hold_whole_experts_within_the_budget_and_the_rest_last():
    block, names = _block()
    assert chunks(block, names, gram_bytes(block, names)) == [names]  # fits: one pass, as before
    one = gram_bytes(block, ["mlp.experts.0.gate_up_proj", "mlp.experts.0.down_proj"])
    for per, budget in ((1, 1), (1, one), (2, 2 * one), (3, 3 * one + 1)):
        parts = chunks(block, names, budget)
        *experts, rest = parts
        assert rest == [n for n in names if ".experts." not in n] and rest
        assert len(experts) == -(-E // per)
        for part in experts:
            ids = {n.split(".")[2] for n in part}
            assert len(part) == 2 * len(ids) and len(ids) <= per  # both projections of each expert together
        assert sorted(sum(parts, [])) == sorted(names)
    dense = [n for n in names if ".experts." not in n]  # nothing to split: one pass, whatever the budget
    assert chunks(block, dense, 1) == [dense]


@pytest.mark.parametrize("rule", [{"method": "int4", "group_size": 32, "gptq": True}, {"method": "lowrank", "rank": 8}])
def test_chunked_calibration_gives_the_one_pass_model(rule):
    model, ids = tiny_moe(num_local_experts=E, num_experts_per_tok=2), _ids(4, 16)
    recipe = {"{blocks}.*.self_attn.*": "int8", "{blocks}.*.mlp.experts.*.*": rule}
    runs = {}
    for key, budget in (("whole", None), ("split", 1)):  # 1 byte: every expert its own chunk
        calls = []
        h = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))  # (the copy shares it)
        try:
            runs[key] = rk.compress(model, recipe, calib=ids, progress=False, stats_memory=budget), len(calls)
        finally:
            h.remove()
    (whole, rep_whole), calls_whole = runs["whole"]
    (split, rep_split), calls_split = runs["split"]
    batches = -(-ids.shape[0] // 4)
    assert calls_split - calls_whole == batches * (E + 1)  # the pool pass, E expert chunks and the rest: E + 1 more
    assert {r.name for r in rep_split.layers} == {r.name for r in rep_whole.layers}
    by_name = {r.name: r for r in rep_whole.layers}
    for r in rep_split.layers:
        want = by_name[r.name]
        assert r.calib_rows == want.calib_rows
        torch.testing.assert_close(split.get_submodule(r.name).to_dense(), whole.get_submodule(r.name).to_dense(),
                                   rtol=1e-5, atol=1e-6)
        assert r.output_error == pytest.approx(want.output_error, rel=1e-6)
    assert set(rep_split.pooled) == set(rep_whole.pooled)
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, whole(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_stats_memory_is_refused(bad):
    with pytest.raises(ValueError, match="stats_memory"):
        rk.compress(tiny_moe(), {"{blocks}.*.mlp.experts.*.*": "int8"}, calib=_ids(1, 8), progress=False,
                    stats_memory=bad)


def test_default_budget_is_half_the_hosts_available_memory():
    from reparam_kernels.compress.stat_chunks import _host_available, default_budget

    free = _host_available()
    assert free is None or free > 0
    if free:
        assert abs(default_budget("cpu") - free // 2) < free // 20  # (memory moves a little between the calls)
