"""load_compressed into a skeleton without weights (empty_weights(): parameters on meta, buffers real)."""
import threading

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import reparam_kernels as rk  # noqa: E402
from reparam_kernels.compress import empty_weights, load_compressed, save_compressed  # noqa: E402

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
RECIPE = {"model.layers.0.mlp.*_proj": {"method": "lowrank", "ratio": 0.5},
          "model.layers.1.mlp.up_proj": {"method": "block_circulant", "block_size": 16},
          "model.layers.1.self_attn.k_proj": {"method": "int8"},
          "model.layers.1.self_attn.q_proj": {"method": "int4", "group_size": 32}}


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG, initializer_range=0.2)).to(dtype).eval()


def _ids(n, seed=1):
    return torch.randint(0, 101, (n, 20), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    student, _ = rk.compress(tiny_llama(), RECIPE, calib=_ids(8), progress=False)
    student.eval()
    with torch.no_grad():
        ref = student(_ids(3, seed=5)).logits
    return save_compressed(student, tmp_path_factory.mktemp("ck") / "ck"), ref


def _skeleton(dtype=torch.float32):
    with empty_weights():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).to(dtype).eval()


def test_empty_weights_keeps_parameters_off_memory_and_buffers_real():
    skel = _skeleton()
    assert all(p.is_meta for p in skel.parameters())
    assert all(not b.is_meta for b in skel.buffers())  # rotary frequencies, computed at build
    assert not any(p.is_meta for p in nn.Linear(3, 4).parameters())  # the patch is gone after the context


def test_empty_weights_is_per_thread_and_nests():
    inside, outside = threading.Event(), threading.Event()
    other = {}

    def build_elsewhere():
        inside.wait(10)
        other["linear"] = nn.Linear(3, 4)  # built while the main thread is inside the context
        outside.set()

    worker = threading.Thread(target=build_elsewhere)
    worker.start()
    register = nn.Module.register_parameter
    with empty_weights():
        with empty_weights():
            inner = nn.Linear(2, 2)
        after_inner = nn.Linear(2, 2)  # still inside the outer context
        inside.set()
        assert outside.wait(10)
    worker.join()
    assert inner.weight.is_meta and after_inner.weight.is_meta
    assert not any(p.is_meta for p in other["linear"].parameters())
    assert nn.Module.register_parameter is register  # put back once the last context is left


def test_load_into_an_empty_skeleton_is_bit_identical(checkpoint):
    path, ref = checkpoint
    model = load_compressed(_skeleton(), path).eval()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives assignment
    assert isinstance(model.model.layers[1].mlp.up_proj, rk.nn.BlockCirculantLinear)
    with torch.no_grad():
        assert torch.equal(model(_ids(3, seed=5)).logits, ref)


def test_empty_skeleton_dtype_is_kept(checkpoint):
    path, _ = checkpoint
    model = load_compressed(_skeleton(torch.bfloat16), path)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.u.dtype == torch.bfloat16
    q = model.model.layers[1].self_attn.q_proj
    assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.bfloat16
    dense = tiny_llama(seed=9, dtype=torch.bfloat16)
    load_compressed(dense, path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), dense.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k


def test_skeleton_with_meta_buffers_is_refused_unchanged(checkpoint):
    path, _ = checkpoint
    with torch.device("meta"):  # everything on meta, the rotary frequencies too: they cannot be loaded
        skel = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    with pytest.raises(ValueError, match="inv_freq.*meta"):
        load_compressed(skel, path)
    assert type(skel.model.layers[0].mlp.up_proj) is nn.Linear


def test_load_pretrained_rebuilds_the_model_from_the_folder_alone(checkpoint, tmp_path):
    path, ref = checkpoint
    assert (path / "config.json").is_file()  # save_compressed wrote the Hugging Face config
    model = rk.load_pretrained(path)
    assert not model.training and isinstance(model.model.layers[1].mlp.up_proj, rk.nn.BlockCirculantLinear)
    with torch.no_grad():
        assert torch.equal(model(_ids(3, seed=5)).logits, ref)
    assert rk.load_pretrained(path, dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16
    plain = save_compressed(nn.Sequential(nn.Linear(4, 4)), tmp_path / "plain")
    with pytest.raises(ValueError, match="no config.json"):
        rk.load_pretrained(plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_pretrained_gives_a_half_model_back_in_its_dtype(dtype, tmp_path):
    """A model cast to bf16 / fp16 after loading keeps "float32" in its config; the manifest records the dtype
    it was saved in, so load_pretrained() rebuilds it in that dtype with every tensor bit-identical and in its
    saved dtype (before, the config's float32 doubled its memory and changed its outputs)."""
    import json

    student, _ = rk.compress(tiny_llama(dtype=dtype), RECIPE, calib=_ids(8), progress=False)
    student.model.norm.float()  # a model mixing dtypes (a norm kept in fp32) comes back mixed
    path = save_compressed(student, tmp_path / "ck")
    assert json.loads((path / "manifest.json").read_text())["dtype"] == str(dtype)
    model = rk.load_pretrained(path)
    want, got = student.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert rk.load_pretrained(path, dtype=torch.float32).model.embed_tokens.weight.dtype == torch.float32
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["dtype"]  # a checkpoint from before the manifest recorded it: float32, as then
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert rk.load_pretrained(path).model.embed_tokens.weight.dtype == torch.float32


def test_cli_loads_a_checkpoint_without_dense_weights(checkpoint, monkeypatch):
    from reparam_kernels.cli import _models

    path, ref = checkpoint
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda p: "tokenizer")
    made = []
    real = transformers.AutoModelForCausalLM.from_config
    def from_config(cfg, **kw):
        made.append(real(cfg, **kw))
        made.append(all(p.is_meta for p in made[0].parameters()))
        return made[0]

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    loaded, tok = _models.load_any(path)
    assert tok == "tokenizer" and loaded is made[0] and made[1]  # built without weights, then filled
    with torch.no_grad():
        assert torch.equal(loaded(_ids(3, seed=5)).logits, ref)
