"""Random recipes (methods, settings, overlapping patterns, lm_head, tied embeddings, in place or not,
text-like or random calibration) over a tiny Llama: each either is refused up front with the model
unchanged, or compresses to a model with finite outputs whose reloaded copy is bit-identical."""
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import reparam_kernels as rk  # noqa: E402

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
PATTERNS = ["model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.[kv]_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.1.mlp.down_proj", "lm_head",
            "model.layers.*.mlp.*_proj", "model.layers.*"]


def random_rule(r):
    rules = [
        lambda: {"method": "lowrank", "ratio": r.choice([0.1, 0.3, 0.5]), "whiten": r.choice([True, False]),
                 "fisher": r.choice([True, False]), "allocate": r.choice(["uniform", "global"]),
                 "pivoted": r.choice([True, False])},
        lambda: {"method": "lowrank", "rank": r.choice([1, 4, 16]), "whiten": r.choice([True, False])},
        lambda: {"method": "lowrank", "energy": r.choice([0.5, 0.9])},
        lambda: {"method": "int8", "gptq": r.choice([True, False])},
        lambda: {"method": "int4", "group_size": r.choice([32, 64]), "gptq": r.choice([True, False]),
                 "symmetric": r.choice([True, False])},
        lambda: {"method": "int4", "weighted_grid": True, "refine_steps": r.choice([0, 2, "auto"])},
        lambda: {"method": "int4", "mean_bits": r.choice([4.5, 5.0, 6.0])},
        lambda: {"method": "log", "bits": r.choice([3, 4]), "gptq": r.choice([True, False])},  # 3 is refused
        lambda: {"method": "vq", "bits": 4, "d": r.choice([1, 2, 3]),  # 3 divides no in_features here
                 "gptq": r.choice([True, False]), "rows_per_codebook": r.choice([None, 1])},  # d 2 + gptq: refused
        lambda: {"method": r.choice(["int4", "int8", "log", "vq"]), "correction_rank": r.choice([0, 4, 100]),
                 "correction_iters": r.choice([1, 2]), "fisher": r.choice([True, False])},  # 100 is refused
        lambda: {"method": "lowrank_int4", "ratio": r.choice([0.3, 0.5]), "allocate": r.choice(["uniform", "global"])},
        lambda: {"method": "block_circulant", "block_size": r.choice([16, 32, 64])},
        lambda: {"method": "circulant"}, lambda: {"method": "toeplitz"}, lambda: {"method": "ldr", "rank": 2},
        lambda: {"method": "skip"},
    ]
    return r.choice(rules)()


@pytest.mark.parametrize("seed", range(24))
def test_random_recipe_is_refused_cleanly_or_round_trips(seed, tmp_path):
    r = random.Random(seed)
    recipe = {p: random_rule(r) for p in r.sample(PATTERNS, r.randint(1, 4))}
    tied = r.choice([True, False])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG, tie_word_embeddings=tied)).eval()
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(seed))
    calib = r.choice([ids, "random"])
    inplace = r.choice([True, False])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        small, report = rk.compress(model, recipe, calib=calib, progress=False, inplace=inplace)
    except ValueError:
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before), recipe
        return
    with torch.no_grad():
        out = small(ids).logits
    assert torch.isfinite(out).all(), recipe
    assert report.table() and report.totals()
    rk.save_compressed(small, tmp_path / "c")
    with rk.empty_weights():
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG, tie_word_embeddings=tied))
    back = rk.load_compressed(skeleton, tmp_path / "c").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out), recipe
