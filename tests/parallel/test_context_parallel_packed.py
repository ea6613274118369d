"""Packed documents under context parallelism (torchrun, gloo, CPU) against one process.

Run as a script, this file is the torchrun worker of ONE 4-process launch: first every rank
computes the references in one process (CP = 1): the torch-backend TransMamba mixer in float64
and a ``T-*-T-M-`` language model in float64, both on the whole [B, T] = [2, 64] micro-batch
of packed documents (``ROWS``). Then CP = 4 (shards of 16), CP = 2 x DP = 2 (shards of 32,
CP groups {0, 1}, {2, 3}) and, for the mixer, TP = 2 x CP = 2 with sequence parallelism run the
same weights on each rank's shard, given the whole ``cu_seqlens``. The documents cross
shards: two start exactly on the CP = 4 boundaries 16 and 32 (the CP = 2 boundary), one of 45
tokens spans three CP = 4 shards and crosses the CP = 2 boundary, two straddle 48 with 1 and 2
tokens before it (the conv halo is partly in another document). TransPoints 0, 3, 7, 20 and 64 put tokens before and after every document's
TransPoint on either side of the boundaries (p = 20 in the 45-token document: its prefix spans
two CP = 4 shards). Each rank compares its output rows (the model: per-token losses), its input
gradient and every parameter gradient summed over its CP group with the reference: the torch
backend in float64, the triton backend in float32 under the Triton interpreter; it also logs
the collectives it issues, which must be the same on every rank. Measured, relative to the
reference's largest entry: float64 tensors below 2e-15; the float32 parameters' (A_log, D,
dt_bias) gradients below 2e-7; the triton mixer (float32) below 5e-7.
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
from test_context_parallel_mixer import TOL, _CollectiveLog, _grad, _local, _max_rel

WORLD = 4
T, HIDDEN, H, G, P, N, W, CHUNK, VOCAB = 64, 32, 4, 2, 8, 16, 4, 16, 64
ROWS = [[5, 11, 16, 15, 2, 15], [1, 45, 4, 14]]
TRANSPOINTS = [0, 3, 7, 20, T]
MODEL_TRANSPOINTS = [7, 20]           # the two T layers of the T-*-T-M- model
# (name, tensor parallel size, context parallel size, sequence parallel)
LAYOUTS = [("cp4", 1, 4, False), ("cp2_dp2", 1, 2, False), ("tp2_cp2_sp", 2, 2, True)]


def cases(layout: str) -> list:
    """(kind, backend, p, recompute): the mixer at every TransPoint (torch), one on the
    triton backend (about 7 s under the interpreter), the mixer with selective recomputation
    and the language model (its TransPoints are MODEL_TRANSPOINTS; p is None)."""
    if layout == "tp2_cp2_sp":
        return [("mixer", "torch", p, False) for p in (7, 20)]
    out = [("mixer", "torch", p, False) for p in TRANSPOINTS]
    if layout == "cp4":      # p = 20: a continuing document's TransPoint inside a later shard
        out += [("mixer", "triton", 20, False), ("mixer", "torch", 20, True)]
    return out + [("model", "torch", None, False)]


def cu_seqlens() -> torch.Tensor:
    lengths = [n for row in ROWS for n in row]
    assert all(sum(row) == T for row in ROWS)
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def _mixer_config(backend: str, recompute: bool = False, tp: int = 1, sp: bool = False):
    from megatron_transmamba.config import TransMambaConfig

    extra = dict(recompute_granularity="selective", recompute_modules=["core_attn"]) \
        if recompute else {}
    return TransMambaConfig(
        hidden_size=HIDDEN, num_attention_heads=4, layer_pattern="T", seq_length=T,
        transpoint_schedule="mamba", mamba_num_heads=H, mamba_head_dim=P, mamba_num_groups=G,
        mamba_state_dim=N, mamba_conv_kernel=W, ssd_chunk_size=CHUNK, mixer_backend=backend,
        params_dtype=torch.float64 if backend == "torch" else torch.float32,
        mixer_position_embedding="rope", use_cpu_initialization=True,
        tensor_model_parallel_size=tp, sequence_parallel=sp, **extra)


def _model_config(backend: str, cp: int):
    from megatron_transmamba.config import TransMambaConfig

    return TransMambaConfig(
        hidden_size=HIDDEN, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
        kv_channels=8, mamba_num_heads=H, mamba_num_groups=G, mamba_head_dim=P,
        mamba_state_dim=8, seq_length=T, ssd_chunk_size=CHUNK, use_cpu_initialization=True,
        params_dtype=torch.float64 if backend == "torch" else torch.float32,
        mixer_backend=backend, layer_pattern="T-*-T-M-", transpoint_schedule="list",
        transpoint_values=MODEL_TRANSPOINTS, mixer_position_embedding="rope",
        context_parallel_size=cp)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return {"hidden": torch.randn(T, len(ROWS), HIDDEN, generator=generator).double(),
            "weight": torch.randn(T, len(ROWS), HIDDEN, generator=generator).double(),
            "tokens": torch.randint(0, VOCAB, (len(ROWS), T), generator=generator),
            "labels": torch.randint(0, VOCAB, (len(ROWS), T), generator=generator),
            "loss_weight": torch.rand(len(ROWS), T, generator=generator, dtype=torch.float64)}


def _mixer_reference(p: int, tp_group, data: dict) -> dict:
    from megatron_transmamba.layers.packed_documents import PackedDocuments
    from megatron_transmamba.layers.rotary import rope_table
    from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

    torch.manual_seed(0)
    mixer = TransMambaMixer(_mixer_config("torch"), transpoint=p, tp_group=tp_group)
    with torch.no_grad():   # every parameter non-trivial, float32 values
        mixer.norm_weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-1, 1)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
        for param in mixer.parameters():
            param.copy_(param.float())
    documents = PackedDocuments.from_cu_seqlens(cu_seqlens(), len(ROWS), T)
    leaf = data["hidden"].clone().requires_grad_()
    out, _ = mixer(leaf, rotary_pos_emb=rope_table(T, N, 10000.0), packed_seq_params=documents)
    (out * data["weight"]).sum().backward()
    return {"params": {n: q.detach().clone() for n, q in mixer.named_parameters()},
            "grads": {n: _grad(q) for n, q in mixer.named_parameters()},
            "out": out.detach(), "dinput": leaf.grad}


def _model_reference(groups, data: dict) -> dict:
    from megatron_transmamba.models.language_model import TransMambaLanguageModel

    model = TransMambaLanguageModel(_model_config("torch", 1), VOCAB, pg_collection=groups,
                                    init_seed=5)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.float())
    loss = model(data["tokens"], labels=data["labels"], cu_seqlens=cu_seqlens())   # [B, T]
    (loss * data["loss_weight"]).sum().backward()
    return {"params": {n: q.detach().clone() for n, q in model.named_parameters()},
            "grads": {n: _grad(q) for n, q in model.named_parameters()},
            "out": loss.detach()}


def _run_mixer(ref: dict, backend: str, p: int, recompute: bool, groups, data: dict):
    from megatron_transmamba.layers.rotary import rope_table
    from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

    cp_group, tp_group = groups.cp, groups.tp
    tp = tp_group.size()
    config = _mixer_config(backend, recompute, tp, sp=tp > 1)
    mixer = TransMambaMixer(config, transpoint=p, tp_group=tp_group, cp_group=cp_group)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            param.copy_(_local(name, ref["params"][name], tp_group.rank(), tp))
    documents = _documents(cp_group)
    rows = _rows(cp_group, tp_group)             # sequence parallel: this TP rank's part
    leaf = data["hidden"][rows].to(config.params_dtype).requires_grad_()
    out, _ = mixer(leaf, rotary_pos_emb=rope_table(T, N, 10000.0), packed_seq_params=documents)
    (out * data["weight"][rows].to(out.dtype)).sum().backward()
    errors = {"out": _max_rel(out.detach(), ref["out"][rows]),
              "dinput": _max_rel(leaf.grad, ref["dinput"][rows])}
    return out, errors, mixer


def _run_model(ref: dict, backend: str, groups, data: dict):
    from megatron_transmamba.models.language_model import TransMambaLanguageModel

    cp_group = groups.cp
    config = _model_config(backend, cp_group.size())
    model = TransMambaLanguageModel(config, VOCAB, pg_collection=groups, init_seed=5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(ref["params"][name])
    rows = _rows(cp_group)
    loss = model(data["tokens"][:, rows], labels=data["labels"][:, rows],
                 cu_seqlens=cu_seqlens())                                     # [B, S]
    (loss * data["loss_weight"][:, rows].to(loss.dtype)).sum().backward()
    return loss, {"out": _max_rel(loss.detach(), ref["out"][:, rows])}, model


def _rows(cp_group, tp_group=None) -> slice:
    shard = T // cp_group.size()
    parts = 1 if tp_group is None else tp_group.size()
    start = cp_group.rank() * shard + (0 if tp_group is None else tp_group.rank()) * shard // parts
    return slice(start, start + shard // parts)


def _documents(cp_group):
    from megatron_transmamba.layers.packed_documents import PackedDocuments

    return PackedDocuments.from_cu_seqlens(cu_seqlens(), len(ROWS), T).shard(
        cp_group.rank(), cp_group.size())


def _run_case(references: dict, case: tuple, groups, data: dict) -> dict:
    import torch.distributed as dist

    kind, backend, p, recompute = case
    ref = references[(kind, p)]
    log = _CollectiveLog()
    try:
        if kind == "mixer":
            out, errors, module = _run_mixer(ref, backend, p, recompute, groups, data)
        else:
            out, errors, module = _run_model(ref, backend, groups, data)
    finally:
        log.close()
    dtypes = {name: str(out.dtype).removeprefix("torch.") for name in errors}
    tp_rank, tp = groups.tp.rank(), groups.tp.size()
    for name, param in module.named_parameters():
        grad = _grad(param)
        dist.all_reduce(grad, group=groups.cp)
        want = ref["grads"][name] if kind == "model" else _local(name, ref["grads"][name],
                                                                 tp_rank, tp)
        errors[f"d{name}"] = _max_rel(grad, want)
        dtypes[f"d{name}"] = str(grad.dtype).removeprefix("torch.")
    return {"case": list(case), "errors": errors, "dtypes": dtypes, "collectives": log.calls,
            "layout": {"tp": tp, "cp": groups.cp.size(), "cp_rank": groups.cp.rank(),
                       "heads": getattr(module, "heads", None),
                       "rows": [_rows(groups.cp, groups.tp).start,
                                _rows(groups.cp, groups.tp).stop]}}


def _worker(out_dir: Path) -> None:
    from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

    data = _inputs()
    info = initialize_distributed(timeout_minutes=1)
    references = {("mixer", p): _mixer_reference(p, info.process_groups.tp, data)
                  for p in TRANSPOINTS}
    references["model", None] = _model_reference(info.process_groups, data)
    destroy_distributed()
    report = {}
    for name, tp, cp, _ in LAYOUTS:
        info = initialize_distributed(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                      timeout_minutes=1)
        report[name] = [_run_case(references, case, info.process_groups, data)
                        for case in cases(name)]
        destroy_distributed()
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


LAUNCH = torchrun_batch.job(WORLD, __file__, "{out}")


@pytest.fixture(scope="module")
def reports(torchrun_jobs):
    return torchrun_jobs(LAUNCH).ranks()


@pytest.mark.parametrize("layout, tp, cp, sp", LAYOUTS)
def test_packed_documents_under_context_parallelism_equal_one_process(reports, layout, tp, cp,
                                                                      sp):
    rows = T // cp // tp
    for rank, report in enumerate(reports):
        results = report[layout]
        assert [tuple(r["case"]) for r in results] == cases(layout)
        for result in results:
            where = f"{layout}, rank {rank}, case {result['case']}"
            got = result["layout"]
            cp_rank = (rank // tp) % cp                 # megatron's rank order is tp-cp-dp
            assert (got["tp"], got["cp"], got["cp_rank"]) == (tp, cp, cp_rank), where
            first = cp_rank * T // cp + (rank % tp) * rows
            assert got["rows"] == [first, first + rows], where
            if result["case"][0] == "mixer":
                assert got["heads"] == H // tp, where
            bad = {k: (v, result["dtypes"][k]) for k, v in result["errors"].items()
                   if not v <= TOL[result["dtypes"][k]]}
            assert not bad, f"{where}: errors relative to the reference's max: {bad}"
            assert len(result["errors"]) > 3, where        # parameter gradients were compared


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_every_rank_issues_the_same_collectives(reports, layout):
    """Ranks hold different documents (some without prefix or SSM tokens); the collectives,
    forward and backward, depend only on the whole micro-batch."""
    for index, result in enumerate(reports[0][layout]):
        calls = result["collectives"]
        assert calls, result["case"]
        for rank in range(1, WORLD):
            other = reports[rank][layout][index]["collectives"]
            assert other == calls, f"{layout}: rank {rank} vs rank 0, case {result['case']}"


def test_shard_of_documents():
    """``PackedDocuments.shard``: local pieces, positions that continue across shards, the
    whole documents kept."""
    from megatron_transmamba.layers.packed_documents import PackedDocuments

    whole = PackedDocuments.from_cu_seqlens(cu_seqlens(), len(ROWS), T)
    shard = whole.shard(1, 4)                                   # columns 16..31
    assert shard.spans == ((0, 0, 16), (1, 0, 16))
    assert shard.offsets == (0, 15) and shard.max_offset == 15
    assert shard.position_ids[1].tolist() == list(range(15, 31))
    assert shard.seq_idx[0].tolist() == [2] * 16 and shard.seq_idx[1].tolist() == [7] * 16
    assert shard.cu_seqlens.tolist() == [0, 16, 32]
    assert shard.whole is whole and shard.max_length == 45
    last = whole.shard(3, 4)                                    # columns 48..63
    assert last.spans == ((0, 0, 1), (0, 1, 16), (1, 0, 2), (1, 2, 16))
    assert last.offsets == (1, 0, 2, 0)
    assert whole.shard(0, 1) is whole
    with pytest.raises(ValueError, match="continue on other ranks"):
        shard.buckets(7)


@pytest.mark.parametrize("limit", [None, 3, 20])
def test_one_process_is_document_attention(limit):
    """With one rank the CP document attention is ``document_attention`` (GQA, float64)."""
    import torch.nn.functional as F

    from megatron_transmamba.layers.packed_documents import PackedDocuments, document_attention
    from megatron_transmamba.parallel.context_parallel_documents import (
        context_parallel_document_attention)

    documents = PackedDocuments.from_cu_seqlens(cu_seqlens(), len(ROWS), T)
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(len(ROWS), T, 4, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(len(ROWS), T, 2, 8, generator=generator, dtype=torch.float64)
            for _ in range(2))

    def attend(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                              is_causal=True, scale=0.3,
                                              enable_gqa=True).transpose(1, 2)

    want = document_attention(q, k, v, documents, attend, limit=limit)
    got = context_parallel_document_attention(q, k, v, documents, 0.3, limit=limit)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
