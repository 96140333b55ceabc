"""End-to-end decode speed: a Llama-3-8B-shaped model (random weights, Hugging Face
transformers) with its Linears swapped for each compressed layer type, vs dense fp16.

    python benchmarks/bench_decode.py                 # H200: 32 layers, batch 1 and 16, 512 context
    python benchmarks/bench_decode.py --quick         # 4 layers, batch 1, fewer variants (GPU runner)
    python benchmarks/bench_decode.py --tiny          # 2-layer tiny config on the CPU (CI: the script works)
    python benchmarks/bench_decode.py --model mixtral_8x7b --quick   # a mixture-of-experts model (qwen3_30b_a3b too)

`--model mixtral_8x7b`: the Mixtral-8x7B configuration (8 experts, 2 a token); `--model qwen3_30b_a3b`:
Qwen3-30B-A3B's (128 experts of 768, 8 a token). Its dense baseline runs
transformers' default experts implementation (``grouped_mm``: one grouped GEMM a projection, no host sync;
recorded in the file); the compressed variants split the experts per expert (``unfuse_experts``), swap their
Linears too, and group them again where the format has a grouped op (``group_experts``: int4, int8, GPTVQ, low
rank), so a decode step stays one CUDA graph. Results: decode_<model>.json beside decode.json.

Each variant: prefill `--context` random tokens into a static KV cache (not timed),
compile the one-token decode step (torch.compile, mode="reduce-overhead": CUDA
graphs), check the compiled step against the eager one (a variant that disagrees
is not timed), then time `--tokens` decode steps. tokens/s = batch x tokens / time.
Every Linear but lm_head is swapped; lm_head and embeddings stay dense fp16 (unless +head, below),
so the speedups are those of a deployment that keeps its head exact, not of the Linears alone.
Random weights: the speed is what is measured, not the text.
Results: benchmarks/results/<gpu>/decode.json, rewritten after every variant.

A variant `KIND:SWITCHES` (e.g. ``int4_g128:stream_k``) runs KIND with one of SWITCH_SETS' environment
switches set while it is built, compiled, captured and timed: the CUDA paths that are off by default, end to end.
`--attn reparam_gqa_sdpa` (or `flex_attention`) builds every variant with that attention implementation
(results in decode_<impl>.json): with a static cache's mask, transformers' sdpa copies the cache to all query
heads each step (repeat_kv: at batch 16 on Llama-3-8B ~190 MB a layer, against 436 MB of dense weights), which
dilutes every variant's speedup alike; `reparam_kernels.hf_attention`'s packs a group's query heads as rows
of its KV head at decode instead and reads the cache once (flex attention also reads it once).
A variant `KIND+fused` (``int4_g128+fused``, ``dense+fused``; ``int4_g128+fused:x_ahead`` with switches) runs
KIND with q/k/v and gate/up fused into one layer each (``reparam_kernels.fuse_projections``): 4 launches a
decoder layer instead of 7 (low rank: 11 products instead of 14, the siblings' right factors stacked). Its
speedup is still against plain dense; ``dense+fused`` says what fusing alone buys.
A variant `KIND+head` (``int4_g128+fused+head``) swaps lm_head too, as torchao's and gpt-fast's int4 recipes do
by default (Llama-3-8B's head is 1.05 GB of fp16, ~7% of the weights, read every step): the row's "lm_head"
says which it was. (Its quality cost is measured apart: docs/quant.md, "lm_head too".)
"""
import argparse
import contextlib
import gc
import inspect
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reparam_kernels.bench import kernel_profile, variants  # noqa: E402
from reparam_kernels.bench.cases import env_var  # noqa: E402
from reparam_kernels.hf_attention import GQA_SDPA  # noqa: E402
from reparam_kernels.hf_attention import register as register_gqa_sdpa  # noqa: E402
from reparam_kernels.bench.results import DEFAULT_ROOT, OUT_ENV, environment, gpu_slug  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_theta=10000.0)
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2)
TINY_MIXTRAL = dict(TINY, num_local_experts=4, num_experts_per_tok=2)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1e6,
                     num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                     norm_topk_prob=True)
TINY_QWEN3_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
# --model: (config class, model class, full config, tiny config, what the results call it, results file)
MODELS = {"llama3_8b": ("LlamaConfig", "LlamaForCausalLM", LLAMA3_8B, TINY, "Llama-3-8B config", "decode.json"),
          "mixtral_8x7b": ("MixtralConfig", "MixtralForCausalLM", MIXTRAL_8X7B, TINY_MIXTRAL, "Mixtral-8x7B config",
                           "decode_mixtral_8x7b.json"),
          # 128 small experts, 8 a token: where a per-expert loop pays most and grouping matters most
          "qwen3_30b_a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_30B_A3B, TINY_QWEN3_MOE,
                            "Qwen3-30B-A3B config", "decode_qwen3_30b_a3b.json")}


