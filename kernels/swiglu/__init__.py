"""SwiGLU, silu(x[..., :F]) * x[..., F:]: reference (``naive``) and Triton."""
from .naive import swiglu_naive

__all__ = ["swiglu_naive"]
