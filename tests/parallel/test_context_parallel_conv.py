"""The context-parallel causal conv (halo exchange) against the single-process conv of the whole
sequence, on 4 real processes (torchrun, gloo, CPU, float64): CP = 4 on all of them and CP = 2
on the subgroups {0, 1} and {2, 3} (so group ranks differ from global ranks), forward and
backward. Run as a script, this file is the worker: each rank checks its shards and writes
rank<r>.json with the layouts it checked."""
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # torchrun puts this folder, not the repository root, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch
import torch.distributed as dist

import torchrun_batch
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive
from megatron_transmamba.parallel.context_parallel_conv import context_parallel_causal_conv1d_silu

BATCH, SEQLEN, CHANNELS, WIDTH = 2, 32, 6, 4
TOL = 1e-12
WORLD = 4


def _inputs():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x, weight, bias = randn(BATCH, SEQLEN, CHANNELS), randn(CHANNELS, 1, WIDTH), randn(CHANNELS)
    return x, weight, bias, randn(BATCH, SEQLEN, CHANNELS)  # the last: d loss / d out


def _grads(fn, x, weight, bias, dout):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out = fn(x, weight, bias)
    out.backward(dout)
    return out.detach(), x.grad, weight.grad, bias.grad


def _check_layout(group, ranks, x, weight, bias, dout, ref):
    """This process's shard of the CP group ``ranks`` against rows of the reference ``ref``."""
    cp, cp_rank = len(ranks), ranks.index(dist.get_rank())
    assert dist.get_world_size(group) == cp and dist.get_rank(group) == cp_rank
    shard_len = SEQLEN // cp
    own = slice(cp_rank * shard_len, (cp_rank + 1) * shard_len)
    out, dx, dweight, dbias = _grads(
        lambda *a: context_parallel_causal_conv1d_silu(*a, cp_group=group),
        x[:, own], weight, bias, dout[:, own],
    )
    assert out.shape == (BATCH, shard_len, CHANNELS)
    for name, got, want in [("out", out, ref[0][:, own]), ("dx", dx, ref[1][:, own])]:
        err = (got - want).abs().max().item()
        assert err <= TOL, f"CP={cp} rank {cp_rank}: {name} max abs error {err}"
    for name, partial, want in [("dweight", dweight, ref[2]), ("dbias", dbias, ref[3])]:
        dist.all_reduce(partial, group=group)
        err = (partial - want).abs().max().item()
        assert err <= TOL, f"CP={cp} rank {cp_rank}: {name} max abs error {err}"
    # the shards' conv alone (no halo) is wrong on every rank but 0: the exchange did the work
    alone = causal_conv1d_silu_naive(x[:, own], weight, bias)
    assert (alone[:, WIDTH - 1:] - out[:, WIDTH - 1:]).abs().max() <= TOL
    assert (cp_rank == 0) == bool((alone[:, : WIDTH - 1] - out[:, : WIDTH - 1]).abs().max() <= TOL)


def _worker(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    try:
        x, weight, bias, dout = _inputs()
        ref = _grads(causal_conv1d_silu_naive, x, weight, bias, dout)
        everyone = list(range(WORLD))
        _check_layout(dist.new_group(everyone), everyone, x, weight, bias, dout, ref)
        pairs = [[0, 1], [2, 3]]
        pair_groups = [dist.new_group(pair) for pair in pairs]  # every rank creates every group
        mine = next(i for i, pair in enumerate(pairs) if rank in pair)
        _check_layout(pair_groups[mine], pairs[mine], x, weight, bias, dout, ref)
        with pytest.raises(ValueError, match=r"S = 2 is shorter than the halo W - 1 = 3"):
            context_parallel_causal_conv1d_silu(x[:, :2], weight, bias, cp_group=pair_groups[mine])
        checked = {"cp4": everyone, "cp2": pairs[mine]}
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(checked))


LAUNCH = torchrun_batch.job(WORLD, __file__, "{out}")


def test_cp2_and_cp4_match_single_process(torchrun_jobs):
    """The checks run in the worker (an error fails the launch); every rank did both layouts."""
    out_dir = torchrun_jobs(LAUNCH).out_dir
    for rank in range(WORLD):
        checked = json.loads((out_dir / f"rank{rank}.json").read_text())
        assert checked == {"cp4": [0, 1, 2, 3], "cp2": [0, 1] if rank < 2 else [2, 3]}


def test_no_group_is_the_plain_conv():
    x, weight, bias, _ = _inputs()
    out = context_parallel_causal_conv1d_silu(x, weight, bias, cp_group=None)
    assert torch.equal(out, causal_conv1d_silu_naive(x, weight, bias))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