def llama_config(overrides, config_class="LlamaConfig"):
    import transformers

    cls = getattr(transformers, config_class)
    kw = dict(overrides)
    theta = kw.pop("rope_theta")
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        kw["rope_theta"] = theta
    return cls(**kw)


def static_cache(config, batch, length, device, dtype):
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    if "max_batch_size" in params:  # transformers 4.x
        return StaticCache(config=config, max_batch_size=batch, max_cache_len=length, device=device, dtype=dtype)
    return StaticCache(config=config, max_cache_len=length)


@torch.no_grad()
def build_model(config, kind, dtype, device, fused=False, head=False):
    """The model with random weights, its Linears (not lm_head) swapped for layer `kind` (None: dense); a
    mixture-of-experts model's experts split into Linears first and grouped again after (module doc);
    `fused`: sibling projections fused after (``fuse_projections``); `head`: lm_head swapped too."""
    import transformers
    from reparam_kernels import fold_act_order, fuse_projections
    from reparam_kernels.compress.experts import group_experts, unfuse_experts

    cls = getattr(transformers, config.architectures[0] if config.architectures else "LlamaForCausalLM")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    swapped = 0
    if kind is not None:
        unfuse_experts(model)
        if head and getattr(config, "tie_word_embeddings", False):
            raise ValueError("+head: this configuration ties lm_head to the embeddings; swapping it would untie them")
        swapped = variants.replace_linears(model, kind, skip=() if head else ("lm_head",), random=True)
        fold_act_order(model)  # (act-order kinds: as load_int4_pretrained leaves a GPTQ model)
        group_experts(model)
    if fused:
        fuse_projections(model)
    return model.eval(), swapped


def _cache_arg(model=None):
    """`cache` in recent transformers, `past_key_values` before (and deprecated since)."""
    from transformers import LlamaForCausalLM

    forward = type(model).forward if model is not None else LlamaForCausalLM.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"



def experts_path(model):
    """How a mixture-of-experts model's experts run (None for a dense model): transformers' implementation
    for fused experts, ours grouped, or ours one expert after the other (a host sync per layer)."""
    from reparam_kernels.compress.experts import UnfusedExperts, fused_experts_names

    split = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    if split:
        return "reparam grouped" if all(m._grouped is not None for m in split) else "reparam per expert"
    if fused_experts_names(model):
        return f"transformers {getattr(model.config, '_experts_implementation', None)}"
    return None


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def decode_speed(model, config, batch, context, tokens, compile_mode, device, warmup=3, profile=0):
    """(tokens/s, max relative difference compiled vs eager on the first step, `profile` more steps' time by
    kernel category — ``reparam_kernels.bench.kernel_profile``; None when profile is 0)."""
    dtype = model.model.embed_tokens.weight.dtype
    arg = _cache_arg(model)
    prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)

    def prefilled():
        cache = static_cache(config, batch, context + warmup + tokens + profile + 2, device, dtype)
        out = model(input_ids=prompt, **{arg: cache}, cache_position=torch.arange(context, device=device),
                    use_cache=True)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    pos = torch.tensor([context], device=device)
    # The eager reference runs on a cache of its own: a static cache must not see one position twice.
    cache, tok = prefilled()
    eager = model(input_ids=tok, **{arg: cache}, cache_position=pos, use_cache=True).logits[:, -1].float()
    cache, tok = prefilled()

    def step(tok, pos):
        return model(input_ids=tok, **{arg: cache}, cache_position=pos, use_cache=True).logits[:, -1]

    run = step if compile_mode == "none" else torch.compile(step, **compile_kwargs(compile_mode))
    compiled = run(tok, pos).float().clone()
    diff = float((compiled - eager).norm() / eager.norm().clamp_min(1e-30))
    if not (torch.isfinite(compiled).all() and diff < 5e-2):
        return None, diff, None
    # Every step's position is on the device already, as in generate(): torch.tensor([p], device=...) would copy
    # from pageable host memory and synchronize the stream each step (until 2026-12-04: run 3's decode.json),
    # leaving the GPU idle while the host prepares the next replay.
    positions = torch.arange(context + 1, context + 1 + warmup + tokens + profile, device=device)
    state = [tok, 0]

    def one():
        _mark_step()
        i = state[1]
        state[0] = run(state[0], positions[i:i + 1]).argmax(-1, keepdim=True)
        state[1] = i + 1

    for _ in range(warmup):
        one()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        one()
    _sync(device)
    tps = batch * tokens / (time.perf_counter() - t0)
    if not profile:
        return tps, diff, None
    return tps, diff, kernel_profile.profile_steps(one, profile, str(device).startswith("cuda"))


