"""compressed-tensors checkpoints (llm-compressor W4A16 / W8A16) onto Int4Linear / Int8Linear
(reparam_kernels/compress/ct_checkpoints.py).

The packer below is written from the format's description (a loop over the values of a word, not the
converter's vectorized unpacking); each converted layer is checked against W = (code − zero) · scale computed
in float64 from the signed codes it was packed from, and a whole tiny Llama checkpoint against the dense model
carrying those weights.
"""
import json

import pytest
import torch
from test_int4_checkpoints import save_sharded, tiny_llama, to_int32

import reparam_kernels as rk
from reparam_kernels.compress import ct_checkpoints as CT
from reparam_kernels.nn import Int4Linear, Int8Linear
from reparam_kernels.nn.permuted import PermutedInputLinear


def pack(signed, bits, dim=1):
    """Signed values → int32 words along `dim`: value f i + j at bits bits·j of word i, each stored + 2^(bits−1)."""
    f = 32 // bits
    u = signed.long() + (1 << (bits - 1))
    if dim == 0:
        return pack(signed.t(), bits).t().contiguous()
    pad = -u.shape[1] % f
    u = torch.cat([u, torch.zeros(u.shape[0], pad, dtype=torch.long)], 1)
    out = torch.zeros(u.shape[0], u.shape[1] // f, dtype=torch.long)
    for j in range(f):
        out |= u[:, j::f] << (bits * j)
    return to_int32(out)


def random_ct_layer(rng, n, k, bits, group, symmetric, act_order):
    """Signed codes [N, K], scales [N, G], signed zeros [N, G] (None: symmetric), g_idx [K] (None: in order)."""
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    g = k // group
    codes = torch.randint(lo, hi, (n, k), generator=rng)
    scales = torch.rand(n, g, generator=rng) * 0.02 + 0.005
    zeros = None if symmetric else torch.randint(lo, hi, (n, g), generator=rng)
    g_idx = torch.randperm(k, generator=rng) // group if act_order else None
    return codes, scales, zeros, g_idx


def reference(codes, scales, zeros, g_idx):
    g = torch.arange(codes.shape[1]) // (codes.shape[1] // scales.shape[1]) if g_idx is None else g_idx.long()
    z = 0 if zeros is None else zeros.double()[:, g]
    return (codes.double() - z) * scales.double()[:, g]


def tensors_of(prefix, codes, scales, zeros, g_idx, bits, naive=False, old_zeros=False):
    out = {f"{prefix}.weight_scale": scales}
    if naive:
        out[f"{prefix}.weight"] = codes.to(torch.int8)
    else:
        out[f"{prefix}.weight_packed"] = pack(codes, bits)
        out[f"{prefix}.weight_shape"] = torch.tensor(codes.shape, dtype=torch.int32)
    if zeros is not None:
        out[f"{prefix}.weight_zero_point"] = zeros.to(torch.int8) if old_zeros else pack(zeros, bits, dim=0)
    if g_idx is not None:
        out[f"{prefix}.weight_g_idx"] = g_idx.int()
    return out


@pytest.mark.parametrize("symmetric,act_order,group,old_zeros", [
    (True, False, 32, False), (False, False, 32, False), (False, True, 32, False), (True, True, 32, False),
    (False, False, 96, True), (True, False, 96, False)])  # 96 = K: strategy "channel"
def test_int4_layer_is_exact(symmetric, act_order, group, old_zeros):
    rng = torch.Generator().manual_seed(11)
    n, k = 36, 96  # N not a multiple of 8: the packed zero points' last word is padded
    codes, scales, zeros, g_idx = random_ct_layer(rng, n, k, 4, group, symmetric, act_order)
    layer = CT.ct_to_linear(tensors_of("l", codes, scales, zeros, g_idx, 4, old_zeros=old_zeros), "l")
    assert isinstance(layer, PermutedInputLinear if act_order else Int4Linear)
    torch.testing.assert_close(layer.to_dense().double(), reference(codes, scales, zeros, g_idx), rtol=0, atol=1e-6)


@pytest.mark.parametrize("naive,per_tensor", [(False, False), (True, False), (False, True)])
def test_int8_layer_is_exact(naive, per_tensor):
    rng = torch.Generator().manual_seed(12)
    codes, scales, _, _ = random_ct_layer(rng, 24, 64, 8, 64, True, False)
    stored = scales[:1, 0].clone() if per_tensor else scales  # strategy "tensor": one scale, shape [1]
    layer = CT.ct_to_linear(tensors_of("l", codes, stored, None, None, 8, naive=naive), "l")
    assert isinstance(layer, Int8Linear)
    want = reference(codes, stored.expand(24, 1) if per_tensor else scales, None, None)
    torch.testing.assert_close(layer.to_dense().double(), want, rtol=0, atol=1e-6)


def test_bad_layers_say_why():
    rng = torch.Generator().manual_seed(13)
    codes, scales, zeros, _ = random_ct_layer(rng, 16, 64, 8, 32, False, False)
    with pytest.raises(ValueError, match="Int8Linear"):  # 8-bit with zero points and groups
        CT.ct_to_linear(tensors_of("l", codes, scales, zeros, None, 8), "l")
    t = tensors_of("l", codes.clamp(-8, 7), scales, None, None, 4)
    del t["l.weight_shape"]
    with pytest.raises(ValueError, match="weight_shape"):
        CT.ct_to_linear(t, "l")
    t = tensors_of("l", codes.clamp(-8, 7), scales[:, :1].expand(16, 3).contiguous(), None, None, 4)
    with pytest.raises(ValueError, match="do not split"):
        CT.ct_to_linear(t, "l")


def config(bits=4, group=32, symmetric=True, actorder=None, fmt="pack-quantized", **extra):
    strategy = "channel" if group is None else "group"
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "group_size": group,
               "actorder": actorder, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}}, "ignore": ["lm_head"], **extra}


