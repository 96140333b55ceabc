"""The quantized Triton kernels (and the low-rank ops' GEMMs) compiled for GPUs on a machine without one (tools/triton_aot.py):
every tile class and dtype compiles, spills nothing, fits the 99 KB of shared memory a block may
have on sm_86 / sm_89 (the smallest of the supported GPUs), and reads its weights the fast way —
8- or 16-byte loads in the GEMV loop, asynchronous pipelined copies (cp.async) in the tl.dot loops.
A change that makes Triton fall back to byte-wide loads (the first version of these kernels, ~20×
slower than the int8 kernel on the H200) fails here."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="Triton's NVIDIA backend tools are missing")

SMEM_LIMIT = 99 * 1024
OPS = ["int4_linear", "grouped_int4", "grouped_int8", "grouped_vq", "grouped_lut", "int8_linear", "lut_linear", "vq_linear",
       "matmul_nt", "pivot_t", "grouped_lowrank_v", "grouped_lowrank_u"]
# (grouped_lowrank_*: compiled with the layout's row_align = 8 promise, without which its weight rows — runtime
# lengths, each expert's rank — load 2 bytes at a time, as the first version of it did: 0.33 warp instructions a
# weight byte against 0.04)
CLASSES = ["gemv", "m16", "m256"]
DTYPES = ["fp16", "fp32"]


@pytest.fixture(scope="module")
def compiled():
    """One subprocess (the tests run Triton's interpreter, whose kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, os.path.join(ROOT, "tools", "triton_aot.py"), "--json", "--arch", "89"]
    for flag, values in (("--op", OPS), ("--cls", CLASSES), ("--dtype", DTYPES)):
        for v in values:
            args += [flag, v]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    return {(r["op"], r["cls"], r["dtype"]): r for r in rows}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("op", OPS)
def test_compiles_without_spills_and_loads_wide(compiled, op, cls, dtype):
    r = compiled[(op, cls, dtype)]
    assert r["spill_bytes"] == 0, r
    assert r["shared"] <= SMEM_LIMIT, r
    if r["tiles"]["gemv"]:  # (the grouped kernel has no GEMV form: one row per expert takes tl.dot)
        assert any(w.startswith(("v2.", "v4.")) for w in r["loads"]), r
    else:
        assert r["cp_async"] > 0, r
