"""benchmarks/quality_quant.py end to end on a tiny random Llama (the real run needs SmolLM2 and minutes)."""
import importlib
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        ids = torch.tensor([[ord(c) % 97 for c in text]])
        return {"input_ids": ids}


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quality_script_tiny(tmp_path, monkeypatch):
    q = importlib.import_module("quality_quant")
    monkeypatch.setattr(q.data, "load_smollm2", lambda: (tiny_llama(), FakeTokenizer()))
    monkeypatch.setattr(q.data, "austen", lambda name: ("It is a truth universally acknowledged. " * 400))
    monkeypatch.setattr(q, "calibration_ids", lambda tok, text, seqs, seq_len=512:
                        q.token_windows(tok, text, window=64, max_windows=seqs))
    out = tmp_path / "quant.json"
    assert q.main(["--windows", "1", "--calib-seqs", "2", "--methods", "int8,int4_g128_gptq,log4",
                   "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["dense", "int8", "int4_g128_gptq", "log4"]
    assert "partial" not in data and all(r["ppl"] > 1 for r in data["rows"])
    assert data["rows"][1]["bits_per_weight"] > 8  # int8 codes + fp32 scales
    # --update replaces only the rows it re-measures
    # (and a row calibrated on random tokens instead of the calibration text)
    assert q.main(["--windows", "1", "--calib-seqs", "2", "--methods", "int8,int4_g128_rtn_random", "--out", str(out),
                   "--update"]) == 0
    again = json.loads(out.read_text())
    assert [r["method"] for r in again["rows"]] == ["dense", "int8", "int4_g128_gptq", "int4_g128_rtn_random", "log4"]
    assert q.calib_of("int4_g128_rtn_random", "ids") == "random" and q.calib_of("int4_g128_rtn_emma", "ids") == "ids"
    assert q.calib_of("int4_g128_rtn_clip", "ids") is None


def test_quality_script_lm_head(tmp_path, monkeypatch):
    """--lm-head quantizes lm_head too (here tied to the embedding, which stays dense and unchanged)."""
    q = importlib.import_module("quality_quant")
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    embedding = model.model.embed_tokens.weight.detach().clone()
    monkeypatch.setattr(q.data, "load_smollm2", lambda: (model, FakeTokenizer()))
    monkeypatch.setattr(q.data, "austen", lambda name: ("It is a truth universally acknowledged. " * 400))
    monkeypatch.setattr(q, "calibration_ids", lambda tok, text, seqs, seq_len=512:
                        q.token_windows(tok, text, window=64, max_windows=seqs))
    out = tmp_path / "lm_head.json"
    assert q.main(["--windows", "1", "--calib-seqs", "2", "--methods", "int4_g128_gptq", "--lm-head", "int8",
                   "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["dense", "int4_g128_gptq+lm_head:int8"]
    assert data["rows"][1]["settings"]["lm_head"] == {"method": "int8"} and "lm_head with int8" in data["quantized"]
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with pytest.raises(SystemExit, match="needs calibration"):
        q.main(["--windows", "1", "--methods", "int8", "--lm-head", "int4_g128_gptq", "--out", str(out)])
