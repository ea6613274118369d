"""The TransMamba mixer under context parallelism (torchrun, gloo, CPU) against the
single-process mixer on the whole sequence, forward and backward, both backends.

Run as a script, this file is the torchrun worker of ONE 4-process launch with three layouts in
turn, CP groups in megatron's rank order: CP = 4; CP = 2 x DP = 2 (CP groups {0, 1}, {2, 3});
TP = 2 x CP = 2 with sequence parallelism (CP groups {0, 2}, {1, 3}). Each rank first runs the
reference, the TP = 1, CP = 1 torch-backend mixer in float64 on the whole sequence (T = 64,
batch 1, H = 4, G = 2, P = 8, N = 16, chunk 16; weights and inputs are float32 values), then
the mixer on its shard with the same weights (torch backend in float64, triton backend in
float32 under the Triton interpreter), and compares its output rows, its input gradient and
every parameter gradient summed over the CP group (cut to its TP components) with the
reference. TransPoints: 0, inside the first shard, on a shard boundary, inside a later shard
and T, with RoPE; others without RoPE and with a dt_limit clamp that binds, and with selective
recompute of the core (``cases``). Every rank logs the collectives it issues (name and size,
forward and backward): they must be the same sequence on all ranks. Last, packed documents
not cut into this rank's shard must raise (packed documents under CP:
test_context_parallel_packed.py). Measured: float64 errors below 2e-15 of the reference's
largest entry, float32 ones (triton, and the float32 dt_bias / A_log / D gradients) below 3e-6.
"""
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # torchrun puts this folder, not the repository root, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if os.environ.get("MTM_TEST_GPU") != "1":
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import torchrun_batch

WORLD = 4
T, BATCH, HIDDEN, H, G, P, N, W, CHUNK = 64, 1, 32, 4, 2, 8, 16, 4, 16
DT_LIMIT = (0.005, 0.05)
# (name, tensor parallel size, context parallel size, sequence parallel)
LAYOUTS = [("cp4", 1, 4, False), ("cp2_dp2", 1, 2, False), ("tp2_cp2_sp", 2, 2, True)]
# largest error relative to the reference's largest entry: float64 tensors, float32 tensors
TOL = {"float64": 1e-12, "float32": 1e-5}
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_gather_into_tensor",
               "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base", "broadcast")


def transpoints(cp: int) -> list:
    shard = T // cp
    return [0, 5, shard, shard + shard // 2 + 1, T]


def cases(layout: str) -> list:
    """(backend, p, rope, dt_limit clamp, recompute) of one layout. The triton backend, slow
    under the interpreter, runs every TransPoint at CP = 4, all but p = 0 at CP = 2 and two
    at TP x CP."""
    cp = dict((name, size) for name, _, size, _ in LAYOUTS)[layout]
    every = transpoints(cp)
    later = every[3]
    out = [("torch", p, True, False, False) for p in every]
    out += [("torch", p, False, True, False) for p in (5, later)]
    triton = {"cp4": every, "cp2_dp2": every[1:], "tp2_cp2_sp": [5, later]}[layout]
    out += [("triton", p, True, False, False) for p in triton]
    if layout == "cp4":
        out += [("torch", later, True, False, True), ("triton", later, False, True, False),
                ("triton", later, True, False, True)]
    return out


def _config(backend: str, rope: bool, clamp: bool, tp: int = 1, sp: bool = False,
            recompute: bool = False):
    from megatron_transmamba.config import TransMambaConfig

    extra = dict(recompute_granularity="selective", recompute_modules=["core_attn"]) \
        if recompute else {}
    return TransMambaConfig(
        hidden_size=HIDDEN, num_attention_heads=4, layer_pattern="T", seq_length=T,
        transpoint_schedule="mamba", mamba_num_heads=H, mamba_head_dim=P, mamba_num_groups=G,
        mamba_state_dim=N, mamba_conv_kernel=W, ssd_chunk_size=CHUNK, mixer_backend=backend,
        params_dtype=torch.float64 if backend == "torch" else torch.float32,
        mixer_position_embedding="rope" if rope else "none",
        dt_limit=DT_LIMIT if clamp else (0.0, float("inf")), use_cpu_initialization=True,
        tensor_model_parallel_size=tp, sequence_parallel=sp, **extra)


def _reference(p: int, rope: bool, clamp: bool, tp_group) -> dict:
    """The TP = 1, CP = 1 torch-backend mixer on the whole sequence in float64: weights and
    inputs (float32 values, so the triton cases run on exactly the same ones), its output and
    gradients."""
    from megatron_transmamba.layers.rotary import rope_table
    from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

    torch.manual_seed(0)
    mixer = TransMambaMixer(_config("torch", rope, clamp), transpoint=p, tp_group=tp_group)
    with torch.no_grad():   # every parameter non-trivial; dt spread so the clamp binds
        mixer.norm_weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-1, 1)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
        mixer.dt_bias.add_(torch.linspace(-1.5, 1.5, H))
        for param in mixer.parameters():
            param.copy_(param.float())
    generator = torch.Generator().manual_seed(1)
    hidden, weight = (torch.randn(T, BATCH, HIDDEN, generator=generator).double()
                      for _ in range(2))
    table = rope_table(T, N, 10000.0)
    leaf = hidden.clone().requires_grad_()
    out, _ = mixer(leaf, rotary_pos_emb=table)
    (out * weight).sum().backward()
    return {"params": {n: q.detach().clone() for n, q in mixer.named_parameters()},
            "grads": {n: _grad(q) for n, q in mixer.named_parameters()},
            "hidden": hidden, "weight": weight, "table": table, "out": out.detach(),
            "dhidden": leaf.grad}