def compile_kwargs(mode):
    if mode in ("reduce-overhead", "max-autotune", "default"):
        return {"mode": mode}
    return {"backend": mode}  # e.g. "eager", "aot_eager", "cudagraphs"


def _mark_step():
    if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# KIND:NAME variants: the switches that are off until timed (docs/quant.md, docs/lowrank_kernel.md)
SWITCH_SETS = {"x_ahead": {"REPARAM_SMALL_M_X_AHEAD": "1"}, "stream_k": {"REPARAM_SMALL_M_STREAM_K": "1"},
               "stream_k_x_ahead": {"REPARAM_SMALL_M_STREAM_K": "1", "REPARAM_SMALL_M_X_AHEAD": "1"},
               "post_scale": {"REPARAM_SMALL_M_POST_SCALE": "1"},
               "post_scale_x_ahead": {"REPARAM_SMALL_M_POST_SCALE": "1", "REPARAM_SMALL_M_X_AHEAD": "1"},
               "post_scale_stream_k_x_ahead": {"REPARAM_SMALL_M_POST_SCALE": "1", "REPARAM_SMALL_M_STREAM_K": "1",
                                               "REPARAM_SMALL_M_X_AHEAD": "1"},
               # plain low rank at M <= 8 as two GEMVs in one launch (csrc/lowrank_gemv.cuh; docs/lowrank_kernel.md)
               "gemv": {"REPARAM_LOWRANK_GEMV": "1"}}


SUFFIXES = ("fused", "head")


def split_variant(kind):
    """(layer kind or None for dense, {variable: value}, fused, head) of a variant name
    KIND[+fused][+head][:SWITCHES]."""
    name, _, switches = kind.partition(":")
    base, *extra = name.split("+")
    for suffix in extra:
        if suffix not in SUFFIXES or extra.count(suffix) > 1:
            raise ValueError(f"variant {kind!r}: unknown or repeated suffix +{suffix}; the suffixes are "
                             + ", ".join("+" + s for s in SUFFIXES))
    if base == "dense" and "head" in extra:
        raise ValueError(f"variant {kind!r}: +head swaps lm_head for the variant's layer kind; dense has none")
    if switches and switches not in SWITCH_SETS:
        raise ValueError(f"variant {kind!r}: unknown switches {switches!r}; choose from {', '.join(SWITCH_SETS)}")
    return (None if base == "dense" else base), SWITCH_SETS.get(switches, {}), "fused" in extra, "head" in extra


def run_variant(data, kind, config, batches, context, tokens, mode, dtype, device, dense_tps, profile=0):
    """Build one variant, then check and time it at every batch size (under its switches); rows go into `data`."""
    base, switches, fused, head = split_variant(kind)
    with contextlib.ExitStack() as stack:
        for name, value in switches.items():
            stack.enter_context(env_var(name, value))
        time_variant(data, kind, base, fused, head, config, batches, context, tokens, mode, dtype, device,
                     dense_tps, profile)


def time_variant(data, kind, base, fused, head, config, batches, context, tokens, mode, dtype, device, dense_tps,
                 profile=0):
    torch._dynamo.reset()
    model, swapped = build_model(config, base, dtype, device, fused=fused, head=head)
    wbytes = weight_bytes(model)
    for batch in batches:
        tps, diff, prof = decode_speed(model, config, batch, context, tokens, mode, device, profile=profile)
        if tps is None:
            data["skipped"].append({"variant": kind, "batch": batch,
                                    "reason": f"compiled step disagrees with eager (relative diff {diff:.3g})"})
            print(f"{kind:22} batch {batch:3}: NOT TIMED, compiled vs eager diff {diff:.3g}", flush=True)
            continue
        if kind == "dense":
            dense_tps[batch] = tps
        row = {"variant": kind, "batch": batch, "context": context, "tokens_per_s": tps,
               "speedup_vs_dense": tps / dense_tps[batch] if batch in dense_tps else None,
               "linears_swapped": swapped, "lm_head": base if head else "dense", "weight_bytes": wbytes,
               "compiled_vs_eager_rel_diff": diff}
        if experts_path(model) is not None:
            row["experts"] = experts_path(model)
        if prof is not None:
            row["profile"] = prof
        data["rows"].append(row)
        print(f"{kind:22} batch {batch:3}: {tps:10.1f} tok/s"
              + (f"  {row['speedup_vs_dense']:.2f}x dense" if row["speedup_vs_dense"] else ""), flush=True)


