"""Grouped-query attention at decode without copying the KV cache, for Hugging Face transformers models.

transformers' "sdpa" attention, given a mask (a static cache always gives one) on a CUDA device, repeats each
key / value head for every query head of its group before calling SDPA (``repeat_kv``): at every decode step
the whole cache is copied to 4x its size (Llama-3-8B: 8 KV heads, 32 query heads) and read back. At batch 16
and 581 positions that is ~190 MB written and read a layer, against the layer's 436 MB of fp16 weights — as
much memory traffic as a compressed layer's weights, on every variant alike (newer transformers pack the
heads as below, but not under ``torch.compile``).

``GQA_SDPA`` ("reparam_gqa_sdpa") does the same attention with the query heads of a group packed as query rows
of their KV head: q [B, H, 1, D] → [B, H_kv, H / H_kv, D] against the cache as it is, the mask broadcast over
the rows (exact: one query position, so each row needs the same mask). Every other case — prefill, no
grouping, position biases, soft-capping, sinks — goes to transformers' own sdpa function unchanged.

    import reparam_kernels.hf_attention as rka
    rka.register()                                  # once; needs transformers
    model.set_attn_implementation(rka.GQA_SDPA)     # or config._attn_implementation = rka.GQA_SDPA before building
"""
import torch

GQA_SDPA = "reparam_gqa_sdpa"
_UNPACKED = ("position_bias", "softcap", "s_aux", "sinks")  # what only transformers' function handles


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' attention-function signature: query [B, H, T, D], key / value [B, H_kv, L, D];
    returns ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, t, d = query.shape
    if groups == 1 or t != 1 or any(kwargs.get(k) is not None for k in _UNPACKED):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, groups, d)  # head kv * groups + r: the order repeat_kv gives the heads
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:  # a mask per query head: its rows go with the packed heads
        mask = mask.reshape(mask.shape[0], kv_heads, groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=False)
    return out.reshape(out.shape[0], h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register():
    """Make ``GQA_SDPA`` an attention implementation transformers knows (masks built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)
    return GQA_SDPA
