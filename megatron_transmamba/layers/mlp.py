"""The ``-`` layers' gated activation in one kernel: SwiGLU on fc1's output.

megatron-core's ``MLP`` without Transformer Engine or its jit-fused bias-SwiGLU runs the gated
linear unit as chunk, SiLU, an add of ``glu_linear_offset`` and a product (three kernels
forward, five backward). Its extension point for a fused activation is the
``MLPSubmodules.activation_func`` module, used when ``use_te_activation_func`` is set (named
for Transformer Engine's fused activations, which it was made for): the module gets fc1's whole
[S, B, 2F] output. Under ``mixer_backend: triton`` the ``-`` layers get ``FusedSwiGLU`` there
(``TransMambaConfig`` sets the flag): ``silu(h[..., :F]) * h[..., F:]`` in one Triton kernel
forward and one backward (``transmamba_kernels.swiglu``). Parameters, names and checkpoints
are megatron-core's MLP's.
"""

from __future__ import annotations

from torch import Tensor, nn


class FusedSwiGLU(nn.Module):
    """[..., 2F] -> silu(x[..., :F]) * x[..., F:] (megatron-core's GLU order), one kernel each
    way; megatron-core's MLP builds it with ``(config=...)``."""

    def __init__(self, config=None):
        super().__init__()
        from transmamba_kernels.swiglu.swiglu import swiglu_triton

        self.swiglu = swiglu_triton

    def forward(self, x: Tensor) -> Tensor:
        return self.swiglu(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata=None) -> dict:
        """No parameters: megatron-core's MLP asks every submodule for its checkpoint state."""
        return {}
