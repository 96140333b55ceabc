"""Call every op once on the GPU, small, through every layer type: the script the GPU
runner puts under `compute-sanitizer --tool memcheck` (and usable on its own).

Exits 1 if an op that has a CUDA kernel was not exercised or a result is wrong.
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reparam_kernels import _dispatch  # noqa: E402
from reparam_kernels.bench import variants  # noqa: E402


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "reparam":
            self.seen.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script itself")
    device = p.parse_args(argv).device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sanitize_ops: needs a CUDA GPU")
    torch.manual_seed(0)
    bad = []
    recorder = RecordOps()
    for kind in variants.available():
        # int8 / int4 also at a long K and a narrow N: the small-M path then splits K over CTAs,
        # so its partials and last-CTA reduction run under memcheck too.
        shapes = [(256, 192, (1, 17))] + ([(1024, 72, (1, 40))] if kind in ("int8", "int4_g128") else [])
        for dtype, (k_in, n_out, batches) in [(d, s) for d in (torch.float16, torch.bfloat16) for s in shapes]:
            lin = nn.Linear(k_in, n_out, bias=True).to(device=device, dtype=dtype)
            layer = variants.make(kind, lin)
            dense = layer.to_dense().double() if hasattr(layer, "to_dense") else None
            for m in batches:
                x = torch.randn(m, k_in, device=device, dtype=dtype)
                with recorder:
                    y = layer(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                if dense is not None:
                    ref = x.double() @ dense.t() + (layer.bias.double() if getattr(layer, "bias", None) is not None
                                                    else 0)
                    err = float((y.double() - ref).norm() / ref.norm())
                    if not err < 5e-2:
                        bad.append(f"{kind} {dtype} M={m}: relative error {err:.3g} against to_dense()")
            print(f"sanitize_ops: {kind} {str(dtype)[6:]} ok", flush=True)
    with_kernel = {op for op in _dispatch.REGISTRY if _dispatch.backend_for(op, "cuda", torch.float16)[0] == "cuda"}
    missed = sorted(with_kernel - recorder.seen)
    print(f"sanitize_ops: ops called: {sorted(recorder.seen)}; CUDA-kernel ops: {sorted(with_kernel)}")
    if missed:
        bad.append(f"CUDA-kernel ops not exercised by any layer: {missed}")
    for b in bad:
        print("sanitize_ops: FAIL", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
