"""Pipeline parallelism: which layers of the pattern each pipeline stage (and virtual stage)
holds, and the model chunks of one rank.

A pattern splits at its ``|`` marks (``T-T-|T-T-*-|T-T-``: one segment per stage, in order) or,
without marks, evenly: stages get ``num_layers // stages`` layers and the first
``num_layers % stages`` one more (the last stage also holds the LM head). With a virtual
pipeline size V (interleaved 1F1B), there are PP x V stages and rank r holds stages
r, r + PP, ..., r + (V - 1) PP, as megatron-core's interleaved schedule expects. Layers keep
their global index (``layer_number``), so TransPoints and checkpoint keys do not depend on
the split. The first stage embeds the tokens, the last holds the final norm, LM head and loss.
"""

from __future__ import annotations

from typing import Optional

STAGE_MARK = "|"


def strip_stage_marks(pattern: str) -> str:
    return pattern.replace(STAGE_MARK, "").replace(" ", "")


def split_layer_pattern(pattern: str, num_stages: int) -> list[range]:
    """The global layer indices of each of ``num_stages`` stages (PP x virtual size).
    Raises ValueError naming the fields when the pattern cannot be split that way."""
    pattern = pattern.replace(" ", "")
    if STAGE_MARK in pattern:
        segments = pattern.split(STAGE_MARK)
        if len(segments) != num_stages or not all(segments):
            raise ValueError(
                f"model.layer_pattern={pattern!r} has {len(segments)} segments between '|' "
                f"marks{' (one is empty)' if not all(segments) else ''}, but the layout has "
                f"{num_stages} pipeline stages (pipeline_model_parallel_size x "
                "virtual_pipeline_model_parallel_size): mark one segment per stage, or no marks "
                "for an even split")
        sizes = [len(segment) for segment in segments]
    else:
        num_layers = len(pattern)
        if num_stages > num_layers:
            raise ValueError(
                f"{num_stages} pipeline stages (pipeline_model_parallel_size x "
                f"virtual_pipeline_model_parallel_size) but model.layer_pattern has only "
                f"{num_layers} layers: every stage needs at least one layer")
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (1 if stage < extra else 0) for stage in range(num_stages)]
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def rank_stages(pipeline_rank: int, pipeline_size: int,
                virtual_size: Optional[int]) -> list[int]:
    """The stages (model chunks) of one pipeline rank, in the order the schedule runs them."""
    return [chunk * pipeline_size + pipeline_rank for chunk in range(virtual_size or 1)]