def _grad(param: torch.Tensor) -> torch.Tensor:
    """A copy of the gradient; zeros for None (the SSM parameters at p = T)."""
    return torch.zeros_like(param) if param.grad is None else param.grad.clone()


def _local(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of a full (TP = 1) mixer parameter, written apart from the model."""
    from megatron_transmamba.parallel.tensor_parallel import local_components

    if name == "in_proj.weight":
        return local_components(full, [H * P, H * P, G * N, G * N, H], rank, size)
    if name.startswith("conv1d."):
        return local_components(full, [H * P, G * N, G * N], rank, size)
    if name == "out_proj.weight":
        return full.chunk(size, dim=1)[rank]
    return full.chunk(size, dim=0)[rank]


def _max_rel(mine: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    err = (mine.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


class _CollectiveLog:
    """Records (name, numel) of every collective issued (point-to-point sends excluded: they
    differ by rank by design), by patching torch.distributed's functions."""

    def __init__(self):
        import torch.distributed as dist

        self.calls, self._saved = [], {}
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def logged(first, *args, **kwargs):
            tensors = first if isinstance(first, (list, tuple)) else [first]
            self.calls.append([name, sum(t.numel() for t in tensors)])
            return fn(first, *args, **kwargs)
        return logged

    def close(self):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _cp_group(tp: int, cp: int):
    """This rank's CP group in megatron's rank order (tp-cp-dp: rank = tp_rank + tp (cp_rank +
    cp dp_rank)); every rank creates every group, as new_group requires."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for dp_rank in range(world // (tp * cp)):
        for tp_rank in range(tp):
            ranks = [tp_rank + tp * (c + cp * dp_rank) for c in range(cp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
    return mine


def _run_case(ref: dict, case: tuple, tp_group, cp_group, tp: int, sp: bool) -> dict:
    import torch.distributed as dist

    from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

    backend, p, rope, clamp, recompute = case
    tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    config = _config(backend, rope, clamp, tp=tp, sp=sp, recompute=recompute)
    mixer = TransMambaMixer(config, transpoint=p, tp_group=tp_group, cp_group=cp_group)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            param.copy_(_local(name, ref["params"][name], tp_rank, tp_size))
    shard = T // cp_size
    start = cp_rank * shard + (tp_rank * shard // tp_size if sp else 0)
    rows = slice(start, start + (shard // tp_size if sp else shard))
    dtype = config.params_dtype
    leaf = ref["hidden"][rows].to(dtype).requires_grad_()
    log = _CollectiveLog()
    try:
        out, _ = mixer(leaf, rotary_pos_emb=ref["table"])
        (out * ref["weight"][rows].to(dtype)).sum().backward()   # the loss is the sum over the CP ranks
    finally:
        log.close()
    errors = {"out": _max_rel(out.detach(), ref["out"][rows]),
              "dhidden": _max_rel(leaf.grad, ref["dhidden"][rows])}
    dtypes = {"out": str(out.dtype).removeprefix("torch."), "dhidden": str(leaf.grad.dtype)
              .removeprefix("torch.")}
    for name, param in mixer.named_parameters():
        grad = _grad(param)
        dist.all_reduce(grad, group=cp_group)
        errors[f"d{name}"] = _max_rel(grad, _local(name, ref["grads"][name], tp_rank, tp_size))
        dtypes[f"d{name}"] = str(grad.dtype).removeprefix("torch.")
    return {"case": list(case), "errors": errors, "dtypes": dtypes, "collectives": log.calls,
            "layout": {"tp": tp_size, "cp": cp_size, "cp_rank": cp_rank, "sp": sp,
                       "rows": [rows.start, rows.stop], "heads": mixer.heads,
                       "recompute": mixer.recompute_core}}


def _packed_error(tp_group, cp_group) -> str:
    from megatron_transmamba.layers.packed_documents import PackedDocuments
    from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

    mixer = TransMambaMixer(_config("torch", True, False), transpoint=5, tp_group=tp_group,
                            cp_group=cp_group)
    shard = T // cp_group.size()
    documents = PackedDocuments.from_cu_seqlens(torch.tensor([0, 7, shard, 2 * shard]), 2, shard)
    try:
        mixer(torch.randn(shard, 2, HIDDEN, dtype=torch.float64), packed_seq_params=documents)
    except ValueError as error:
        return str(error)
    return ""


def _worker(out_dir: Path) -> None:
    from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

    report = {"layouts": {}}
    references = {}
    for name, tp, cp, sp in LAYOUTS:
        info = initialize_distributed(tensor_model_parallel_size=tp, timeout_minutes=1)
        tp_group, cp_group = info.process_groups.tp, _cp_group(tp, cp)
        if not references:   # TP = 1 here: the reference mixer is the whole model on one rank
            wanted = {(p, r, c) for layout, *_ in LAYOUTS for _, p, r, c, _ in cases(layout)}
            references = {key: _reference(*key, tp_group) for key in sorted(wanted)}
        results = [_run_case(references[case[1:4]], case, tp_group, cp_group, tp, sp)
                   for case in cases(name)]
        report["layouts"][name] = {"results": results}
        if name == "cp4":
            report["packed_error"] = _packed_error(tp_group, cp_group)
        destroy_distributed()
    rank = int(os.environ["RANK"])
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


LAUNCH = torchrun_batch.job(WORLD, __file__, "{out}")


@pytest.fixture(scope="module")
def reports(torchrun_jobs):
    return torchrun_jobs(LAUNCH).ranks()


@pytest.mark.parametrize("layout, tp, cp, sp", LAYOUTS)
def test_context_parallel_mixer_equals_full_sequence(reports, layout, tp, cp, sp):
    shard = T // cp
    for rank, report in enumerate(reports):
        results = report["layouts"][layout]["results"]
        assert [tuple(r["case"]) for r in results] == cases(layout)
        for result in results:
            where = f"{layout}, rank {rank}, case {result['case']}"
            got = result["layout"]
            assert (got["tp"], got["cp"], got["sp"], got["heads"]) == (tp, cp, sp, H // tp), where
            # megatron's rank order is tp-cp-dp: TP innermost
            assert got["cp_rank"] == (rank // tp) % cp, where
            assert got["rows"][1] - got["rows"][0] == (shard // tp if sp else shard), where
            assert got["recompute"] == result["case"][4], where
            bad = {k: (v, result["dtypes"][k]) for k, v in result["errors"].items()
                   if not v <= TOL[result["dtypes"][k]]}
            assert not bad, f"{where}: errors relative to the reference's max: {bad}"


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_every_rank_issues_the_same_collectives(reports, layout):
    """Forward and backward: the same collectives in the same order with the same sizes on every
    rank (ranks without prefix rows or without SSM rows included)."""
    for index, result in enumerate(reports[0]["layouts"][layout]["results"]):
        calls = result["collectives"]
        assert calls, result["case"]
        for rank, report in enumerate(reports[1:], start=1):
            other = report["layouts"][layout]["results"][index]
            assert other["collectives"] == calls, f"rank {rank} vs rank 0, case {result['case']}"


def test_packed_documents_of_the_whole_sequence_raise(reports):
    for report in reports:
        message = report["packed_error"]
        assert message.startswith("packed documents of 1 context-parallel shard(s) given to a "
                                  "mixer with 4")
        assert "PackedDocuments.shard(cp_rank, cp_size)" in message and "\n" not in message


def test_group_of_one_is_the_plain_mixer(megatron_single_process):
    """A CP group of size 1 runs the mixer's plain path: bitwise the same output and gradients."""
    import torch.distributed as dist

    from megatron_transmamba.layers.rotary import rope_table
    from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

    tp_group = megatron_single_process.process_groups.tp
    results = []
    for cp_group in (None, dist.new_group([0])):
        torch.manual_seed(0)
        mixer = TransMambaMixer(_config("torch", True, False), transpoint=21, tp_group=tp_group,
                                cp_group=cp_group)
        hidden = torch.randn(T, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
        out, _ = mixer(hidden, rotary_pos_emb=rope_table(T, N, 10000.0))
        out.pow(2).sum().backward()
        results.append([out, hidden.grad, *(q.grad for q in mixer.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
