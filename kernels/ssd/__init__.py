"""Mamba-2 SSD scan: plain-PyTorch references (``naive``) beside the Triton kernels."""
from .naive import chunk_ssd_naive, ssd_recurrent_naive

__all__ = ["chunk_ssd_naive", "ssd_recurrent_naive"]
