"""The causal conv kernel's plain-PyTorch specification: ``transmamba_kernels.reference.conv``
(one implementation, shared with decoding and the exported Hugging Face model)."""
from ..reference.conv import causal_conv1d_silu_naive, causal_conv1d_silu_step_naive

__all__ = ["causal_conv1d_silu_naive", "causal_conv1d_silu_step_naive"]
