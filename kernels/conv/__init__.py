"""Causal depthwise conv1d + SiLU over [B, T, C]: reference (``naive``) and Triton."""
from .naive import causal_conv1d_silu_naive

__all__ = ["causal_conv1d_silu_naive"]
