"""Grouped RMSNorm gated by SiLU(z) after the TransPoint: reference (``naive``) and Triton."""
from .naive import gated_rmsnorm_naive

__all__ = ["gated_rmsnorm_naive"]
