"""Drop-in nn.Module layers whose forward pass calls one reparam op."""
from .lowrank import LowRankLinear  # noqa: F401
