"""Deploying without tracing at run time: a model with every layer type through torch.export (dynamic batch and
sequence dims, saved and loaded back, in this process and in a fresh one) and through AOTInductor (a .pt2
package of compiled code that calls the ops' kernels); a compressed Hugging Face model, fused projections
included. CPU here; the CUDA package is checked on the GPU."""
import shutil
import subprocess
import sys

import pytest
import torch

import reparam_kernels as rk
from test_compile_all_layers import KINDS, EveryLayer

DIMS = (128, 96)


def every_layer(dtype=torch.float32, device="cpu"):
    return EveryLayer(KINDS, DIMS, dtype, device).eval()


def export_dynamic(model, x):
    batch, seq = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", max=8192)
    return torch.export.export(model, (x,), dynamic_shapes=({0: batch, 1: seq},))


def reparam_calls(ep):
    return {str(n.target) for n in ep.graph.nodes if str(n.target).startswith("reparam.")}


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = every_layer()
    with torch.no_grad():
        return model, export_dynamic(model, torch.randn(2, 5, DIMS[0]))


def test_export_every_layer_with_dynamic_shapes(exported):
    model, ep = exported
    # the ops stay ops in the graph (not traced through into their reference math)
    assert {"reparam.int4_linear.default", "reparam.lowrank_linear.default",
            "reparam.block_circulant_linear.default"} <= reparam_calls(ep), reparam_calls(ep)
    with torch.no_grad():
        for shape in [(1, 1), (3, 7), (2, 5)]:
            x = torch.randn(*shape, DIMS[0])
            assert torch.equal(ep.module()(x), model(x)), shape


def test_exported_program_saves_and_loads_in_a_fresh_process(exported, tmp_path):
    model, ep = exported
    path, inp, out = tmp_path / "every_layer.pt2", tmp_path / "x.pt", tmp_path / "y.pt"
    torch.export.save(ep, str(path))
    x = torch.randn(3, 4, DIMS[0])
    torch.save(x, inp)
    # the ops' schemas come with the package: a process that imports it can load and run the program
    code = ("import torch, reparam_kernels, sys; ep = torch.export.load(sys.argv[1]); "
            "torch.save(ep.module()(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(path), str(inp), str(out)], check=True, timeout=300)
    with torch.no_grad():
        assert torch.equal(torch.load(out), model(x))


NO_CXX = shutil.which("g++") is None and shutil.which("c++") is None


@pytest.mark.skipif(NO_CXX, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_every_layer(exported, tmp_path):
    model, ep = exported
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "every_layer_aoti.pt2"))
        compiled = torch._inductor.aoti_load_package(path)
        for shape in [(1, 1), (3, 7)]:
            x = torch.randn(*shape, DIMS[0])
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_export_compressed_hf_model_fused_and_not():
    model, _ = rk.compress(tiny_llama(), "int4", calib="random", progress=False)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        for fused in (False, True):
            if fused:
                rk.fuse_projections(model)
            ep = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
            calls = [n for n in ep.graph.nodes if str(n.target) == "reparam.int4_linear.default"]
            assert len(calls) == (8 if fused else 14), len(calls)  # per layer: qkv, o, gate_up, down (7 unfused)
            torch.testing.assert_close(ep.module()(ids, use_cache=False).logits, ref, rtol=0, atol=1e-5)


def test_export_compressed_decode_step_with_static_cache():
    # the decode step as deployments export it (transformers' TorchExportableModuleForDecoderOnlyLM: one token
    # against a static KV cache held as buffers), fused int4 projections, against eager decoding step by step
    executorch = pytest.importorskip("transformers.integrations.executorch")
    from transformers import StaticCache

    model = tiny_llama()
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 32}
    model, _ = rk.compress(model, "int4", calib="random", progress=False)
    rk.fuse_projections(model)
    ep = executorch.TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=32).export(
        input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
    assert len([n for n in ep.graph.nodes if str(n.target) == "reparam.int4_linear.default"]) == 8
    step, cache = ep.module(), StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        for pos, tok in enumerate(torch.randint(0, 256, (10,)).tolist()):
            got = step(input_ids=torch.tensor([[tok]]), cache_position=torch.tensor([pos]))
            want = model(torch.tensor([[tok]]), past_key_values=cache, cache_position=torch.tensor([pos]),
                         use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(NO_CXX, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_every_layer_cuda(tmp_path):
    # fp16 only: the package compiles for tens of seconds, and a GPU run's minutes are few
    dtype = torch.float16
    torch.manual_seed(0)
    model = every_layer(dtype, "cuda")
    with torch.no_grad():
        ep = export_dynamic(model, torch.randn(2, 5, DIMS[0], device="cuda", dtype=dtype))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "every_layer_cuda.pt2"))
        compiled = torch._inductor.aoti_load_package(path)
        for shape in [(1, 1), (4, 4), (3, 100)]:  # decode (the small-M kernels) and a prefill
            x = torch.randn(*shape, DIMS[0], device="cuda", dtype=dtype)
            y, ref = compiled(x), model(x)
            torch.cuda.synchronize()
            # (the compile test's bound: inductor's gelu rounds apart from eager's, through 15 layers)
            assert torch.isfinite(y).all() and torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2), shape
