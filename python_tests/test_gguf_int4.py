"""GGUF Q4_0 / Q4_1 / Q4_K blocks onto Int4Linear (reparam_kernels/compress/gguf_int4.py): the block decoding
against the gguf package's own de-quantization, the Int4Linear against the blocks' formula in float64, and a
tiny llama GGUF file (written here, q / k in llama.cpp's row order) against transformers' de-quantized model."""
import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress import gguf_int4 as G  # noqa: E402
from reparam_kernels.nn import Int4Linear  # noqa: E402


def _fp16_bytes(values):
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def random_blocks(kind, n, k, gen, flat_block=True, realistic=False):
    """uint8 [n, bytes a row] of random `kind` blocks with finite scales (one block's scale 0 when flat_block).
    realistic: offsets as llama.cpp's quantizers leave them (a group's minimum, so z = −offset / scale lies in
    0..16, which the model's fp16 zeros hold within 1% of a step), not any random bytes."""
    weights, size = G.BLOCKS[kind]
    nb = k // weights
    raw = torch.randint(0, 256, (n, nb, size), generator=gen, dtype=torch.uint8)
    d = torch.rand(n, nb, generator=gen) * 0.02 + 0.001
    if flat_block:
        d[0, 0] = 0.0
    raw[..., 0:2] = _fp16_bytes(d)
    if kind == "Q4_1":
        m = -d * (torch.rand(n, nb, generator=gen) * 8 + 4) if realistic else torch.rand(n, nb, generator=gen) * 0.2 - 0.1
        raw[..., 2:4] = _fp16_bytes(m)
    if kind == "Q4_K":
        raw[..., 2:4] = _fp16_bytes(2 * d if realistic else torch.rand(n, nb, generator=gen) * 0.2)
        if realistic:  # sub-block scales 16..63 and mins 0..63: z = 2 mn / sc <= 8
            sc = torch.randint(16, 64, (n, nb, 8), generator=gen)
            mn = torch.randint(0, 64, (n, nb, 8), generator=gen)
            raw[..., 4:16] = pack_scale_min_k4(sc, mn)
    return raw.reshape(n, -1)


def pack_scale_min_k4(sc, mn):
    """Q4_K's 12 bytes from eight 6-bit scales and mins (llama.cpp's layout, written from its description)."""
    out = torch.zeros(*sc.shape[:-1], 12, dtype=torch.long)
    for j in range(4):
        out[..., j] = sc[..., j] | ((sc[..., j + 4] >> 4) << 6)
        out[..., j + 4] = mn[..., j] | ((mn[..., j + 4] >> 4) << 6)
        out[..., j + 8] = (sc[..., j + 4] & 15) | ((mn[..., j + 4] & 15) << 4)
    return out.to(torch.uint8)


def formula(codes, scale, offset):
    g = G.GROUP
    return scale.double().repeat_interleave(g, 1) * codes.double() + offset.double().repeat_interleave(g, 1)


