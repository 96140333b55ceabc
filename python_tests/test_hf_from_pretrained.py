"""transformers' AutoModelForCausalLM.from_pretrained loads a save_compressed folder (compress/hf_quantizer.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import reparam_kernels as rk

transformers = pytest.importorskip("transformers")

# one layer of each kind of construction: plain args (int4, int8), pivoted low rank, a derived buffer
# (block-circulant's columns, computed after loading), children (int4 + correction), tensorized
RECIPE = {
    "model.layers.0.self_attn.q_proj": {"method": "int4", "correction_rank": 4},
    "model.layers.0.self_attn.[kv]_proj": "int8",
    "model.layers.0.mlp.*": {"method": "lowrank", "ratio": 0.3, "pivoted": True},
    "model.layers.1.mlp.*": {"method": "block_circulant", "block_size": 32},
    "model.layers.1.self_attn.*": "int4",
}


def tiny(tie):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    out = {}
    for tie in (False, True):
        model, _ = rk.compress(tiny(tie), RECIPE, calib=ids, progress=False)
        path = tmp_path_factory.mktemp("ckpt") / f"tie{int(tie)}"
        rk.save_compressed(model.eval(), path)
        with torch.no_grad():
            out[tie] = (path, model, ids, model(ids).logits)
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_from_pretrained_builds_the_compressed_model(saved, tie, tmp_path):
    path, model, ids, ref = saved[tie]
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "reparam_kernels"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    kinds = {n: type(m).__name__ for n, m in loaded.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "CorrectedLinear"
    assert kinds["model.layers.1.mlp.up_proj"] == "BlockCirculantLinear"
    assert kinds["model.layers.0.mlp.down_proj"] == "PivotedLowRankLinear"
    assert loaded.model.layers[1].self_attn.o_proj._reparam_method == "int4"  # marked, as compress() marks
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # transformers' own save_pretrained of it loads back the same way (config and tensors, no manifest)
    loaded.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # rk.load_pretrained still takes the folder (it drops the quantization_config for its own checked route)
    with torch.no_grad():
        assert torch.equal(rk.load_pretrained(path)(ids).logits, rk.load_pretrained(path)(ids).logits)
        torch.testing.assert_close(rk.load_pretrained(path)(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["transformers first", "reparam_kernels first"])
def test_either_import_order_registers(saved, order):
    # a fresh process: registration happens at import of reparam_kernels, or at transformers' quantizers' import
    path, _, ids, ref = saved[False]
    imports = ("from transformers import AutoModelForCausalLM; import reparam_kernels" if order == "transformers first"
               else "import reparam_kernels; from transformers import AutoModelForCausalLM")
    code = (f"import torch; {imports}\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()\n"
            f"ids = torch.tensor({ids.tolist()})\n"
            f"with torch.no_grad(): torch.save(m(ids).logits, {str(path / 'logits.pt')!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)
    torch.testing.assert_close(torch.load(path / "logits.pt"), ref, rtol=1e-5, atol=1e-5)


def test_mixture_of_experts_folder(tmp_path):
    # fused experts split per expert as compress() split them, then grouped again after loading
    from test_grouped_experts import INT4, _ids, experts_of, tiny_moe

    small, _ = rk.compress(tiny_moe("qwen3_moe"), INT4, calib=_ids(8, 16), progress=False)
    rk.save_compressed(small, tmp_path / "ck")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert all(m._grouped is not None for m in experts_of(back))
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, small(_ids()).logits, rtol=0, atol=0)


def test_a_failing_registration_only_warns(monkeypatch):
    # a transformers without the quantizer API must still import: the hook warns instead of raising
    from reparam_kernels.compress import hf_quantizer

    def broken():
        raise ImportError("no register_quantizer here")

    monkeypatch.setattr(hf_quantizer, "register", broken)
    with pytest.warns(UserWarning, match="no register_quantizer here"):
        hf_quantizer.register_quietly()


def test_compress_while_loading_then_save_and_load(tmp_path):
    # from_pretrained(dense folder, quantization_config=rk.hf_config(recipe)): compress() runs after loading
    dense = tiny(True)
    dense.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    want, _ = rk.compress(dense, "int4", calib="random", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense",
                                                              quantization_config=rk.hf_config("int4")).eval()
    assert sum(type(m).__name__ == "Int4Linear" for m in model.modules()) == 14
    with torch.no_grad():
        ref = want(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "q")  # its config now lists the layers: it loads back compressed
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert len(cfg["layers"]) == 14 and "calib" not in cfg
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="a recipe is needed"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=rk.hf_config(None))
