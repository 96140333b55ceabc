"""Versions, GPU, extension status, and which backend runs each op (and why).

    python -m reparam_kernels env [--json]
"""
import argparse
import json
import os
import platform
import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _gpus():
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                    "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2 ** 30, 1)})
    return out


def collect():
    """Everything `env` reports, as a dict (the --json output)."""
    import reparam_kernels
    from reparam_kernels import _dispatch, _extension

    backends = {}
    for op in sorted(_dispatch.REGISTRY):
        backends[op] = {}
        for device in ("cuda", "cpu"):
            for dname, dtype in DTYPES.items():
                backend, why = _dispatch.backend_for(op, device, dtype)
                backends[op][f"{device}/{dname}"] = {"backend": backend, "why": why}
    return {
        "reparam_kernels": reparam_kernels.__version__,
        "package_dir": os.path.dirname(os.path.abspath(reparam_kernels.__file__)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "gpus": _gpus(),
        "extension_loaded": bool(_extension.LOADED),
        "extension": _extension.REASON,
        "backends": backends,
    }


def render(info):
    lines = [f"reparam_kernels {info['reparam_kernels']}  ({info['package_dir']})",
             f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU-only build'}), "
             f"triton {info['triton'] or 'not installed'}"
             + (f", TRITON_INTERPRET={info['TRITON_INTERPRET']}" if info["TRITON_INTERPRET"] else "")]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"GPU {g['index']}: {g['name']}, {g['capability']}, {g['sms']} SMs, {g['memory_gib']} GiB")
    else:
        lines.append("GPU: none visible (the cuda rows below say what would run on one)")
    lines.append(f"CUDA extension: {'loaded' if info['extension_loaded'] else 'NOT loaded'} — {info['extension']}")
    lines.append("")
    lines.append("backend per op (device/dtype: backend — why):")
    for op, cases in info["backends"].items():
        lines.append(f"  {op}")
        for case, b in cases.items():
            lines.append(f"    {case:10} {b['backend']:9} — {b['why']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reparam_kernels env", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
