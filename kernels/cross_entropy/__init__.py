"""Cross entropy over a tensor-parallel vocabulary: reference (``naive``) and Triton."""
from .naive import cross_entropy_naive

__all__ = ["cross_entropy_naive"]
