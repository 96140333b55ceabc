"""reparam_kernels: compressed (reparameterized) linear layers for LLMs, with fast kernels."""
from . import _extension, ops  # noqa: F401  (ops registers torch.ops.reparam.*)
from .compress import compress, distill, empty_weights, load_compressed, load_pretrained, save_compressed  # noqa: F401,E402  (the function; submodules stay importable)

from .compress.int4_checkpoints import load_int4_pretrained  # noqa: F401,E402  (GPTQ / AWQ / compressed-tensors checkpoints)
from .compress.fold_orders import fold_act_order  # noqa: F401,E402
from .compress import hf_quantizer as _hf_quantizer  # noqa: E402
from .compress.hf_quantizer import hf_config  # noqa: F401,E402  (from_pretrained(..., quantization_config=hf_config("int4")))
from .nn.fused import fuse_projections, unfuse_projections  # noqa: F401,E402

__version__ = "0.1.0"

_hf_quantizer.install()  # transformers' from_pretrained takes save_compressed folders (now or once it is imported)
