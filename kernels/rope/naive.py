"""The RoPE kernel's plain-PyTorch specification: ``transmamba_kernels.reference.rope`` (one
implementation, shared with the model's torch path and the exported Hugging Face model)."""
from ..reference.rope import rope_qk_naive

__all__ = ["rope_qk_naive"]
