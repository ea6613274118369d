"""Rotary position embedding of Q and K (rotate-half): reference (``naive``) and Triton."""
from .naive import rope_qk_naive

__all__ = ["rope_qk_naive"]
