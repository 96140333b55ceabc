"""Typed wrappers of ``torch.ops.reparam.*``: one file per op, each with its
argument checks, ``register_fake`` and (for trainable ops) ``register_autograd``.
Importing this package binds every op's backends (see ``_dispatch.register``).
"""
from .lowrank_linear import lowrank_linear
from .pivoted_lowrank_linear import pivoted_lowrank_linear
from .block_circulant_linear import block_circulant_linear
from .block_circulant_cols_linear import block_circulant_cols_linear
from .toeplitz_linear import toeplitz_linear
from .int8_linear import int8_linear
from .int4_linear import int4_linear
from .grouped_int4_linear import grouped_int4_linear
from .grouped_int8_linear import grouped_int8_linear
from .grouped_vq_linear import grouped_vq_linear
from .grouped_lut_linear import grouped_lut_linear
from .grouped_lowrank_linear import grouped_lowrank_linear
from .lut_linear import lut_linear
from .vq_linear import vq_linear

__all__ = ["lowrank_linear", "pivoted_lowrank_linear"]
__all__ += ["block_circulant_linear", "block_circulant_cols_linear", "toeplitz_linear"]
__all__ += ["int8_linear", "int4_linear", "lut_linear", "vq_linear"]
__all__ += ["grouped_int4_linear", "grouped_int8_linear", "grouped_vq_linear", "grouped_lut_linear",
            "grouped_lowrank_linear"]
