"""Compressing the experts of a mixture-of-experts model, measured on real weights: SmolLM2-135M upcycled
into a Mixtral (every expert a copy of the layer's MLP, a random router; compress/experts.py)

    python benchmarks/quality_moe_upcycled.py [--experts 4] [--top-k 2] [--windows 4]
    python benchmarks/quality_moe_upcycled.py --experts 16 --top-k 1 --calib-seqs 2 --experts-only \
        --recipes int4,int4_gptq --out benchmarks/results/quality/moe_upcycled_few_tokens.json   # ~64 tokens an expert

No MoE model is in the offline data, so this builds one by sparse upcycling: each block's MLP becomes
`--experts` identical experts behind a seeded random router choosing `--top-k` (Mixtral renormalizes the
chosen weights, so the upcycled model computes exactly what SmolLM2 does: its perplexity is the dense one).
Then the same recipe runs on SmolLM2's MLPs ("dense MLP") and on the upcycled model's experts ("experts"),
calibrated on 16 x 512 tokens of Emma: each expert sees only the tokens routed to it (about top-k / experts
of them), so the rows measure what per-expert calibration costs against calibrating one MLP on all tokens.
Writes benchmarks/results/quality/moe_upcycled.json.
"""
import argparse
import os
import time

import torch
from quality_common import QualityRun

import reparam_kernels as rk
from reparam_kernels import data
from reparam_kernels.compress.experts import UnfusedExperts
from reparam_kernels.evaluate import perplexity, token_windows

RECIPES = {  # name: (the rule's settings; the patterns on the dense model and on the upcycled one)
    "int8": "int8",
    "int4": "int4",  # group_size auto: 64 on the 576 inputs, 128 on the 1536 (as the built-in recipe)
    "int4_gptq": {"method": "int4", "gptq": True},
    # 4-bit log codes, a 16-entry table a row (grouped_lut_linear's layout since session 34)
    "log4": {"method": "log", "bits": 4},
    # the default recipe's rule: whitened, Fisher-weighted, pivoted low rank, 20% fewer parameters allocated globally
    "lowrank_global": {"method": "lowrank", "ratio": 0.2, "whiten": True, "fisher": True, "allocate": "global",
                       "pivoted": True},
    # ... without the Fisher weights (does a few-token expert's Fisher help or mislead?)
    "lowrank_global_nofisher": {"method": "lowrank", "ratio": 0.2, "whiten": True, "fisher": False,
                                "allocate": "global", "pivoted": True},
}


def upcycle(model, experts, top_k, seed=0):
    """A MixtralForCausalLM computing what the Llama-style `model` computes: each MLP copied into `experts`
    experts, routed by a random router (seed) to `top_k` of them."""
    import transformers

    c = model.config
    cfg = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, num_local_experts=experts, num_experts_per_tok=top_k,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    moe = transformers.MixtralForCausalLM(cfg).eval()
    src, gen = model.state_dict(), torch.Generator().manual_seed(seed)
    state = {}
    for key, t in moe.state_dict().items():
        if key.endswith("mlp.gate.weight"):  # the router
            state[key] = torch.randn(t.shape, generator=gen) * c.hidden_size ** -0.5
        elif key.endswith("mlp.experts.gate_up_proj"):
            p = key[:-len("experts.gate_up_proj")]
            state[key] = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]]).expand(experts, -1, -1)
        elif key.endswith("mlp.experts.down_proj"):
            state[key] = src[key[:-len("experts.down_proj")] + "down_proj.weight"].expand(experts, -1, -1)
        else:
            state[key] = src[key]
    moe.load_state_dict({k: v.contiguous() for k, v in state.items()})
    return moe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--windows", type=int, default=4, help="evaluation windows of 1024 tokens")
    p.add_argument("--recipes", default="int8,int4,int4_gptq,lowrank_global", help="from " + ",".join(RECIPES))
    p.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences of 512 tokens of Emma")
    p.add_argument("--expert-prior", type=int, default=None,
                   help="compress(expert_prior=): rows of prior in each expert's statistics (default in_features; 0 none)")
    p.add_argument("--experts-only", action="store_true", help="skip the rows of SmolLM2's own MLPs")
    p.add_argument("--dense-only", action="store_true", help="only the rows of SmolLM2's own MLPs")
    p.add_argument("--check-grouped", action="store_true",
                   help="experts rows: also the perplexity through the per-expert path (the grouped ops' check)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality",
                                                  "moe_upcycled.json"))
    args = p.parse_args(argv)
    run = QualityRun(args.windows)
    emma = token_windows(run.tok, data.austen("emma"), 512, args.calib_seqs)
    moe = upcycle(run.model, args.experts, args.top_k)
    t0 = time.perf_counter()
    run.add_row("upcycled (dense experts)", perplexity(moe, windows=run.evals, progress=False), t0,
                experts=args.experts, top_k=args.top_k)
    for name in args.recipes.split(","):
        rule = RECIPES[name]
        if not args.experts_only:
            t0 = time.perf_counter()
            small, rep = rk.compress(run.model, {"{blocks}.*.mlp.*": rule}, calib=emma, progress=False)
            run.add_row(f"dense MLP {name}", perplexity(small, windows=run.evals, progress=False), t0,
                        layers=len(rep.layers))
        if args.dense_only:
            continue
        t0 = time.perf_counter()
        small, rep = rk.compress(moe, {"{blocks}.*.mlp.experts.*": rule}, calib=emma, progress=False,
                                 expert_prior=args.expert_prior)
        split = [m for m in small.modules() if isinstance(m, UnfusedExperts)]
        row = run.add_row(f"experts {name}", perplexity(small, windows=run.evals, progress=False), t0,
                          layers=len(rep.layers), uncalibrated=len(rep.uncalibrated), experts=args.experts,
                          top_k=args.top_k, grouped=all(m._grouped is not None for m in split),
                          expert_prior="in_features" if args.expert_prior is None else args.expert_prior)
        if args.check_grouped and row["grouped"]:
            for m in split:
                m._grouped = None
            row["ppl_per_expert_path"] = perplexity(small, windows=run.evals, progress=False)
            print(f"  per-expert path: ppl {row['ppl_per_expert_path']:.6f} (grouped {row['ppl']:.6f})", flush=True)
    run.write(args.out, calib=f"Emma, {args.calib_seqs} x 512 tokens", quantized="the MLPs of every block (SmolLM2) / every expert "
              f"of every block (SmolLM2 upcycled: {args.experts} experts, top {args.top_k}, random router seed 0)")


if __name__ == "__main__":
    main()
