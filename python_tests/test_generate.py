"""Hugging Face `generate` on a model whose Linears are every layer type: the logits of each decoded token
(KV cache, one token a step: the decode paths, M = batch) match a full forward over the finished sequence
(no cache, every position at once: the prefill paths, M = batch × length) — on a GPU the two run
different kernels, so this checks that they agree inside a real model."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from reparam_kernels.bench import variants

transformers = pytest.importorskip("transformers")


def mixed_llama(dtype, device, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    kinds = variants.available()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for i, name in enumerate(names):  # the layer kinds in turn, every kind at least once (21 Linears)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, variants.make(kinds[i % len(kinds)], model.get_submodule(name)))
    assert len(names) >= len(kinds)
    return model.eval()


def _check_generate(model, prompt_len, new_tokens, tol):
    device = model.lm_head.weight.device
    ids = torch.randint(0, 101, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len)).to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = model(out.sequences).logits
    assert out.sequences.shape == (2, prompt_len + new_tokens)
    for step, logits in enumerate(out.logits):
        ref = full[:, prompt_len - 1 + step]
        assert rel_err(logits.float(), ref.float()) < tol, (step, rel_err(logits.float(), ref.float()))
        # greedy decoding took the argmax of what the cache path computed
        assert torch.equal(out.sequences[:, prompt_len + step], logits.argmax(-1))


def test_generate_with_every_layer_type_matches_a_full_forward_cpu():
    _check_generate(mixed_llama(torch.float32, "cpu"), prompt_len=7, new_tokens=5, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("prompt_len", [9, 40])  # prefill M = 18 (small-M paths) and 80 (wgmma / tiles)
def test_generate_with_every_layer_type_matches_a_full_forward_gpu(prompt_len):
    # fp16: the decode and prefill kernels round differently; the reference is the same model's other path
    _check_generate(mixed_llama(torch.float16, "cuda"), prompt_len=prompt_len, new_tokens=6, tol=2e-2)
