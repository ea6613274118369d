"""The SSD kernels' plain-PyTorch specification: ``transmamba_kernels.reference.ssd`` (one
implementation, shared with decoding and the exported Hugging Face model)."""
from ..reference.ssd import chunk_ssd_naive, ssd_recurrent_naive, ssd_step_naive

__all__ = ["chunk_ssd_naive", "ssd_recurrent_naive", "ssd_step_naive"]
