"""TransPoint schedules: which token position each TransMamba layer switches from attention to SSM.

The paper (arXiv 2503.24067, section "TransPoint scheduling") gives every TransMamba layer a
TransPoint p: tokens t < p use softmax attention, tokens t >= p use the SSM. Schedules here are
pure functions of (the layer's ordinal among the TransMamba layers of the whole model, the
training sequence length), never of an RNG or of the parallel layout, so every TP/SP/CP rank and
PP stage derives the same p (DESIGN section 2).

Presets V1-V9 are the paper's lists at T = 8192 (Table 6); they scale to another training length
T as fractions of 8192 and are assigned cyclically (TransMamba layer i gets list[i % len]).
"""

from __future__ import annotations

from typing import Sequence

PAPER_REFERENCE_LENGTH = 8192

# The paper's schedules at T = 8192 (Table 6): layer-shared V1-V3, layer-specific V4-V6,
# broad-range V7-V8, fine-grained V9 (the paper's best: val loss 2.898 vs 3.098 for p = T).
PAPER_PRESETS: dict[str, tuple[int, ...]] = {
    "v1": (2048,),
    "v2": (4096,),
    "v3": (6144,),
    "v4": (3072, 4096, 5120),
    "v5": (2048, 3072, 4096),
    "v6": (512, 1024, 2048),
    "v7": (2048, 4096, 6144),
    "v8": (0, 1024, 2048, 6144, 8192),
    "v9": (0, 128, 256, 512, 1024, 2048, 4096, 8192),
}

SCHEDULES = ("fixed", "list", "cyclic", "transformer", "mamba") + tuple(PAPER_PRESETS)


def scale_to_length(values: Sequence[int], seq_length: int,
                    reference_length: int = PAPER_REFERENCE_LENGTH) -> tuple[int, ...]:
    """Scale TransPoints given at ``reference_length`` to ``seq_length`` (same fraction of T)."""
    return tuple(min(seq_length, round(v * seq_length / reference_length)) for v in values)


def build_transpoints(schedule: str, values: Sequence[int] | None, num_transmamba_layers: int,
                      seq_length: int) -> tuple[int, ...]:
    """One TransPoint per TransMamba layer, in the order the layers appear in the model.

    Args:
        schedule: one of ``SCHEDULES``: ``fixed`` (``values`` = [p] for every layer),
            ``list`` (one value per TransMamba layer), ``cyclic`` (layer i gets
            values[i % len(values)]), ``transformer`` (p = T), ``mamba`` (p = 0) or a paper
            preset ``v1``..``v9`` (scaled from T = 8192 to ``seq_length``, cyclic).
        values: absolute token positions in [0, seq_length] (not used by presets,
            ``transformer`` and ``mamba``).
        num_transmamba_layers: how many ``T`` layers the whole model has.
        seq_length: the training sequence length T.

    Raises:
        ValueError naming ``transpoint_schedule`` / ``transpoint_values`` and the rule broken.
    """
    name = schedule.lower() if isinstance(schedule, str) else schedule
    if name not in SCHEDULES:
        raise ValueError(f"transpoint_schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1 to place TransPoints")
    takes_values = name in ("fixed", "list", "cyclic")
    if takes_values and not values:
        raise ValueError(f"transpoint_values: schedule {name!r} needs a non-empty list of token positions")
    if not takes_values and values:
        raise ValueError(f"transpoint_values={list(values)!r}: schedule {name!r} takes no values "
                         "(use 'list', 'cyclic' or 'fixed' for explicit positions)")
    if takes_values:
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"transpoint_values: {v!r} is not an integer token position")
            if not 0 <= v <= seq_length:
                raise ValueError(f"transpoint_values: {v} is outside [0, seq_length={seq_length}]")

    n = num_transmamba_layers
    if name == "transformer":
        return (seq_length,) * n
    if name == "mamba":
        return (0,) * n
    if name == "fixed":
        if len(values) != 1:
            raise ValueError(f"transpoint_values: schedule 'fixed' takes exactly one value, got {len(values)}")
        return (int(values[0]),) * n
    if name == "list":
        if len(values) != n:
            raise ValueError(f"transpoint_values has {len(values)} entries but the model has {n} "
                             "TransMamba ('T') layers; schedule 'list' needs one value per layer "
                             "(use 'cyclic' to repeat a shorter list)")
        return tuple(int(v) for v in values)
    cycle = tuple(int(v) for v in values) if name == "cyclic" else scale_to_length(PAPER_PRESETS[name], seq_length)
    return tuple(cycle[i % len(cycle)] for i in range(n))
