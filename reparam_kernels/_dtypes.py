"""The precision sums run in: float32 for every float type (fp16 / bf16 too), float64 only for float64."""
import torch


def acc_dtype(dtype):
    """float64 for float64, float32 otherwise: what the references, to_dense and the factorizations sum in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
