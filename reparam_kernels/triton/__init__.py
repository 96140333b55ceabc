"""Triton kernels, one op per file. Each name is None when Triton is missing."""
try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs without triton still work via the reference
    lowrank_linear = pivoted_lowrank_linear = None
    block_circulant_linear = toeplitz_linear = None
    int8_linear = int4_linear = lut_linear = vq_linear = None
    grouped_int4_linear = grouped_int8_linear = grouped_vq_linear = grouped_lut_linear = grouped_lowrank_linear = None
else:
    from .lowrank_linear import lowrank_linear
    from .pivoted_lowrank_linear import pivoted_lowrank_linear
    from .block_circulant_linear import block_circulant_linear, toeplitz_linear
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
__all__ += ["block_circulant_linear", "toeplitz_linear"]
__all__ += ["int8_linear", "int4_linear", "lut_linear", "vq_linear"]
__all__ += ["grouped_int4_linear", "grouped_int8_linear", "grouped_vq_linear", "grouped_lut_linear",
            "grouped_lowrank_linear"]
