"""reparam_kernels: compressed (reparameterized) linear layers for LLMs, with fast kernels."""
from . import _extension, ops  # noqa: F401  (ops registers torch.ops.reparam.*)

__version__ = "0.1.0"
