"""The norm kernels' plain-PyTorch specification: ``transmamba_kernels.reference.norm`` (one
implementation, shared with the model's torch path and the exported Hugging Face model)."""
from ..reference.norm import add_rmsnorm_naive, gated_rmsnorm_naive, rmsnorm_naive

__all__ = ["add_rmsnorm_naive", "gated_rmsnorm_naive", "rmsnorm_naive"]