@pytest.mark.parametrize("kind", list(G.BLOCKS))
@pytest.mark.parametrize("realistic", [False, True])
def test_decoding_matches_the_gguf_package(kind, realistic):
    raw = random_blocks(kind, 6, 512, torch.Generator().manual_seed(1), realistic=realistic)
    codes, scale, offset = G.decode(raw, kind)
    want = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, kind))
    torch.testing.assert_close(formula(codes, scale, offset), torch.from_numpy(want).double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", list(G.BLOCKS))
def test_int4_layer_is_the_blocks(kind):
    codes, scale, offset = G.decode(random_blocks(kind, 8, 256, torch.Generator().manual_seed(2)), kind)
    layer = G.to_int4(codes, scale, offset, torch.float32)
    assert isinstance(layer, Int4Linear) and layer.group_size == 32
    want = formula(codes, scale, offset)  # (its first group has scale 0: the constant offset)
    torch.testing.assert_close(layer.to_dense().double(), want, rtol=0, atol=1e-6)


def write_out(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_checked(path, **kw):
    """load_int4_pretrained, failing on its "stay dense" warning: every 4-bit Linear must convert and check."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stay dense", category=RuntimeWarning)
        return rk.load_int4_pretrained(path, progress=False, **kw)


TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_1", "attn_output": "Q4_0", "ffn_gate": "Q4_K",
         "ffn_up": "Q4_1", "ffn_down": "Q4_0"}


def write_tiny_llama_gguf(path, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=64):
    gen = torch.Generator().manual_seed(3)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)

    def dense(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).numpy().astype(np.float32)

    w.add_tensor("token_embd.weight", dense(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", dense(vocab, hidden))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // heads * kv_heads, hidden),
              "attn_v": (hidden // heads * kv_heads, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for name, (n, k) in shapes.items():
        kind = TYPES[name]
        raw = random_blocks(kind, n, k, gen, flat_block=name == "attn_q", realistic=True)
        w.add_tensor(f"blk.0.{name}.weight", raw.numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    write_out(w)


def test_gguf_file_onto_int4(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    fp16 = load_checked(path)  # fp16 zeros: every layer still checks
    model = load_checked(path, dtype=torch.float32)
    for loaded in (fp16, model):
        assert sum(isinstance(m, Int4Linear) for m in loaded.modules()) == 7
        assert loaded.model.layers[0].self_attn.q_proj._reparam_settings["type"] == "Q4_K"
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        # q / k rows come back in transformers' order (llama.cpp stores them permuted for its rope)
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.to_dense(),
                                   dense.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=1e-5)


def test_a_layer_that_does_not_check_stays_dense(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    monkeypatch.setattr(G, "_matches", lambda layer, dense, scale: tuple(dense.shape) != (256, 512))  # ffn_down
    with pytest.warns(RuntimeWarning, match=r"1 4-bit GGUF tensor\(s\) stay dense Linears: model.layers.0.mlp.down_proj"):
        model = rk.load_int4_pretrained(path, dtype=torch.float32, progress=False)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 6



def write_tiny_qwen3_moe_gguf(path, hidden=256, ffn=768, experts=4, heads=4, kv_heads=2, head_dim=64, vocab=64):
    """A one-block Qwen3-MoE GGUF: dense attention, the experts' gate / up / down as 3-D Q4_K / Q4_1 / Q4_0
    tensors [E, rows, bytes] (ffn: transformers' default moe_intermediate_size, which its GGUF map leaves)."""
    gen = torch.Generator().manual_seed(6)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                   (w.add_feed_forward_length, ffn), (w.add_head_count, heads), (w.add_head_count_kv, kv_heads),
                   (w.add_layer_norm_rms_eps, 1e-6), (w.add_vocab_size, vocab), (w.add_key_length, head_dim),
                   (w.add_value_length, head_dim), (w.add_expert_count, experts), (w.add_expert_used_count, 2),
                   (w.add_expert_feed_forward_length, ffn)):
        add(v)

    def dense(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).numpy().astype(np.float32)

    for name, t in (("token_embd", dense(vocab, hidden)), ("output_norm", np.ones(hidden, np.float32)),
                    ("output", dense(vocab, hidden)), ("blk.0.attn_norm", np.ones(hidden, np.float32)),
                    ("blk.0.ffn_norm", np.ones(hidden, np.float32)), ("blk.0.attn_q_norm", np.ones(head_dim, np.float32)),
                    ("blk.0.attn_k_norm", np.ones(head_dim, np.float32)), ("blk.0.attn_q", dense(heads * head_dim, hidden)),
                    ("blk.0.attn_k", dense(kv_heads * head_dim, hidden)), ("blk.0.attn_v", dense(kv_heads * head_dim, hidden)),
                    ("blk.0.attn_output", dense(hidden, heads * head_dim)), ("blk.0.ffn_gate_inp", dense(experts, hidden))):
        w.add_tensor(f"{name}.weight", t)
    for name, kind, (n, k) in (("ffn_gate_exps", "Q4_K", (ffn, hidden)), ("ffn_up_exps", "Q4_1", (ffn, hidden)),
                               ("ffn_down_exps", "Q4_0", (hidden, ffn))):
        raw = torch.stack([random_blocks(kind, n, k, gen, flat_block=False, realistic=True) for _ in range(experts)])
        w.add_tensor(f"blk.0.{name}.weight", raw.numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    write_out(w)


def test_gguf_experts_onto_grouped_int4(tmp_path):
    from transformers import AutoModelForCausalLM

    from reparam_kernels.compress.experts import UnfusedExperts

    path = tmp_path / "moe.gguf"
    write_tiny_qwen3_moe_gguf(path)
    model = load_checked(path, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and experts._grouped is not None  # one grouped launch a projection
    assert isinstance(experts.expert(3).gate_up_proj, Int4Linear) and experts.expert(3).gate_up_proj.out_features == 1536
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gguf_file_on_the_gpu_kernels(tmp_path):
    # fp16 on the GPU: the int4 kernels with groups of 32 against transformers' de-quantized model in float64
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    model = rk.load_int4_pretrained(path, progress=False).cuda()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float64).eval()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = dense(ids).logits
        got = model(ids.cuda()).logits.double().cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
