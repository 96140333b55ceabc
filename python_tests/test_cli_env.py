"""`python -m reparam_kernels env`, and the clear fallbacks for an old torch or an old GPU."""
import json
import subprocess
import sys

import pytest
import torch

import reparam_kernels
from reparam_kernels import _dispatch, _extension
from reparam_kernels.__main__ import commands, main


def test_env_reports_every_op_backend(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["reparam_kernels"] == reparam_kernels.__version__
    assert set(info["backends"]) == set(_dispatch.REGISTRY) and "lowrank_linear" in info["backends"]
    for op, cases in info["backends"].items():
        assert set(cases) == {f"{d}/{t}" for d in ("cuda", "cpu") for t in ("fp16", "bf16", "fp32")}
        assert cases["cpu/fp32"]["backend"] == "reference"
        for b in cases.values():
            assert b["backend"] in ("cuda", "triton", "reference") and b["why"]
    assert info["extension_loaded"] == _extension.LOADED and info["extension"] == _extension.REASON


def test_env_text_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "reparam_kernels", "env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CUDA extension:" in out.stdout and "lowrank_linear" in out.stdout and "cpu/fp32" in out.stdout


def test_unknown_command_fails(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert {"env", "bench"} <= set(commands())


def test_old_torch_gets_a_clear_reason(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    monkeypatch.setattr(_extension, "LOADED", False)
    monkeypatch.setattr(_extension, "REASON", "not attempted")
    monkeypatch.setattr(_extension, "glob", type("G", (), {"glob": staticmethod(lambda p: ["/x/_C.abi3.so"])}))
    _extension._load()
    assert not _extension.LOADED
    assert "older than 2.10" in _extension.REASON and "2.9.1" in _extension.REASON


def test_old_gpu_falls_back_with_reason(monkeypatch):
    if not _dispatch.has_cuda_kernel("lowrank_linear"):
        pytest.skip("extension not built: there is no CUDA kernel to fall back from")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_dispatch, "_CAPABILITY", {0: (7, 5)})
    backend, why = _dispatch.backend_for("lowrank_linear", "cuda", torch.float16)
    assert backend in ("triton", "reference") and "sm_75" in why and "sm_80" in why
    monkeypatch.setattr(_dispatch, "_CAPABILITY", {0: (9, 0)})
    assert _dispatch.backend_for("lowrank_linear", "cuda", torch.float16)[0] == "cuda"


def test_backend_choice_traces_under_fullgraph():
    """backend_for is a constant to torch.compile (it asks the dispatcher, which dynamo cannot trace)."""
    def f(x):
        backend, _ = _dispatch.backend_for("lowrank_linear", "cuda", torch.float16)
        return x + len(backend)

    x = torch.randn(3)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


def test_old_gpu_warns_once_when_falling_back(monkeypatch):
    if not _dispatch.has_cuda_kernel("lowrank_linear"):
        pytest.skip("extension not built")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_dispatch, "_CAPABILITY", {0: (7, 0)})
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    spec = _dispatch.REGISTRY["lowrank_linear"]
    calls = []
    monkeypatch.setattr(spec, "triton", lambda *a: calls.append(a) or "ran")
    backend, why = _dispatch.backend_for("lowrank_linear", "cuda", torch.float16)
    with pytest.warns(RuntimeWarning, match="sm_70"):
        assert _dispatch._run(spec, backend, why, (torch.zeros(1),)) == "ran"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dispatch._run(spec, backend, why, (torch.zeros(1),))  # once only
    assert len(calls) == 2


def test_env_reports_the_cuda_paths_as_the_switches_set_them(monkeypatch):
    from reparam_kernels.cli import env

    for var in ("REPARAM_SMALL_M", "REPARAM_DEQUANT_MIN_M", "REPARAM_LOWRANK_CUBLAS_MIN_M", "REPARAM_WGMMA",
                "REPARAM_BC_LARGE_M_MIN_M", "REPARAM_SMALL_M_T"):
        monkeypatch.delenv(var, raising=False)
    paths = env.cuda_paths()
    assert paths["bc_large_m"]["min_m"] == 64
    assert paths["small_m"]["on"] and paths["dequant_cublas"]["min_m"] == 129
    assert paths["lowrank_cublas"]["min_m"] == 1 and paths["lowrank_cublas"]["pivoted_min_m"] == 2
    assert "M >= 1 (pivoted factors: M >= 2) [REPARAM_LOWRANK_CUBLAS_MIN_M]" in env.render(env.collect())
    assert paths["wgmma"]["on"] and paths["wgmma"]["min_m"] == paths["small_m"]["max_m"] + 1
    assert paths["small_m"]["transposed_max_m"] == 8
    # the ring as csrc/small_m_launch.cuh's ring_mode() reads the variable: unset = x and weights above M = 8
    for value, mode in (("", 3), ("1", 1), ("2", 2), ("0", 0), ("x", 0)):
        monkeypatch.setenv("REPARAM_SMALL_M_RING", value)
        assert env.cuda_paths()["small_m"]["ring"] == mode, value
    monkeypatch.delenv("REPARAM_SMALL_M_RING")
    assert "shared-memory ring: x and weights above M = 8 [REPARAM_SMALL_M_RING]" in env.render(env.collect())
    monkeypatch.setenv("REPARAM_SMALL_M_T", "0")
    assert env.cuda_paths()["small_m"]["transposed_max_m"] == 0
    assert "transposed tile: OFF [REPARAM_SMALL_M_T]" in env.render(env.collect())
    monkeypatch.setenv("REPARAM_WGMMA", "0")
    assert not env.cuda_paths()["wgmma"]["on"] and "OFF [REPARAM_WGMMA," in env.render(env.collect())
    monkeypatch.delenv("REPARAM_GROUPED_SMALL_M", raising=False)
    assert env.cuda_paths()["small_m"]["grouped"]
    monkeypatch.setenv("REPARAM_GROUPED_SMALL_M", "0")
    assert "OFF (a plain fallback kernel) [REPARAM_GROUPED_SMALL_M]" in env.render(env.collect())
    monkeypatch.setenv("REPARAM_SMALL_M", "0")
    monkeypatch.setenv("REPARAM_DEQUANT_MIN_M", "0")
    monkeypatch.setenv("REPARAM_LOWRANK_CUBLAS_MIN_M", " 1024x")  # read like atoll: 1024
    paths = env.cuda_paths()
    assert not paths["small_m"]["on"] and paths["dequant_cublas"]["min_m"] is None
    assert paths["lowrank_cublas"]["min_m"] == 1024 == paths["lowrank_cublas"]["pivoted_min_m"]
    text = env.render(env.collect())
    assert "OFF [REPARAM_SMALL_M]" in text and "never [REPARAM_DEQUANT_MIN_M]" in text
    monkeypatch.setenv("REPARAM_BC_LARGE_M_MIN_M", "0")
    assert "never [REPARAM_BC_LARGE_M_MIN_M]" in env.render(env.collect())


@pytest.mark.parametrize("name", commands())
def test_every_option_of_every_command_says_what_it_is(name, monkeypatch):
    import argparse
    import importlib

    seen = {}

    def capture(parser, *args, **kwargs):
        seen["parser"] = parser
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(f"reparam_kernels.cli.{name}").main([])
    bare = [a.option_strings or [a.dest] for a in seen["parser"]._actions
            if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not bare, f"`{name}` options without help: {bare}"


def test_backend_env_forces_triton_or_reference(monkeypatch):
    """REPARAM_BACKEND=triton / reference overrides the CUDA kernel for GPU tensors (ops without a Triton
    kernel keep theirs), CPU tensors stay on the reference, a bad value names the variable."""
    monkeypatch.setenv("REPARAM_BACKEND", "triton")
    backend, why = _dispatch.backend_for("int4_linear", "cuda", torch.float16)
    assert (backend, why) == ("triton", "REPARAM_BACKEND=triton")
    assert _dispatch.backend_for("int4_linear", "cpu", torch.float16)[0] == "reference"
    assert _dispatch.backend_for("block_circulant_cols_linear", "cuda", torch.float16)[0] != "triton"
    monkeypatch.setenv("REPARAM_BACKEND", "reference")
    assert _dispatch.backend_for("lowrank_linear", "cuda", torch.bfloat16) == ("reference", "REPARAM_BACKEND=reference")
    monkeypatch.setenv("REPARAM_BACKEND", "cublas")
    with pytest.raises(ValueError, match="REPARAM_BACKEND='cublas'"):
        _dispatch.backend_for("int4_linear", "cuda", torch.float16)
    monkeypatch.setenv("REPARAM_BACKEND", "auto")
    if _dispatch.has_cuda_kernel("int4_linear"):
        assert _dispatch.backend_for("int4_linear", "cuda", torch.float16)[0] == "cuda"


def test_backend_env_runs_the_forced_backend_without_warning(monkeypatch):
    import warnings

    spec = _dispatch.REGISTRY["int8_linear"]
    calls = []
    monkeypatch.setattr(spec, "triton", lambda *a: calls.append(a) or "ran")
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch._run(spec, "triton", "REPARAM_BACKEND=triton", (torch.zeros(1),)) == "ran"
    assert len(calls) == 1


def test_columns_thresholds(monkeypatch):
    # block-circulant layers decode from their columns up to 16 rows, Toeplitz ones up to 256 (run 3's peers);
    # REPARAM_BC_COLS_MAX_M=0 (run_gpu.sh's veto after a failed smoke run) switches both off
    from reparam_kernels.cli.env import bc_cols_max_m

    for var in ("REPARAM_BC_COLS_MAX_M", "REPARAM_TOEPLITZ_COLS_MAX_M"):
        monkeypatch.delenv(var, raising=False)
    assert (bc_cols_max_m(), bc_cols_max_m(toeplitz=True)) == (16, 256)
    monkeypatch.setenv("REPARAM_TOEPLITZ_COLS_MAX_M", "64")
    assert (bc_cols_max_m(), bc_cols_max_m(toeplitz=True)) == (16, 64)
    monkeypatch.setenv("REPARAM_BC_COLS_MAX_M", "0")
    assert (bc_cols_max_m(), bc_cols_max_m(toeplitz=True)) == (0, 0)


def test_columns_wide_cta_switch(monkeypatch):
    # REPARAM_BC_COLS_WIDE: on only from "1" (csrc/common.cuh env_opt_in), "0" the smoke run's veto
    from reparam_kernels.cli import env

    for value, on, vetoed in (("", False, False), ("1", True, False), ("0", False, True), ("x", False, False)):
        monkeypatch.setenv("REPARAM_BC_COLS_WIDE", value)
        bc = env.cuda_paths()["bc_cols"]
        assert (bc["wide"], bc["wide_vetoed"]) == (on, vetoed), value
    monkeypatch.setenv("REPARAM_BC_COLS_WIDE", "1")
    assert "K split over the warps of one wide CTA a tile" in env.render(env.collect())
    monkeypatch.delenv("REPARAM_BC_COLS_WIDE")
    assert "<= 32 CTAs where the output tiles leave SMs idle [REPARAM_BC_COLS_WIDE," in env.render(env.collect())


def test_dequant_scratch_budget(monkeypatch):
    # REPARAM_DEQUANT_SCRATCH_MB read as csrc/quant_dequant_mm.cuh reads it (atof; default 256; <= 0: the whole
    # weight at once), and the pieces it makes: the weight whole where it fits, else pieces of 128-row multiples
    # about the budget's size but filling the SMs with output tiles (the harness checks the C++ side agrees)
    from reparam_kernels.cli import env

    for value, mb in (("", 256.0), ("16", 16.0), ("0.5", 0.5), ("0", 0.0), ("-3", 0.0), ("junk", 0.0), ("8MB", 8.0)):
        monkeypatch.setenv("REPARAM_DEQUANT_SCRATCH_MB", value)
        assert env.cuda_paths()["dequant_cublas"]["scratch_mb"] == mb, value
    monkeypatch.delenv("REPARAM_DEQUANT_SCRATCH_MB")
    assert "W a piece of rows at a time within 256 MB [REPARAM_DEQUANT_SCRATCH_MB]" in env.render(env.collect())
    mib = 2**20
    assert env.dequant_pieces(2048, 8192, 8192, 2, 132) == (8192, 1)  # 128 MB: one piece
    assert env.dequant_pieces(2048, 28672, 8192, 2, 132) == (14336, 2)  # 448 MB: two
    assert env.dequant_pieces(256, 128256, 8192, 2, 132) == (16128, 8)  # a 2 GB lm_head: 252 MB pieces
    assert env.dequant_pieces(2048, 8192, 8192, 2, 132, 16 * mib) == (1024, 8)  # 16 x 9 tiles: one wave, 16 MB
    assert env.dequant_pieces(256, 8192, 8192, 2, 132, 16 * mib) == (8192, 1)  # 2 row tiles need 8448 rows
    assert env.dequant_pieces(2048, 28672, 8192, 2, 132, 0) == (28672, 1)
    monkeypatch.setenv("REPARAM_DEQUANT_SCRATCH_MB", "0")
    assert "W whole [REPARAM_DEQUANT_SCRATCH_MB]" in env.render(env.collect())
