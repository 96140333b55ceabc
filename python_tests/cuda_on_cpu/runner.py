"""Subprocess side of cuda_on_cpu.run_cases: loads the harness library, runs each case, saves the outputs."""
import ctypes
import sys

import torch

_CODES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
          torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}


# ops whose output width is an int argument (its index in "ints"); the grouped ops': their weight's second
# dimension; the others': their weight's first dimension
OUT_FEATURES_AT = {"block_circulant_linear": 1, "toeplitz_linear": 1, "block_circulant_cols_linear": 0,
                   "grouped_lowrank_linear": 0}


class RkTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int64), ("ndim", ctypes.c_int64),
                ("sizes", ctypes.c_int64 * 8), ("offset", ctypes.c_int64)]


def run(lib, case):
    args = case["args"]
    keep = []
    descs = (RkTensor * max(1, len(args)))()
    for i, t in enumerate(args):
        if t is None:
            continue
        t = t.contiguous()
        keep.append(t)
        descs[i].data = t.data_ptr()
        descs[i].dtype = _CODES[t.dtype]
        descs[i].ndim = t.dim()
        for j, s in enumerate(t.shape):
            descs[i].sizes[j] = s
        descs[i].offset = int(case["offsets"].get(i, 0))
    ints = (ctypes.c_int64 * max(1, len(case["ints"])))(*case["ints"])
    x, op = args[0], case["op"]
    if op in OUT_FEATURES_AT:
        n_out = case["ints"][OUT_FEATURES_AT[op]]
    elif op.startswith("grouped_"):  # (x, expert_offsets, weight [E, N, ...], ...)
        n_out = args[2].shape[1]
    else:
        n_out = args[1].shape[0]
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype)
    err = ctypes.create_string_buffer(8192)
    rc = lib.rk_call(op.encode(), descs, len(args), ints, ctypes.c_void_p(y.data_ptr()),
                     ctypes.c_int64(y.numel() * y.element_size()), err, len(err))
    if rc != 0:
        sys.stderr.write(f"{op}: {err.value.decode(errors='replace')}\n")
        sys.exit(3)
    return y


def main(lib_path, cases_path, out_path):
    lib = ctypes.CDLL(lib_path)
    outs = []
    for i, case in enumerate(torch.load(cases_path)):
        print(f"case {i}", file=sys.stderr, flush=True)
        outs.append(run(lib, case))
    torch.save(outs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
