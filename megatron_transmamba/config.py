"""TransMambaConfig: megatron-core's TransformerConfig plus only the fields TransMamba adds.

The TransMamba mixer (DESIGN section 1) reuses megatron-core's Mamba head fields
(``mamba_num_heads`` = H, ``mamba_head_dim`` = P, ``mamba_num_groups`` = G,
``mamba_state_dim`` = N) and adds the convolution, SSD scan, dt initialisation, attention
position embedding, TransPoint schedule and layer pattern. Every rule is checked in a small
``_validate_*`` method whose error names the field and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_transmamba.transpoint import build_transpoints

LAYER_SYMBOLS = {
    "T": "TransMamba mixer (attention before the layer's TransPoint, SSM after it)",
    "M": "Mamba-2 mixer (a TransMamba mixer whose TransPoint is 0)",
    "*": "standard self-attention (megatron-core SelfAttention, SDPA core)",
    "-": "SwiGLU MLP",
}

MIXER_BACKENDS = ("torch", "triton")


@dataclass
class TransMambaConfig(TransformerConfig):
    """Configuration of a TransMamba language model (DESIGN sections 1-3)."""

    layer_pattern: str = "T-T-"
    """One symbol per layer (megatron-core hybrid style): ``T`` TransMamba, ``M`` Mamba-2,
    ``*`` self-attention, ``-`` MLP. ``num_layers`` is derived from its length."""

    seq_length: int = 2048
    """Training sequence length T. TransPoint presets scale to it."""

    transpoint_schedule: str = "v9"
    """``fixed``, ``list``, ``cyclic``, ``transformer`` (p = T), ``mamba`` (p = 0) or a paper
    preset ``v1``..``v9`` (see ``megatron_transmamba.transpoint``)."""

    transpoint_values: Optional[list] = None
    """Token positions for ``fixed`` (one value), ``list`` (one per ``T`` layer), ``cyclic``."""

    mamba_conv_kernel: int = 4
    """Width W of the causal depthwise convolution over x, B, C."""

    ssd_chunk_size: int = 64
    """Chunk length of the chunked SSD scan."""

    A_init_range: tuple = (1.0, 16.0)
    """A = -exp(A_log) is initialised with exp(A_log) uniform in this range."""

    dt_min: float = 0.001
    dt_max: float = 0.1
    """dt is initialised log-uniform in [dt_min, dt_max] (through dt_bias)."""

    dt_init_floor: float = 1e-4
    """Lower bound of the initial dt."""

    dt_limit: tuple = (0.0, math.inf)
    """dt = clamp(softplus(dt + dt_bias), *dt_limit)."""

    mixer_position_embedding: str = "rope"
    """``rope`` (on Q = C and K = B inside softmax only) or ``none``."""

    rope_theta: float = 10000.0
    """RoPE base, for the TransMamba attention segment and the ``*`` layers."""

    mixer_backend: str = "torch"
    """Implementation of the mixer core, chosen explicitly (no silent fallback). ``torch``: SDPA +
    Memory Converter + chunked SSD in plain PyTorch (the executable specification). ``triton``:
    SDPA + the Triton SSD with the TransPoint (Memory Converter fused into its state passing),
    the fused conv and gated norm; the model's pre-norms (``layers/norm.RMSNorm``) then also use
    the fused Triton RMSNorm."""

    share_embeddings_and_output_weights: bool = False
    """Tie the LM head to the input embedding: one [V, d] matrix (V/tp rows per tensor-parallel
    rank) used for both, as megatron-core's GPTModel argument of this name (Megatron-LM ties by
    default; ``--untie-embeddings-and-output-weights`` unties). Under pipeline parallelism the
    last stage holds a copy that its gradients all-reduce keeps equal (docs/parallelism.md)."""

    # Sensible defaults for the paper's models (SwiGLU, RMSNorm, no biases, no dropout).
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    activation_func: object = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    num_layers: int = field(default=0)
    num_attention_heads: int = 16

    def __post_init__(self):
        self.layer_pattern = self.layer_pattern.replace(" ", "")
        self._validate_pattern()
        self.num_layers = len(self.layer_pattern)
        if self.mamba_num_heads is None:
            self.mamba_num_heads = self.hidden_size // self.mamba_head_dim if self.mamba_head_dim else 0
        self._validate_mixer()
        self._validate_tensor_parallel()
        self._validate_scan()
        self.transpoints = self._resolve_transpoints()
        if self._fused_swiglu_applies():
            # megatron-core's MLP then hands fc1's output to our FusedSwiGLU (layers/mlp.py)
            self.use_te_activation_func = True
        with warnings.catch_warnings():
            # megatron-core 0.16 warns about its own default cuda_graph_scope on every config.
            warnings.filterwarnings("ignore", message="full scope is deprecated")
            super().__post_init__()

    def _fused_swiglu_applies(self) -> bool:
        """A bias-free SwiGLU MLP that layers/mlp.FusedSwiGLU computes exactly (triton backend)."""
        return (self.mixer_backend == "triton" and "-" in self.layer_pattern
                and self.gated_linear_unit and self.activation_func is F.silu
                and not self.add_bias_linear and not self.bias_activation_fusion
                and self.glu_linear_offset == 0.0 and self.activation_func_clamp_value is None)

    def _validate_pattern(self):
        bad = sorted(set(self.layer_pattern) - set(LAYER_SYMBOLS))
        if not self.layer_pattern or bad:
            known = "; ".join(f"'{k}' {v}" for k, v in LAYER_SYMBOLS.items())
            raise ValueError(f"layer_pattern={self.layer_pattern!r}: unknown symbols {bad} "
                             f"(known: {known})" if bad else "layer_pattern: must not be empty")

    def _validate_mixer(self):
        if not self.uses_mixer:
            return
        for name in ("hidden_size", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
                     "mamba_state_dim", "mamba_conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.mamba_num_heads % self.mamba_num_groups:
            raise ValueError(f"mamba_num_heads={self.mamba_num_heads} must be divisible by "
                             f"mamba_num_groups={self.mamba_num_groups} (one Q/K group serves "
                             "H/G value heads)")
        if self.mixer_position_embedding not in ("rope", "none"):
            raise ValueError(f"mixer_position_embedding={self.mixer_position_embedding!r}: "
                             "expected 'rope' or 'none'")
        if self.mixer_position_embedding == "rope" and self.mamba_state_dim % 2:
            raise ValueError(f"mamba_state_dim={self.mamba_state_dim} must be even for RoPE on Q = C, K = B")
        if self.mixer_backend not in MIXER_BACKENDS:
            raise ValueError(f"mixer_backend={self.mixer_backend!r}: expected one of {MIXER_BACKENDS}")
        if self.mixer_backend == "triton":
            chunk = self.ssd_chunk_size
            if chunk < 16 or chunk & (chunk - 1):
                raise ValueError(f"ssd_chunk_size={chunk}: mixer_backend='triton' needs a power of two >= 16")
            try:
                import triton  # noqa: F401
            except ImportError:
                raise ValueError("mixer_backend='triton' needs the triton package") from None

    def _validate_tensor_parallel(self):
        """Everything split over tensor-parallel ranks must divide by their number (the
        attention heads and query groups of '*' layers are checked by megatron-core)."""
        tp = self.tensor_model_parallel_size
        where = "(parallel.tensor_model_parallel_size in a run config)"
        split = []
        if self.uses_mixer:
            split += ["mamba_num_heads", "mamba_num_groups"]
        if "-" in self.layer_pattern and self.ffn_hidden_size is not None:
            split.append("ffn_hidden_size")
        if self.sequence_parallel:
            split.append("seq_length")     # the sequence is scattered over the TP ranks
        for name in split:
            if getattr(self, name) % tp:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by "
                                 f"tensor_model_parallel_size={tp} {where}")

    def _validate_scan(self):
        if self.ssd_chunk_size < 1:
            raise ValueError(f"ssd_chunk_size={self.ssd_chunk_size}: must be >= 1")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range={self.A_init_range}: expected 0 < low <= high")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min={self.dt_min}, dt_max={self.dt_max}: expected 0 < dt_min <= dt_max")
        if self.dt_init_floor <= 0:
            raise ValueError(f"dt_init_floor={self.dt_init_floor}: must be > 0")
        lo, hi = self.dt_limit
        if not 0 <= lo < hi:
            raise ValueError(f"dt_limit={self.dt_limit}: expected 0 <= low < high")

    def _resolve_transpoints(self) -> tuple:
        num_t = self.layer_pattern.count("T")
        if num_t == 0 and self.transpoint_values:
            raise ValueError("transpoint_values: the layer_pattern has no 'T' layers to place them on")
        return build_transpoints(self.transpoint_schedule, self.transpoint_values, num_t, self.seq_length)

    @property
    def uses_mixer(self) -> bool:
        return any(s in self.layer_pattern for s in "TM")

    def transpoint_of_layer(self, layer_number: int) -> int:
        """TransPoint of the layer with this global 0-based index: from the schedule for ``T``,
        0 for ``M``. Depends only on the global index, never on the parallel layout."""
        symbol = self.layer_pattern[layer_number]
        if symbol == "M":
            return 0
        if symbol != "T":
            raise ValueError(f"layer {layer_number} is {symbol!r}, not a TransMamba or Mamba-2 layer")
        return self.transpoints[self.layer_pattern[:layer_number].count("T")]


def yaml_fields() -> dict[str, dataclasses.Field]:
    """The TransMambaConfig fields a YAML ``model:`` section may set (plain-valued ones)."""
    plain = (int, float, bool, str, list, tuple, type(None))
    out = {}
    for f in dataclasses.fields(TransMambaConfig):
        if not f.init or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, plain) or f.name in ("params_dtype",):
            out[f.name] = f
    return out
