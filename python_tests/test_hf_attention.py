"""reparam_gqa_sdpa: decode attention on the KV cache as it is (query heads packed as rows of their KV head)
gives transformers' sdpa results — checked against float64 attention with the heads repeated, and inside a
Llama with a static cache, eager and compiled with fullgraph=True."""
import inspect
import math
import os

import pytest
import torch

from reparam_kernels import hf_attention

transformers = pytest.importorskip("transformers")
BACKEND = os.environ.get("REPARAM_COMPILE_BACKEND", "aot_eager")


class Grouped(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def reference(query, key, value, mask, scale):
    """float64 attention with every KV head repeated for its query heads (what repeat_kv feeds SDPA)."""
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, 1)
    v = value.double().repeat_interleave(groups, 1)
    s = query.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool_shared", "bool_per_head", "float_shared"])
@pytest.mark.parametrize("b,h,kv,length,d", [(1, 32, 8, 37, 64), (3, 12, 4, 21, 48), (2, 6, 6, 9, 32)])
def test_decode_matches_float64_repeated_heads(mask_kind, b, h, kv, length, d):
    g = torch.Generator().manual_seed(b * 1000 + h + length)
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = (torch.randn(b, kv, length, d, generator=g) for _ in range(2))
    valid = torch.rand(b, 1, 1, length, generator=g) < 0.7
    valid[..., 0] = True  # every row attends somewhere
    mask = {"none": None, "bool_shared": valid,
            "bool_per_head": (torch.rand(b, h, 1, length, generator=g) < 0.7) | valid,
            "float_shared": torch.zeros(b, 1, 1, length).masked_fill(~valid, float("-inf"))}[mask_kind]
    scale = 1 / math.sqrt(d)
    out, weights = hf_attention.gqa_sdpa_attention(Grouped(h // kv), q, k, v, mask, scaling=scale)
    assert weights is None and out.shape == (b, 1, h, d) and out.is_contiguous()
    ref = reference(q, k, v, mask, scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_prefill_and_unsupported_arguments_go_to_transformers_sdpa(monkeypatch):
    import transformers.integrations.sdpa_attention as hf_sdpa

    calls = []
    real = hf_sdpa.sdpa_attention_forward
    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q1, q5 = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    hf_attention.gqa_sdpa_attention(Grouped(4), q1, k, v, None)
    assert calls == []
    hf_attention.gqa_sdpa_attention(Grouped(4), q5, k, v, None)  # prefill
    hf_attention.gqa_sdpa_attention(Grouped(4), q1, k, v, None, s_aux=torch.zeros(8))  # sinks
    hf_attention.gqa_sdpa_attention(Grouped(1), q1, torch.randn(1, 8, 5, 16), torch.randn(1, 8, 5, 16), None)
    assert calls == [1, 1, 1]


def _llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("compiled", [False, True])
def test_llama_decode_with_a_static_cache_matches_sdpa(compiled):
    hf_attention.register()
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    logits = {}
    for impl in ("sdpa", hf_attention.GQA_SDPA):
        torch._dynamo.reset()
        model = _llama(impl)
        assert model.model.layers[0].self_attn.config._attn_implementation == impl
        cache = {"cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values":
                 transformers.StaticCache(config=model.config, max_cache_len=16)}  # the argument's newer name
        with torch.no_grad():
            out = model(input_ids=ids, **cache, use_cache=True)  # prefill: transformers' sdpa
            step = torch.compile(model, fullgraph=True, backend=BACKEND) if compiled else model
            tok, steps = out.logits[:, -1:].argmax(-1), [out.logits[:, -1]]
            for p in range(7, 11):
                out = step(input_ids=tok, **cache, use_cache=True, cache_position=torch.tensor([p]))
                tok = out.logits[:, -1:].argmax(-1)
                steps.append(out.logits[:, -1])
        logits[impl] = torch.stack(steps)
    torch.testing.assert_close(logits[hf_attention.GQA_SDPA], logits["sdpa"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_on_the_gpu_matches_float64(dtype):
    # Llama-3-8B's heads at batch 16 over a static cache's 581 positions, some masked
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(16, 32, 1, 128, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(16, 8, 581, 128, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    mask = torch.arange(581, device="cuda")[None, None, None, :] < 520
    out, _ = hf_attention.gqa_sdpa_attention(Grouped(4), q, k, v, mask, scaling=128 ** -0.5)
    ref = reference(q, k, v, mask, 128 ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