def default_variants(quick, quick_kinds):
    """dense, then the layer kinds; int4 g128 and low rank at 40% (issue 6's first and third targets) fused right
    after them unfused; the full run ends on dense fused (what fusing alone buys)."""
    kinds = ["dense"]
    for kind in variants.available(quick_kinds if quick else variants.DECODE_KINDS):
        kinds += [kind, kind + "+fused"] if kind in ("int4_g128", "lowrank_40") else [kind]
    return kinds if quick else kinds + ["dense+fused"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="2-layer tiny config on the CPU (proves the script works)")
    p.add_argument("--quick", action="store_true", help="4 layers, batch 1, four variants")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16; --quick/--tiny: 1)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens in the cache (default 512)")
    p.add_argument("--tokens", type=int, default=None, help="timed decode steps (default 64)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated from dense,{','.join(variants.DECODE_KINDS)}; KIND:SWITCHES runs KIND "
                        f"with one of {', '.join(SWITCH_SETS)} on; KIND+fused with q/k/v and gate/up fused")
    p.add_argument("--compile", default=None, help="reduce-overhead (default on GPU), max-autotune, cudagraphs, "
                                                    "eager, aot_eager, none")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; later variants are skipped past it (--quick: 100, so the GPU runner fits)")
    p.add_argument("--out", default=None, help="results root (default benchmarks/results or $REPARAM_BENCH_OUT)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS more decode steps (torch.profiler): each row gets its GPU time "
                        "by kernel category (ours, inductor's, cuBLAS, attention, other) and its top kernels")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", GQA_SDPA, "flex_attention", "eager"),
                   help="transformers' attention implementation for every variant (default sdpa; results of another "
                        "go to decode_<impl>.json). sdpa with a static cache's mask copies the KV cache to every "
                        f"query head a step (repeat_kv); {GQA_SDPA} (reparam_kernels.hf_attention) and "
                        "flex_attention read it once")
    p.add_argument("--model", default="llama3_8b", choices=sorted(MODELS),
                   help="the configuration (default llama3_8b; mixtral_8x7b: a mixture-of-experts model)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("bench_decode: needs the `transformers` package (pip install transformers)")
    config_class, model_class, full, tiny, described, filename = MODELS[a.model]
    if a.tiny:
        device, dtype, cfg = "cpu", torch.float32, dict(tiny)
        defaults = dict(batches="1", context=32, tokens=4, compile="eager", layers=2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_decode: no CUDA GPU visible (use --tiny to check the script on the CPU)")
        device, dtype, cfg = "cuda", torch.float16, dict(full)
        defaults = dict(batches="1" if a.quick else "1,16", context=512, tokens=32 if a.quick else 64,
                        compile="reduce-overhead", layers=4 if a.quick else 32)
    batches = [int(b) for b in (a.batches or defaults["batches"]).split(",")]
    context, tokens = a.context or defaults["context"], a.tokens or defaults["tokens"]
    mode = a.compile or defaults["compile"]
    cfg["num_hidden_layers"] = a.layers or defaults["layers"]
    config = llama_config(cfg, config_class)
    config.architectures = [model_class]
    if a.attn != "sdpa":
        if a.attn == GQA_SDPA:
            register_gqa_sdpa()
        config._attn_implementation = a.attn
        filename = filename.replace(".json", f"_{a.attn}.json")  # its own file: sdpa's rows stay
    quick_kinds = ("int4_g128", "int8", "lowrank_40")
    kinds = a.variants.split(",") if a.variants else default_variants(a.quick or a.tiny, quick_kinds)
    for kind in kinds:
        try:
            split_variant(kind)
        except ValueError as exc:
            raise SystemExit(f"bench_decode: {exc}")
    env = environment()
    root = a.out or os.environ.get(OUT_ENV) or DEFAULT_ROOT
    path = os.path.join(root, gpu_slug(env["gpu"]), filename)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
    data = dict(env, model=f"{described}, random weights" + (" (tiny)" if a.tiny else ""),
                config={k: cfg[k] for k in keys if k in cfg},
                dtype=str(dtype).replace("torch.", ""), compile=mode, attn_implementation=a.attn, context=context,
                new_tokens=tokens, positions="on the device (no host sync a step)",
                rows=[], skipped=[])
    t_start, dense_tps = time.time(), {}
    budget = a.budget if a.budget is not None else (100.0 if a.quick else None)
    for kind in kinds:
        if budget and time.time() - t_start > budget:
            data["skipped"].append({"variant": kind, "reason": f"time budget {budget:.0f} s spent"})
            continue
        try:
            run_variant(data, kind, config, batches, context, tokens, mode, dtype, device, dense_tps, a.profile)
        except Exception as exc:  # one variant failing to build or compile must not lose the others
            data["skipped"].append({"variant": kind, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"{kind:22} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
