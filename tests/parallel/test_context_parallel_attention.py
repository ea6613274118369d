"""Context-parallel attention prefix across real processes (torchrun, gloo, CPU, float64) against
the single-process ``prefix_attention``, forward and backward.

Run as a script, this file is the torchrun worker of ONE 4-process launch: the whole world is a
CP = 4 group and ranks {0, 1}, {2, 3} form two CP = 2 groups. For each CP size and TransPoint
p in {0, 5, S (a shard boundary), 3 S / 2 (inside a later shard), T}, every rank builds the same
full inputs (RoPE on, G < H), runs the full-sequence reference, then
``context_parallel_prefix_attention`` on its shard with the loss summed over the group, and
writes its errors and layout to rank<r>.json. A rank's dB and dx only match when the later
ranks' gradients of its keys and values come back through the all-gather's backward.
"""
import json
import sys
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # torchrun puts this folder, not the repository root, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

from megatron_transmamba.layers.mixer_core import prefix_attention
from megatron_transmamba.layers.rotary import apply_rope, rope_table
from megatron_transmamba.parallel.context_parallel_attention import context_parallel_prefix_attention

import torchrun_batch

BATCH, SEQLEN, HEADS, GROUPS, HEAD_DIM, STATE_DIM = 2, 32, 4, 2, 3, 4
SCALE = STATE_DIM ** -0.5
WORLD = 4
CP_SIZES = (2, 4)
TOL = 1e-10
NAMES = ["x", "B", "C"]


def transpoints(cp: int) -> list:
    shard = SEQLEN // cp
    return [0, 5, shard, 3 * shard // 2, SEQLEN]


def _inputs():
    generator = torch.Generator().manual_seed(4321)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = randn(BATCH, SEQLEN, HEADS, HEAD_DIM)
    B = randn(BATCH, SEQLEN, GROUPS, STATE_DIM)
    C = randn(BATCH, SEQLEN, GROUPS, STATE_DIM)
    weight = randn(BATCH, SEQLEN, HEADS, HEAD_DIM)
    return [x, B, C], weight, rope_table(SEQLEN, STATE_DIM, 10000.0)


def _case(inputs, weight, table, p, cp_group, group_rank, cp):
    import torch.distributed as dist

    full = [t.clone().requires_grad_() for t in inputs]
    y_ref = prefix_attention(*full, p, SCALE, partial(apply_rope, table=table))
    (y_ref * weight[:, :p]).sum().backward()

    shard = SEQLEN // cp
    tokens = slice(group_rank * shard, (group_rank + 1) * shard)
    rows = slice(group_rank * shard, min(p, (group_rank + 1) * shard))
    local = [t[:, tokens].clone().requires_grad_() for t in inputs]
    y = context_parallel_prefix_attention(*local, p, SCALE, rope_table=table, cp_group=cp_group)
    (y * weight[:, rows]).sum().backward()  # the loss is the sum of these over the group

    expected_rows = max(0, min(shard, p - group_rank * shard))
    errors = {"y": (y - y_ref[:, rows]).abs().max().item() if y.numel() else 0.0}
    for name, mine, ref in zip(NAMES, local, full):
        grad = torch.zeros_like(mine) if mine.grad is None else mine.grad
        errors[f"d{name}"] = (grad - ref.grad[:, tokens]).abs().max().item()
    # every rank's y_prefix, concatenated in group order, is the whole reference prefix
    lengths = [torch.zeros(1, dtype=torch.long) for _ in range(cp)]
    dist.all_gather(lengths, torch.tensor([y.shape[1]]), group=cp_group)
    layout = {"cp_size": dist.get_world_size(group=cp_group), "group_rank": group_rank,
              "local_seqlen": local[0].shape[1], "shape": list(y.shape),
              "expected_shape": [BATCH, expected_rows, HEADS, HEAD_DIM],
              "rows_over_group": sum(int(n) for n in lengths), "p": p}
    return {"errors": errors, "layout": layout}


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = {4: dist.new_group(list(range(world)))}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups[2] = pairs[rank // 2]
    inputs, weight, table = _inputs()
    report = {"world": world, "cases": []}
    for cp in CP_SIZES:
        group_rank = dist.get_rank(group=groups[cp])
        for p in transpoints(cp):
            report["cases"].append(_case(inputs, weight, table, p, groups[cp], group_rank, cp))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


LAUNCH = torchrun_batch.job(WORLD, __file__, "{out}")


@pytest.fixture(scope="module")
def reports(torchrun_jobs):
    return torchrun_jobs(LAUNCH).ranks()


@pytest.mark.parametrize("cp", CP_SIZES)
def test_context_parallel_equals_full_prefix(cp, reports):
    seen = set()
    for rank, report in enumerate(reports):
        assert report["world"] == WORLD
        for case in report["cases"]:
            layout = case["layout"]
            if layout["cp_size"] != cp:
                continue
            p = layout["p"]
            seen.add(p)
            assert layout["group_rank"] == rank % cp
            assert layout["local_seqlen"] == SEQLEN // cp
            assert layout["shape"] == layout["expected_shape"], (cp, p, rank)
            assert layout["rows_over_group"] == p
            bad = {k: v for k, v in case["errors"].items() if not v <= TOL}
            assert not bad, f"CP = {cp}, p = {p}, rank {rank}: max abs errors above {TOL}: {bad}"
    assert seen == set(transpoints(cp))


def test_no_group_is_the_plain_prefix_attention():
    (x, B, C), _, table = _inputs()
    y = context_parallel_prefix_attention(x, B, C, 11, SCALE, rope_table=table)
    assert torch.equal(y, prefix_attention(x, B, C, 11, SCALE, partial(apply_rope, table=table)))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
