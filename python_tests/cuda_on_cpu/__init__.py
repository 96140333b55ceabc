"""CUDA on the CPU: compile the project's real CUDA sources (csrc/) with g++ against a small
model of the CUDA language and runtime (runtime.h, launch.h: fibers per CUDA thread, barriers,
warp collectives, mma.sync / WMMA fragments, cp.async, cooperative launches, guard-paged tensors;
fake_torch.h: the stable-ABI slice the host code uses) and run an op from Python.

A test tool: it executes the kernels' own code (index math, bit tricks, barriers, split-K
fixups, the host's path and grid choices) on a machine without a GPU. It says nothing about
speed, and it models the GPU's semantics, not its silicon. See runtime.h for what is checked.

    [(y, launches)] = run_cases([{"op": "int4_linear", "args": [x, q, s, z, None], "ints": [128]}],
                                env={"REPARAM_SMALL_M": "0"})

Each call runs in a fresh subprocess (a fault in a kernel must not take pytest down, and the
device description — RK_CPU_SMS, RK_CPU_BLOCKS_PER_SM, RK_CPU_CC_MAJOR — and the path switches
are read once per process)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-w", "-pthread"]

# The three CUDA-only spellings in csrc/ and what they become for g++.
_LAUNCH = re.compile(r"^(\s*)(.+?)<<<(.+?)>>>\(", re.M)
_COOP = re.compile(r"cudaLaunchCooperativeKernel\(reinterpret_cast<void\*>\((\w+)\),")
_DYN_SMEM = re.compile(r"extern __shared__\s+(?:__align__\(\d+\)\s+)?(.+?)\s+(\w+)\[\];")


def rewrite(text: str, name: str) -> str:
    text = _LAUNCH.sub(lambda m: f'{m[1]}::rk_cpu::launcher("{m[2]}", {m[2]}, {m[3]})(', text)
    text = _COOP.sub(r'::rk_cpu::launch_cooperative("\1", \1,', text)
    text = _DYN_SMEM.sub(r"\1* \2 = reinterpret_cast<\1*>(::rk_cpu::dynamic_smem());", text)
    for left in ("<<<", "extern __shared__", "cudaLaunchCooperativeKernel("):
        if left in re.sub(r"//.*", "", text):
            raise RuntimeError(f"cuda_on_cpu: cannot rewrite `{left}` in {name}: extend rewrite()")
    return text


def _kernel_sources() -> list[Path]:
    lines = (CSRC / "sources.txt").read_text().splitlines()
    return [REPO / s.strip() for s in lines if s.strip().endswith(".cu")]


def _harness_digest() -> str:
    h = hashlib.sha256(" ".join(FLAGS).encode())
    for p in sorted(HERE.rglob("*")):
        if p.is_file() and p.suffix in {".h", ".cpp"}:
            h.update(str(p.relative_to(HERE)).encode() + p.read_bytes())
    return h.hexdigest()


# Units whose ops call into another unit's functions (a subset build must link that one too).
UNIT_DEPS = {"pivoted_lowrank_linear.cu": ["lowrank_linear.cu"], "toeplitz_linear.cu": ["block_circulant_linear.cu"]}


def build(mutations=(), ops=None) -> Path:
    """The harness library for the current csrc/ (cached under build/cuda_on_cpu/). `mutations`:
    (file name, old text, new text) edits applied to csrc/ first, for tests that show a bug is caught.
    Objects are cached by their inputs (a unit's text and the headers it reaches), so a mutation
    recompiles only the units it reaches. `ops` (op names, each its unit's stem): a mutated build
    serves only those ops' cases, so it compiles and links only their units (and UNIT_DEPS) — the
    mutation tests were most of the CPU suite's time. The link refuses undefined symbols, so a
    missing UNIT_DEPS entry fails the build instead of the load."""
    if shutil.which("g++") is None:
        raise RuntimeError("cuda_on_cpu needs g++")
    texts = {p.name: p.read_text() for p in CSRC.iterdir() if p.suffix in {".cu", ".cuh", ".h"}}
    for name, old, new in mutations:
        if texts[name].count(old) != 1:
            raise ValueError(f"mutation: {old!r} must occur exactly once in {name}")
        texts[name] = texts[name].replace(old, new)
    texts = {name: rewrite(t, name) for name, t in texts.items()}
    harness = _harness_digest()
    root = REPO / "build" / "cuda_on_cpu"
    (root / "obj").mkdir(parents=True, exist_ok=True)
    units = [p.name for p in _kernel_sources()]
    if mutations and ops:
        needed, todo = set(), [f"{op}.cu" for op in ops]
        while todo:
            u = todo.pop()
            if u not in units:
                raise ValueError(f"cuda_on_cpu: no unit {u} in csrc/sources.txt")
            if u not in needed:
                needed.add(u)
                todo += UNIT_DEPS.get(u, [])
        units = [u for u in units if u in needed]
    # a unit's object is keyed by its text and the csrc/ headers it reaches: a mutation in
    # small_m_gemm.cuh rebuilds the units that include it, not block_circulant_linear.cu
    keys = {u: hashlib.sha256(f"{harness}{u}{texts[u]}".encode() + b"".join(
        f"\0{n}\0{texts[n]}".encode() for n in sorted(_reached(u, texts)))).hexdigest()[:20] for u in units}
    lib = root / ("lib-" + hashlib.sha256("".join(keys[u] for u in units).encode()).hexdigest()[:16] + ".so")
    if lib.exists():
        return lib
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        _build_into(tmp, lib, texts, units, keys, harness, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root)
    return lib


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _reached(unit: str, texts: dict) -> set:
    """The csrc/ headers `unit` includes, directly or through other csrc/ headers."""
    seen, todo = set(), [unit]
    while todo:
        for name in _INCLUDE.findall(texts[todo.pop()]):
            name = os.path.basename(name)
            if name in texts and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def _prune(root: Path, keep_libs: int = 40, keep_objs: int = 300) -> None:
    """Keeps the cache bounded: the newest libraries and objects stay (mutation builds add a few each)."""
    def newest_first(paths):
        return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)
    for old in newest_first(root.glob("lib-*.so"))[keep_libs:] + newest_first((root / "obj").glob("*.o"))[keep_objs:]:
        old.unlink(missing_ok=True)


def _build_into(tmp, lib, texts, units, keys, harness, root):
    src = tmp / "csrc"
    src.mkdir()
    for name, t in texts.items():
        (src / name).write_text(t)
    inc = ["-I", str(HERE / "include"), "-I", str(HERE), "-I", str(src)]
    jobs = [(src / u, root / "obj" / f"{Path(u).stem}-{keys[u]}.o", True) for u in units] + [
        (HERE / f, root / "obj" / f"{Path(f).stem}-{harness[:20]}.o", False)
        for f in ("scheduler.cpp", "device_ops.cpp", "cuda_api.cpp", "fake_torch.cpp", "entry.cpp")]

    def compile_one(job):
        path, obj, is_cu = job
        if not obj.exists():
            part = obj.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", *FLAGS, *inc, "-c", *(["-x", "c++"] if is_cu else []), str(path), "-o", str(part)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cuda_on_cpu: compiling {path.name} failed:\n{r.stderr[-6000:]}")
            os.replace(part, obj)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, jobs))
    r = subprocess.run(["g++", "-shared", "-pthread", "-Wl,-z,defs", *map(str, objs), "-o", str(tmp / lib.name)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda_on_cpu: linking failed:\n{r.stderr[-6000:]}")
    os.replace(tmp / lib.name, lib)


class KernelError(RuntimeError):
    """The op raised (bad input, bad launch, divergent barrier, deadlock, trap) or crashed."""


def run_cases(cases: list, env: dict | None = None, mutations=(), timeout: float = 900) -> list:
    """Runs several ops in one subprocess (one device description and one set of path switches).
    `cases`: dicts with "op", "args" (the op's tensor arguments in schema order, None for an absent
    optional), optional "ints" (its integer arguments) and "offsets" ({argument index: bytes} of
    deliberate misalignment). `env`: path switches, RK_CPU_SMS / RK_CPU_BLOCKS_PER_SM /
    RK_CPU_CC_MAJOR (the fake GPU), RK_CPU_SEED (block and thread orders), RK_CPU_SKEW (warps drifting apart
    between barriers: scheduler.cpp). Returns one
    (output, launches) per case, launches being lines "launch <kernel> grid (x,y,z) block n smem s
    [cooperative]". Raises KernelError when an op raises or the process dies (a fault reports the
    block and thread)."""
    lib = build(mutations, ops={c["op"] for c in cases})
    with tempfile.TemporaryDirectory() as d:
        case_file, result = Path(d) / "cases.pt", Path(d) / "out.pt"
        torch.save([{"ints": [], "offsets": {}, **c} for c in cases], case_file)
        r = subprocess.run([sys.executable, str(HERE / "runner.py"), str(lib), str(case_file), str(result)],
                           env={**os.environ, **(env or {}), "RK_CPU_TRACE": "1"}, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0 or not result.exists():
            raise KernelError(f"exit {r.returncode}: {(r.stderr or r.stdout)[-4000:]}")
        outs = torch.load(result)
    traces, cur = [], None
    for line in r.stderr.splitlines():
        if line.startswith("case "):
            cur = []
            traces.append(cur)
        elif line.startswith("launch ") and cur is not None:
            cur.append(line)
    return list(zip(outs, traces))
