"""The README's "Using it" code runs as written (sizes shrunk so that it takes seconds on a CPU)."""
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

README = Path(__file__).resolve().parents[1] / "README.md"


def _using_it_block():
    text = README.read_text()
    section = text[text.index("## Using it"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'Using it' section has no python block"
    return match.group(1)


def test_readme_using_it_runs(tmp_path, monkeypatch):
    code = _using_it_block()
    assert "4096" in code and "512" in code  # the layer example's sizes, shrunk below
    code = code.replace("4096", "256").replace("torch.randn(512,", "torch.randn(64,")
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(1))
    monkeypatch.chdir(tmp_path)  # it saves to a relative folder
    from test_int4_checkpoints import tiny_llama, write_checkpoint

    write_checkpoint(tiny_llama(False), tmp_path / "some-llama-gptq", "gptq", act_order=True)  # the one it loads
    scope = {"model": model, "calib_ids": ids}
    exec(compile(code, str(README) + ":Using it", "exec"), scope)
    with torch.no_grad():
        assert torch.equal(scope["model_q"](ids).logits, scope["loaded"](ids).logits)
    assert scope["loaded"] is not scope["model_q"]
    with torch.no_grad():
        torch.testing.assert_close(scope["model_t"].eval()(ids).logits, scope["model_q"](ids).logits)
    assert any(type(m).__name__ == "PermutedInputLinear" for m in scope["model_g"].modules())
    assert scope["lr"].to_dense().shape == (256, 256)
    assert (tmp_path / "smollm2-int4" / "manifest.json").is_file()
    assert any(type(m).__name__ == "Int8Linear" for m in scope["model_m"].modules())  # mean_bits chose some int8
    assert any(type(m).__name__ == "CorrectedLinear" for m in scope["model_k"].modules())
