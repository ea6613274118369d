"""The optimizer step's scalars (gradient norm, clip scale, skip flag): reference and Triton."""
from .naive import step_scalars_naive

__all__ = ["step_scalars_naive"]
