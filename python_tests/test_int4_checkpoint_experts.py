"""Mixture-of-experts GPTQ checkpoints (per-expert gate / up / down Linears, as the tools write them) onto
transformers 5's fused experts modules (compress/checkpoint_experts.py): Qwen3-MoE's names and Mixtral's (w1 / w3
/ w2 under block_sparse_moe), with and without act order, against the dense model carrying the dequantized
weights."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress.experts import UnfusedExperts, unfuse_experts  # noqa: E402
from reparam_kernels.nn import Int4Linear, PermutedInputLinear  # noqa: E402
from test_int4_checkpoints import pack_gptq, random_layer, reference_weight, save_sharded  # noqa: E402

ARCHS = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                           mlp_only_layers=[], head_dim=16),
         "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
         "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2)}
# the checkpoint's names of an expert's projections, and of the MoE block (Mixtral's as transformers 4 had them)
NAMES = {"qwen3_moe": (("gate_proj", "up_proj", "down_proj"), ".mlp."),
         "mixtral": (("w1", "w3", "w2"), ".block_sparse_moe."), "gpt_oss": (("gate_proj", "up_proj", "down_proj"), ".mlp.")}


def tiny_moe(arch):
    cfg = transformers.AutoConfig.for_model(arch, vocab_size=97, hidden_size=64, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, **ARCHS[arch])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    unfuse_experts(model)  # the truth: per-expert Linears carrying the dequantized weights
    return model


def quantize(rng, w_shape, group, perm=None):
    """Random GPTQ tensors of an [N, K] layer and the float weight they stand for."""
    n, k = w_shape
    codes, zeros, scales = random_layer(rng, k, n, group, zero_range=(1, 16))
    g_idx = perm // group if perm is not None else torch.arange(k) // group
    qw, qz = pack_gptq(codes, zeros)
    return {"qweight": qw, "qzeros": qz, "scales": scales, "g_idx": g_idx.int()}, \
        reference_weight(codes, zeros, scales, g_idx).float()


def write_moe_checkpoint(model, path, arch, act_order=False, split_orders=False, group=32):
    (gate_n, up_n, down_n), block = NAMES[arch]
    rng = torch.Generator().manual_seed(7)
    tensors, done = {}, set()
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not name.endswith("_proj"):
            continue
        n, k = mod.weight.shape
        perm = torch.randperm(k, generator=rng) if act_order else None
        ckpt = name.replace(".mlp.", block)
        if name.endswith("gate_up_proj"):  # the tools' gate and up: two Linears of half the rows
            base = ckpt[: -len("gate_up_proj")]
            up_perm = torch.randperm(k, generator=rng) if split_orders else perm
            (g, wg), (u, wu) = quantize(rng, (n // 2, k), group, perm), quantize(rng, (n // 2, k), group, up_perm)
            tensors.update({f"{base}{gate_n}.{s}": t for s, t in g.items()})
            tensors.update({f"{base}{up_n}.{s}": t for s, t in u.items()})
            w = torch.cat([wg, wu])
        else:
            q, w = quantize(rng, (n, k), group, perm)
            ckpt = ckpt[: -len("down_proj")] + down_n if ".experts." in name and name.endswith("down_proj") else ckpt
            tensors.update({f"{ckpt}.{s}": t for s, t in q.items()})
        with torch.no_grad():
            mod.weight.copy_(w)
        done.add(name)
    for key, v in model.state_dict().items():
        if key.rpartition(".")[0] not in done:
            tensors[key.replace(".mlp.", block)] = v.clone()
    save_sharded(model, path, tensors, {"quant_method": "gptq", "bits": 4, "group_size": group,
                                        "desc_act": act_order, "sym": False, "checkpoint_format": "gptq"})


@pytest.mark.parametrize("arch,act_order", [("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", False)])
def test_moe_checkpoint_matches_the_dense_model(tmp_path, arch, act_order):
    dense = tiny_moe(arch)
    write_moe_checkpoint(dense, tmp_path / "ckpt", arch, act_order)
    model = rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts)
    gate_up = experts.expert(1).gate_up_proj
    assert isinstance(gate_up, PermutedInputLinear if act_order else Int4Linear) and gate_up.out_features == 128
    assert (experts._grouped is not None) == (not act_order)  # int4 experts: one grouped launch a projection
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    rk.save_compressed(model, tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(rk.load_pretrained(tmp_path / "ours")(ids).logits, model(ids).logits)


def test_gate_and_up_in_different_orders_say_why(tmp_path):
    dense = tiny_moe("qwen3_moe")
    write_moe_checkpoint(dense, tmp_path / "ckpt", "qwen3_moe", act_order=True, split_orders=True)
    with pytest.raises(ValueError, match="cannot be stacked"):
        rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)



def test_interleaved_experts_are_refused(tmp_path):
    # GPT-OSS alternates gate and up rows: stacking gate's rows then up's would be silently wrong
    dense = tiny_moe("gpt_oss")
    write_moe_checkpoint(dense, tmp_path / "ckpt", "gpt_oss")
    with pytest.raises(ValueError, match="interleaves gate and up"):
        rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act_order", [False, True])
def test_moe_checkpoint_on_the_gpu_kernels(tmp_path, act_order):
    # fp16 on the GPU: the grouped int4 kernels (per-expert ones with act order) against float64
    dense = tiny_moe("qwen3_moe")
    write_moe_checkpoint(dense, tmp_path / "ckpt", "qwen3_moe", act_order)
    model = rk.load_int4_pretrained(tmp_path / "ckpt", dtype=torch.float16, progress=False).cuda()
    assert (model.model.layers[0].mlp.experts._grouped is not None) == (not act_order)  # (.cuda() groups again)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = dense.double()(ids).logits
        got = model(ids.cuda()).logits.double().cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
