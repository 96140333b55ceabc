"""Build entry point: ``pip install --no-build-isolation .`` (or ``-e .``).

Builds ``reparam_kernels/_C.abi3.so`` against PyTorch's stable ABI and the
Python limited API whenever nvcc and a CUDA build of torch are present; one
binary then serves every torch >= 2.10 and CPython >= 3.10. Without them the
package installs without the extension (Triton / reference backends).
Sources: csrc/sources.txt (shared with CMakeLists.txt).
"""
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_80 covers A100 (and runs on sm_86/89 GPUs); sm_86/89 get their own SASS;
# sm_90a enables wgmma/TMA in *_sm90.cu files.
PORTABLE_ARCHS = os.environ.get("REPARAM_CUDA_ARCHS", "80;86;89;90a").split(";")
TORCH_TARGET = "0x020a000000000000"  # stable ABI of torch 2.10


def find_cuda_home():
    """CUDA_HOME first, then the usual places. Not torch's guess from `nvcc` on PATH,
    which is wrong when that nvcc is a wrapper script outside the toolkit."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def read_sources():
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def gencode_flags(archs):
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def extension_modules():
    if os.environ.get("REPARAM_NO_CUDA") == "1":
        print("reparam_kernels: REPARAM_NO_CUDA=1, building without the CUDA extension")
        return [], {}
    cuda_home = find_cuda_home()
    try:
        import torch
    except ImportError:
        print("reparam_kernels: torch not importable at build time; no CUDA extension")
        return [], {}
    if cuda_home is None or torch.version.cuda is None:
        why = "no CUDA toolkit found" if cuda_home is None else f"torch {torch.__version__} is CPU-only"
        if os.environ.get("REPARAM_REQUIRE_CUDA") == "1":
            raise RuntimeError(f"REPARAM_REQUIRE_CUDA=1 but {why}")
        print(f"reparam_kernels: {why}; installing without the CUDA extension")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # torch caches its guess at import
    sources = read_sources()
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET}", "-DPy_LIMITED_API=0x030a0000", "-DUSE_CUDA"]
    nvcc_common = defines + ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                             "-DNDEBUG", "-Xptxas=-warn-spills"]
    # Per-file arch flags are not expressible through setuptools, so *_sm90.cu files
    # guard their bodies with __CUDA_ARCH__ >= 900 and build for every arch listed.
    ext = cpp_extension.CUDAExtension(
        name="reparam_kernels._C",
        sources=sources,
        py_limited_api=True,
        extra_compile_args={"cxx": defines + ["-O3", "-std=c++17"],
                            "nvcc": nvcc_common + gencode_flags(PORTABLE_ARCHS)},
    )
    cmd = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmd


ext_modules, cmdclass = extension_modules()

setup(
    name="reparam_kernels",
    version="0.1.0",
    description="Compressed (reparameterized) linear layers for LLMs with fast CUDA/Triton kernels",
    packages=find_packages(include=["reparam_kernels", "reparam_kernels.*"]),
    package_data={"reparam_kernels": ["recipes/*.yaml"]},  # the built-in recipes (compress.recipe.BUILTIN)
    python_requires=">=3.10",
    install_requires=["torch>=2.10", "numpy", "scipy"],  # scipy: pivoted QR on the CPU (nn/pivoted.py)
    extras_require={"models": ["transformers", "gguf", "accelerate", "safetensors", "tqdm", "pyyaml"],
                    "test": ["pytest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
