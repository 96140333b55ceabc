"""GPTQ / AWQ 4-bit checkpoints onto Int4Linear (reparam_kernels/compress/int4_checkpoints.py).

The packers below are written from the formats' descriptions (loops over nibbles, not the converter's
vectorized unpacking); each converted layer is checked against W = (q − z) · s computed in float64 from the
codes it was packed from, and a whole tiny Llama checkpoint against the dense model carrying those weights.
"""
import json

import pytest
import torch

import reparam_kernels as rk
from reparam_kernels.compress import int4_checkpoints as C
from reparam_kernels.nn import Int4Linear
from reparam_kernels.nn.permuted import PermutedInputLinear


def to_int32(v):
    """int64 words (0 .. 2^32 - 1) as the int32 tensors the checkpoints hold (two's complement)."""
    return ((v + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)


def pack_gptq(codes_kn, zeros_gn, v1=True):
    """GPTQ: qweight [K / 8, N], input 8 i + j at bits 4 j; qzeros [G, N / 8], output 8 c + j at bits 4 j,
    stored minus one (v1, masked to 4 bits)."""
    k, n = codes_kn.shape
    qw = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qw |= codes_kn[j::8].long() << (4 * j)
    z = (zeros_gn.long() - (1 if v1 else 0)) & 15
    qz = torch.zeros(z.shape[0], n // 8, dtype=torch.int64)
    for j in range(8):
        qz |= z[:, j::8] << (4 * j)
    return to_int32(qw), to_int32(qz)


def pack_awq(codes_kn, zeros_gn):
    """AWQ "gemm": [R, N / 8], output 8 c + ORDER[j] at bits 4 j, for the codes and the zeros alike."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)

    def pack(t):
        out = torch.zeros(t.shape[0], t.shape[1] // 8, dtype=torch.int64)
        for c in range(t.shape[1] // 8):
            for j in range(8):
                out[:, c] |= t[:, 8 * c + order[j]].long() << (4 * j)
        return to_int32(out)

    return pack(codes_kn), pack(zeros_gn)


def reference_weight(codes_kn, zeros_gn, scales_gn, g_idx):
    """[N, K] float64: W[n, k] = (q[k, n] − z[g(k), n]) · s[g(k), n]."""
    g = torch.as_tensor(g_idx).long()
    return ((codes_kn.double() - zeros_gn.double()[g]) * scales_gn.double()[g]).t()


def random_layer(rng, k, n, group, zero_range=(0, 16)):
    codes = torch.randint(0, 16, (k, n), generator=rng)
    zeros = torch.randint(*zero_range, (k // group, n), generator=rng)
    scales = torch.rand(k // group, n, generator=rng) * 0.02 + 0.005
    return codes, zeros, scales


@pytest.mark.parametrize("v1", [True, False])
def test_gptq_layer_is_exact(v1):
    rng = torch.Generator().manual_seed(0)
    k, n, group = 128, 48, 32
    codes, zeros, scales = random_layer(rng, k, n, group, zero_range=(1, 16) if v1 else (0, 16))
    zeros[0, :3] = 16 if v1 else 15  # v1 can store 16 as 15 (+1); v2 stores 0..15 as they are
    qw, qz = pack_gptq(codes, zeros, v1)
    layer = C.gptq_to_int4(qw, qz, scales, g_idx=torch.arange(k) // group,
                           checkpoint_format="gptq" if v1 else "gptq_v2")
    assert isinstance(layer, Int4Linear) and layer.group_size == group and layer.bias is None
    ref = reference_weight(codes, zeros, scales, torch.arange(k) // group)
    torch.testing.assert_close(layer.to_dense().double(), ref, rtol=1e-6, atol=1e-7)


def test_gptq_v1_stored_fifteen_is_sixteen():
    # a v1 zero stored as nibble 15 counts as 16 (what the reference GPTQ kernels compute), not as 0
    k, n = 32, 8
    codes = torch.zeros(k, n, dtype=torch.long)
    qw, _ = pack_gptq(codes, torch.ones(1, n))
    qz = to_int32(torch.full((1, 1), 0xFFFFFFFF, dtype=torch.int64))  # every stored nibble 15
    layer = C.gptq_to_int4(qw, qz, torch.ones(1, n))
    assert torch.all(layer.zeros == 16) and torch.all(layer.to_dense() == -16)


def test_gptq_act_order_becomes_permuted_input():
    rng = torch.Generator().manual_seed(1)
    k, n, group = 256, 40, 64
    codes, zeros, scales = random_layer(rng, k, n, group, zero_range=(1, 16))
    g_idx = torch.randperm(k, generator=rng) // group  # act order: each group a scattered set of inputs
    qw, qz = pack_gptq(codes, zeros)
    bias = torch.randn(n, generator=rng)
    layer = C.gptq_to_int4(qw, qz, scales, g_idx=g_idx.int(), bias=bias)
    assert isinstance(layer, PermutedInputLinear) and isinstance(layer.inner, Int4Linear)
    ref = reference_weight(codes, zeros, scales, g_idx)
    torch.testing.assert_close(layer.to_dense().double(), ref, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 5, k, generator=rng)
    torch.testing.assert_close(layer(x).double(), x.double() @ ref.t() + bias.double(), rtol=1e-4, atol=1e-4)


def test_awq_layer_is_exact():
    rng = torch.Generator().manual_seed(2)
    k, n, group = 128, 64, 128
    codes, zeros, scales = random_layer(rng, k, n, group)
    qw, qz = pack_awq(codes, zeros)
    layer = C.awq_to_int4(qw, qz, scales.half())
    assert layer.scales.dtype == torch.float16 and layer.group_size == group
    ref = reference_weight(codes, zeros, scales.half().float(), torch.arange(k) // group)
    torch.testing.assert_close(layer.to_dense().double(), ref, rtol=2e-3, atol=1e-4)  # fp16 products


def test_bad_layers_say_why():
    rng = torch.Generator().manual_seed(3)
    codes, zeros, scales = random_layer(rng, 96, 16, 48)  # groups of 48 inputs
    qw, qz = pack_gptq(codes, zeros.clamp(min=1))
    with pytest.raises(ValueError, match="multiple of 32"):
        C.gptq_to_int4(qw, qz, scales)
    codes, zeros, scales = random_layer(rng, 64, 16, 32)
    qw, qz = pack_gptq(codes, zeros.clamp(min=1))
    with pytest.raises(ValueError, match="each of its 2 groups"):
        C.gptq_to_int4(qw, qz, scales, g_idx=torch.tensor([0] * 40 + [1] * 24))
    with pytest.raises(ValueError, match="qweight"):
        C.gptq_to_int4(qw.float(), qz, scales)
    with pytest.raises(ValueError, match="out_features"):
        C.gptq_to_int4(qw, qz, scales[:, :8])
    with pytest.raises(ValueError, match="checkpoint_format"):
        C.gptq_to_int4(qw, qz, scales, checkpoint_format="marlin")


# ----------------------------------------------------------------------------- a whole checkpoint

def tiny_llama(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def write_checkpoint(model, path, method, act_order=False, group=32, seed=4, head=False):
    """Quantized tensors of every Linear in model.model.layers (their dense weights set to the exact
    dequantized values, so the dense model is the truth), the rest as they are, in two safetensors files."""
    rng = torch.Generator().manual_seed(seed)
    tensors, orders = {}, {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and (name.startswith("model.layers.") or head and name == "lm_head")):
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:  # a quantized lm_head is tied no more
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            mod = model.lm_head
        n, k = mod.weight.shape
        codes, zeros, scales = random_layer(rng, k, n, group, zero_range=(1, 16))
        # act order: siblings reading one input (q / k / v, gate / up) share GPTQ's column order, as they do
        parent, _, proj = name.rpartition(".")
        shared = (parent, "in" if proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") else proj)
        g_idx = orders.setdefault(shared, torch.randperm(k, generator=rng) // group) if act_order else \
            torch.arange(k) // group
        with torch.no_grad():
            mod.weight.copy_(reference_weight(codes, zeros, scales, g_idx).float())
        if method == "gptq":
            qw, qz = pack_gptq(codes, zeros)
            tensors[f"{name}.g_idx"] = g_idx.int()
        else:
            qw, qz = pack_awq(codes, zeros)
        tensors.update({f"{name}.qweight": qw, f"{name}.qzeros": qz, f"{name}.scales": scales})
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        tied_head = model.config.tie_word_embeddings and k == "lm_head.weight" and not head
        if f"{owner}.qweight" not in tensors and not tied_head:
            tensors[k] = v.clone()
    save_sharded(model, path, tensors, {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                                        "sym": False, "checkpoint_format": "gptq"} if method == "gptq" else
                 {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})


def save_sharded(model, path, tensors, quantization_config):
    """A checkpoint folder as the tools write one: `tensors` in two safetensors files, model's config.json with
    `quantization_config`."""
    from safetensors.torch import save_file

    keys = sorted(tensors)
    path.mkdir()
    save_file({k: tensors[k] for k in keys[: len(keys) // 2]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in keys[len(keys) // 2:]}, str(path / "model-00002-of-00002.safetensors"))
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("method,act_order,tie", [("gptq", False, True), ("gptq", True, False), ("awq", False, False)])
def test_load_int4_pretrained_matches_the_dense_model(tmp_path, method, act_order, tie):
    dense = tiny_llama(tie)
    write_checkpoint(dense, tmp_path / "ckpt", method, act_order)
    model = rk.load_int4_pretrained(tmp_path / "ckpt")
    kinds = {type(m) for n, m in model.named_modules() if n.endswith("_proj") and not n.endswith("down_proj")}
    assert kinds == ({PermutedInputLinear} if act_order else {Int4Linear})
    # act order: down_proj's gather folded into gate / up's rows (fold_orders.py)
    assert {type(m) for n, m in model.named_modules() if n.endswith("down_proj")} == {Int4Linear}
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14  # 7 a layer, 2 layers
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        rk.fuse_projections(model)  # (act order: one gather of x for q / k / v, one for gate / up)
        assert sum(isinstance(m, rk.nn.FusedProjections) for m in model.modules()) == 4
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        rk.unfuse_projections(model)
    # it saves and loads back as any compressed model (act order's permutation included)
    rk.save_compressed(model, tmp_path / "ours")
    back = rk.load_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(tmp_path):
    dense = tiny_llama(False)
    write_checkpoint(dense, tmp_path / "ckpt", "gptq")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, match in (({"bits": 8}, "only 4-bit"), ({"quant_method": "bitsandbytes"}, "quant_method"),
                          ({"checkpoint_format": "marlin"}, "checkpoint_format")):
        cfg_path.write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **change}}))
        with pytest.raises(ValueError, match=match):
            rk.load_int4_pretrained(tmp_path / "ckpt")
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(ValueError, match="no quantization_config"):
        rk.load_int4_pretrained(tmp_path / "ckpt")
    cfg_path.write_text(json.dumps({**cfg, "num_hidden_layers": 1}))  # the checkpoint has a layer more
    with pytest.raises(ValueError, match="no module|no place"):
        rk.load_int4_pretrained(tmp_path / "ckpt")


def test_cli_takes_the_folder(tmp_path):
    from reparam_kernels.cli._models import is_int4_checkpoint

    write_checkpoint(tiny_llama(False), tmp_path / "ckpt", "awq")
    assert is_int4_checkpoint(tmp_path / "ckpt") and not is_int4_checkpoint(tmp_path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_int4_checkpoint(tmp_path / "plain")


def test_settings_from_the_tools_own_files(tmp_path):
    # checkpoints saved by AutoGPTQ / AutoAWQ alone keep the settings beside config.json, in their own key names
    for method, name, own in (("gptq", "quantize_config.json", {"bits": 4, "group_size": 32, "desc_act": True}),
                              ("awq", "quant_config.json", {"w_bit": 4, "q_group_size": 32, "zero_point": True,
                                                            "version": "GEMM"})):
        dense = tiny_llama(False)
        path = tmp_path / method
        write_checkpoint(dense, path, method, act_order=method == "gptq")
        cfg = json.loads((path / "config.json").read_text())
        del cfg["quantization_config"]
        (path / "config.json").write_text(json.dumps(cfg))
        (path / name).write_text(json.dumps(own))
        model = rk.load_int4_pretrained(path, progress=False)
        ids = torch.randint(0, 96, (1, 6))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    (tmp_path / "awq" / name).write_text(json.dumps({**own, "w_bit": 8}))
    from reparam_kernels.cli._models import is_int4_checkpoint

    assert is_int4_checkpoint(tmp_path / "awq")  # routed to the loader, which says why it does not take it
    with pytest.raises(ValueError, match="only 4-bit"):
        rk.load_int4_pretrained(tmp_path / "awq")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,act_order", [("gptq", True), ("awq", False)])
def test_loaded_checkpoint_on_the_gpu_kernels(tmp_path, method, act_order):
    # fp16 on the GPU: the int4 CUDA kernel (and act order's gather) against the dense model in float64
    dense = tiny_llama(False)
    write_checkpoint(dense, tmp_path / "ckpt", method, act_order)
    model = rk.load_int4_pretrained(tmp_path / "ckpt", dtype=torch.float16, progress=False).cuda()
    ids = torch.randint(0, 96, (3, 9))
    with torch.no_grad():
        ref = dense.double()(ids).logits
        got = model(ids.cuda()).logits.double().cpu()
        rk.fuse_projections(model)
        fused = model(ids.cuda()).logits.double().cpu()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-2 * scale and (fused - ref).abs().max() <= 2e-2 * scale


def test_quantized_lm_head_of_a_tied_model(tmp_path):
    # GPTQModel can quantize lm_head; a tied model's lm_head then stops being the embeddings
    dense = tiny_llama(True)
    write_checkpoint(dense, tmp_path / "ckpt", "gptq", head=True)
    model = rk.load_int4_pretrained(tmp_path / "ckpt", progress=False)
    assert isinstance(model.lm_head, Int4Linear) and "weight" not in model.lm_head._parameters
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    rk.save_compressed(model, tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(rk.load_pretrained(tmp_path / "ours")(ids).logits, model(ids).logits)


def test_convert_command_writes_a_checkpoint_of_ours(tmp_path, capsys):
    from reparam_kernels.__main__ import main

    dense = tiny_llama(False)
    write_checkpoint(dense, tmp_path / "ckpt", "gptq", act_order=True)
    assert main(["convert", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ours"), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 Int4Linear, 12 PermutedInputLinear layers") and "no tokenizer" in out  # down_proj folded
    back = rk.load_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    assert main(["convert", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a checkpoint
    assert "neither a .gguf file" in capsys.readouterr().err
