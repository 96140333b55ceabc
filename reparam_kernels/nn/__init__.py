"""Drop-in nn.Module layers whose forward pass calls one reparam op."""
from .corrected import CorrectedLinear  # noqa: F401
from .fused import FusedProjections, ProjectionSlice, fuse_projections, unfuse_projections  # noqa: F401
from .fused_lowrank import FusedLowRank  # noqa: F401
from .lowrank import LowRankLinear  # noqa: F401
from .permuted import PermutedInputLinear  # noqa: F401
from .pivoted import PivotedLowRankLinear  # noqa: F401
from .quant import Int4Linear, Int8Linear, LUTLinear  # noqa: F401
from .structured import BlockCirculantLinear, CirculantLinear, LDRLinear, ToeplitzLinear  # noqa: F401
from .tensorized import CPLinear, TuckerLinear  # noqa: F401