def write_ct_checkpoint(model, path, bits=4, group=32, symmetric=True, act_order=False, naive=False, seed=5):
    """Every Linear of model.model.layers quantized (its dense weight set to the exact dequantized values), the
    rest as it is, in two safetensors files, config.json naming compressed-tensors."""
    rng = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.")):
            continue
        n, k = mod.weight.shape
        codes, scales, zeros, g_idx = random_ct_layer(rng, n, k, bits, group or k, symmetric, act_order)
        with torch.no_grad():
            mod.weight.copy_(reference(codes, scales, zeros, g_idx).float())
        tensors.update(tensors_of(name, codes, scales, zeros, g_idx, bits, naive=naive))
    for key, v in model.state_dict().items():
        if f"{key.rpartition('.')[0]}.weight_scale" not in tensors:
            tensors[key] = v.clone()
    save_sharded(model, path, tensors, config(bits, group, symmetric, "group" if act_order else None,
                                              "naive-quantized" if naive else "pack-quantized"))


@pytest.mark.parametrize("bits,group,symmetric,act_order,naive", [
    (4, 32, True, False, False), (4, 32, False, True, False), (4, None, False, False, False),
    (8, None, True, False, False), (8, None, True, False, True)])
def test_load_matches_the_dense_model(tmp_path, bits, group, symmetric, act_order, naive):
    dense = tiny_llama(False)
    write_ct_checkpoint(dense, tmp_path / "ckpt", bits, group, symmetric, act_order, naive)
    model = rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)
    want = Int8Linear if bits == 8 else Int4Linear
    assert sum(isinstance(m, want) for m in model.modules()) == 14  # 7 a layer, 2 layers
    assert all(m._reparam_method == "compressed-tensors" for n, m in model.named_modules()
               if n.endswith("_proj") and ".mlp." in n)
    if act_order:  # q / k / v and gate / up gather x's columns; down_proj's order is folded into gate / up
        assert isinstance(model.model.layers[0].self_attn.q_proj, PermutedInputLinear)
        assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    rk.save_compressed(model, tmp_path / "ours")  # and it saves as any compressed model
    with torch.no_grad():
        assert torch.equal(rk.load_pretrained(tmp_path / "ours")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("change,match", [
    (dict(quantization_status="frozen"), "not stored compressed"),
    (dict(format="marlin-24"), "format"),
    (dict(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity"),
])
def test_settings_it_refuses(tmp_path, change, match):
    dense = tiny_llama(False)
    write_ct_checkpoint(dense, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)


@pytest.mark.parametrize("weights,acts,match", [
    ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
     {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}, "activations"),
    ({"num_bits": 8, "type": "float", "strategy": "channel"}, None, "float"),
    ({"num_bits": 3, "type": "int", "strategy": "group", "group_size": 128}, None, "3-bit"),
    ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}, None, "Int8Linear"),
    ({"num_bits": 4, "type": "int", "strategy": "block", "block_structure": [128, 128]}, None, "strategy"),
])
def test_config_groups_it_refuses(weights, acts, match):
    qc = config()
    qc["config_groups"]["group_0"].update(weights=weights, input_activations=acts)
    with pytest.raises(ValueError, match=match):
        CT.check_config(qc)


def test_kv_cache_scales_are_dropped_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    dense = tiny_llama(False)
    write_ct_checkpoint(dense, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    shard = tmp_path / "ckpt" / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors.update({f"model.layers.{i}.self_attn.{s}": torch.tensor(0.02) for i in range(2) for s in ("k_scale", "v_scale")})
    save_file(tensors, str(shard))
    with pytest.warns(RuntimeWarning, match="4 scales are dropped"):
        model = rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_recognizes_the_folder(tmp_path):
    from reparam_kernels.cli._models import is_int4_checkpoint

    write_ct_checkpoint(tiny_llama(False), tmp_path / "ckpt")
    assert is_int4_checkpoint(tmp_path / "ckpt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,act_order", [(4, True), (8, False)])
def test_loaded_checkpoint_on_the_gpu_kernels(tmp_path, bits, act_order):
    # fp16 on the GPU: the int4 / int8 CUDA kernels (and act order's gather) against the dense model in float64
    dense = tiny_llama(False)
    write_ct_checkpoint(dense, tmp_path / "ckpt", bits, 32 if bits == 4 else None, bits == 8, act_order)
    model = rk.load_int4_pretrained(tmp_path / "ckpt", dtype=torch.float16, progress=False).cuda()
    ids = torch.randint(0, 96, (3, 9))
    with torch.no_grad():
        ref = dense.double()(ids).logits
        got = model(ids.cuda()).logits.double().cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
