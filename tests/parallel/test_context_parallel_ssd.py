"""Context-parallel SSD across real processes (torchrun, gloo, CPU, float64) against the
single-process full-sequence ``chunk_ssd_naive``, forward and backward.

Run as a script, this file is the worker of one 4-process launch: every rank builds the same
full inputs (T = 64, G < H), runs the full-sequence reference, then ``context_parallel_ssd`` on
its own shard with the loss summed over its CP group, CP = 4 (all ranks) and CP = 2 (groups
{0, 1} and {2, 3}: one does not start at global rank 0), and writes its errors to rank<r>.json.
Rank 0's dx only matches when the later ranks' gradients of its final state come back through
the autograd all-gather, so the comparison covers the cross-rank backward.
"""
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # torchrun puts this folder, not the repository root, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

import torchrun_batch
from transmamba_kernels.ssd import chunk_ssd_naive
from megatron_transmamba.parallel.context_parallel_ssd import context_parallel_ssd

BATCH, SEQLEN, HEADS, GROUPS, HEAD_DIM, STATE_DIM, CHUNK = 2, 64, 4, 2, 3, 5, 16
WORLD = 4
TOL = 1e-10
NAMES = ["x", "dt", "A", "B", "C", "D"]


def _inputs():
    generator = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    x = randn(BATCH, SEQLEN, HEADS, HEAD_DIM)
    dt = rand(BATCH, SEQLEN, HEADS) * 0.5 + 0.05  # processed, positive
    A = -rand(HEADS) * 2 - 0.1
    B = randn(BATCH, SEQLEN, GROUPS, STATE_DIM)
    C = randn(BATCH, SEQLEN, GROUPS, STATE_DIM)
    D = randn(HEADS)
    weight = randn(BATCH, SEQLEN, HEADS, HEAD_DIM)
    return [x, dt, A, B, C, D], weight


def _errors(dist, cp_group, inputs, weight, full) -> tuple[dict, dict]:
    """This rank's errors against the full scan when ``cp_group`` holds the whole sequence."""
    cp_size, cp_rank = dist.get_world_size(group=cp_group), dist.get_rank(group=cp_group)
    length = SEQLEN // cp_size
    tokens = slice(cp_rank * length, (cp_rank + 1) * length)
    sharded = {0, 1, 3, 4}  # x, dt, B, C carry T; A and D are replicated
    local = [(t[:, tokens] if i in sharded else t).clone().requires_grad_() for i, t in enumerate(inputs)]
    y = context_parallel_ssd(*local[:5], CHUNK, D=local[5], cp_group=cp_group)
    (y * weight[:, tokens]).sum().backward()  # the loss is the sum of these over the group
    errors = {"y": (y - full["y"][:, tokens]).abs().max().item()}
    for i, (name, mine, ref) in enumerate(zip(NAMES, local, full["leaves"])):
        grad = mine.grad.clone()
        if i in sharded:
            ref_grad = ref.grad[:, tokens]
        else:
            dist.all_reduce(grad, group=cp_group)
            ref_grad = ref.grad
        errors[f"d{name}"] = (grad - ref_grad).abs().max().item()
    return errors, {"local_seqlen": local[0].shape[1], "grad_norm_dx": local[0].grad.norm().item()}


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    cp_group = dist.new_group(list(range(world)))
    inputs, weight = _inputs()

    leaves = [t.clone().requires_grad_() for t in inputs]
    y_ref = chunk_ssd_naive(*leaves[:5], CHUNK, D=leaves[5])
    (y_ref * weight).sum().backward()
    full = {"y": y_ref, "leaves": leaves}

    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]   # every rank creates both
    result = {}
    for cp, group in ((4, cp_group), (2, halves[rank // 2])):
        errors, local = _errors(dist, group, inputs, weight, full)
        result[f"cp{cp}"] = {"errors": errors, "layout": {
            "world": world, "cp_size": dist.get_world_size(group=group), **local}}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


LAUNCH = torchrun_batch.job(WORLD, __file__, "{out}")


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_equals_full_scan(cp, torchrun_jobs):
    out_dir = torchrun_jobs(LAUNCH).out_dir
    for rank in range(WORLD):
        report = json.loads((out_dir / f"rank{rank}.json").read_text())[f"cp{cp}"]
        layout = report["layout"]
        assert (layout["world"], layout["cp_size"], layout["local_seqlen"]) == \
            (WORLD, cp, SEQLEN // cp)
        assert layout["grad_norm_dx"] > 0
        bad = {k: v for k, v in report["errors"].items() if not v <= TOL}
        assert not bad, f"CP = {cp}, rank {rank}: max abs errors above {TOL}: {bad}"


def test_no_group_is_the_plain_scan():
    inputs, _ = _inputs()
    x, dt, A, B, C, D = inputs
    y = context_parallel_ssd(x, dt, A, B, C, CHUNK, D=D)
    assert torch.equal(y, chunk_ssd_naive(x, dt, A, B, C, CHUNK, D=D))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
