"""Context parallelism of the ``*`` layer (megatron-core ``TransformerLayer`` from our
``attention_layer_spec``: ``SelfAttentionFusedRope`` + ``SDPAttention``) across real processes
(torchrun, gloo, CPU, float32) against the same layer run on the whole sequence in one process.

Run as a script, this file is the torchrun worker of ONE 4-process launch: for CP = 2 (DP = 2)
and CP = 4 it calls ``initialize_distributed(context_parallel_size=cp)`` and, for each case
(mixer_backend torch: megatron-core's RoPE; triton: the fused RoPE kernel under the Triton
interpreter; multi-head and grouped-query attention), builds the layer on every rank from the
same seed, copies its weights into a reference layer whose CP group is absent, and runs the
reference on the whole sequence [T, B, d] and the CP layer on rank r's rows [r S, (r + 1) S)
with the RoPE table rows of those global positions. It writes to rank<r>.json the errors of
this shard's output rows, of its input gradient and of every parameter gradient (summed over
the CP group), and the layout: CP group size, shard length, how often the CP attention and the
fused RoPE ran. Rank r's input gradient is only right when the later ranks' gradients of its
keys and values come back through the all-gather's backward.
"""
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # torchrun puts this folder, not the repository root, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

import torchrun_batch

WORLD = 4
CP_SIZES = (2, 4)
SEQLEN, BATCH, HIDDEN, HEADS, HEAD_DIM = 24, 2, 32, 4, 8
CASES = [("torch", 4), ("torch", 2), ("triton", 2)]      # (mixer_backend, num_query_groups)
TOL = 2e-6  # float32: max abs error relative to the reference tensor's largest entry
SEED = 4321


def _config(backend: str, query_groups: int, cp: int, **overrides):
    from megatron_transmamba.config import TransMambaConfig

    return TransMambaConfig(**{
        "layer_pattern": "*", "hidden_size": HIDDEN, "ffn_hidden_size": 2 * HIDDEN,
        "num_attention_heads": HEADS, "num_query_groups": query_groups, "kv_channels": HEAD_DIM,
        "seq_length": SEQLEN, "use_cpu_initialization": True, "params_dtype": torch.float32,
        "mixer_backend": backend, "context_parallel_size": cp, **overrides})


def _relative(ref: torch.Tensor, out: torch.Tensor) -> float:
    assert ref.shape == out.shape, (ref.shape, out.shape)
    return ((ref.double() - out.double()).abs().max() / ref.double().abs().max()).item()


def _case(backend: str, query_groups: int, groups, calls: dict) -> dict:
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_transmamba.layers.rotary import rope_table
    from megatron_transmamba.models.specs import attention_layer_spec

    cp_group = groups.cp
    cp, rank = dist.get_world_size(group=cp_group), dist.get_rank(group=cp_group)
    torch.manual_seed(SEED)
    layer = build_module(attention_layer_spec(), config=_config(backend, query_groups, cp),
                         layer_number=1, pg_collection=groups)
    solo = ProcessGroupCollection(tp=groups.tp, pp=groups.pp, cp=None)
    reference = build_module(attention_layer_spec(), config=_config(backend, query_groups, 1),
                             layer_number=1, pg_collection=solo)
    reference.load_state_dict(layer.state_dict())
    attention = layer.self_attention
    if attention.fused_rope is not None:
        fused = attention.fused_rope

        def counted(*args, **kwargs):
            calls["fused_rope"] += 1
            return fused(*args, **kwargs)

        attention.fused_rope = reference.self_attention.fused_rope = counted

    generator = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(SEQLEN, BATCH, HIDDEN, generator=generator)
    weight = torch.randn(SEQLEN, BATCH, HIDDEN, generator=generator)
    table = rope_table(SEQLEN, HEAD_DIM, 10000.0)

    full = hidden.clone().requires_grad_()
    out_ref, _ = reference(full, attention_mask=None, rotary_pos_emb=table)
    (out_ref * weight).sum().backward()

    shard = SEQLEN // cp
    tokens = slice(rank * shard, (rank + 1) * shard)
    local = hidden[tokens].clone().requires_grad_()
    before = dict(calls)
    out, _ = layer(local, attention_mask=None, rotary_pos_emb=table[tokens])
    (out * weight[tokens]).sum().backward()     # the loss is the sum of these over the group

    errors = {"output": _relative(out_ref[tokens], out),
              "d_input": _relative(full.grad[tokens], local.grad)}
    params, ref_params = dict(layer.named_parameters()), dict(reference.named_parameters())
    weight_gap = 0.0
    for name, param in params.items():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=cp_group)
        errors[f"d_{name}"] = _relative(ref_params[name].grad, grad)
        first = param.detach().clone()
        dist.broadcast(first, src=dist.get_global_rank(cp_group, 0), group=cp_group)
        weight_gap = max(weight_gap, (first - param.detach()).abs().max().item())
    layout = {"backend": backend, "query_groups": query_groups,
              "cp_size": attention.core_attention.cp_size, "group_rank": rank,
              "local_seqlen": local.shape[0], "output_shape": list(out.shape),
              "key_value_heads": attention.num_query_groups_per_partition,
              "cp_attention_calls": calls["cp_attention"] - before["cp_attention"],
              "fused_rope_calls": calls["fused_rope"] - before["fused_rope"],
              "weight_gap": weight_gap}
    return {"errors": errors, "layout": layout}


def _refusals(groups) -> dict:
    """Attention dropout, packed documents not cut into this rank's shard and a key/value
    cache under CP must fail in one clear line."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_transmamba.layers.attention import SDPAttention
    from megatron_transmamba.layers.packed_documents import PackedDocuments

    cp = groups.cp.size()
    found = {}
    try:
        SDPAttention(_config("torch", HEADS, cp, attention_dropout=0.1), 1, AttnMaskType.causal,
                     "self", pg_collection=groups)
    except ValueError as error:
        found["dropout"] = str(error)
    core = SDPAttention(_config("torch", HEADS, cp), 1, AttnMaskType.causal, "self",
                        pg_collection=groups)
    q = torch.zeros(SEQLEN // cp, 1, HEADS, HEAD_DIM)
    documents = PackedDocuments.from_cu_seqlens(torch.tensor([0, SEQLEN // cp], dtype=torch.int32),
                                                batch=1, seq_len=SEQLEN // cp)
    try:
        core(q, q, q, None, packed_seq_params=documents)
    except ValueError as error:
        found["packed"] = str(error)
    try:
        core(q[:1], q, q, None)                 # one new query against a key/value cache
    except NotImplementedError as error:
        found["cache"] = str(error)
    return found


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    import megatron_transmamba.layers.attention as attention_module
    from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

    calls = {"cp_attention": 0, "fused_rope": 0}
    plain = attention_module.context_parallel_causal_attention

    def counted(*args, **kwargs):
        calls["cp_attention"] += 1
        return plain(*args, **kwargs)

    attention_module.context_parallel_causal_attention = counted
    report = {"cases": [], "refusals": {}}
    for cp in CP_SIZES:
        info = initialize_distributed(context_parallel_size=cp, seed=SEED, timeout_minutes=1)
        rank = dist.get_rank()
        for backend, query_groups in CASES:
            report["cases"].append(_case(backend, query_groups, info.process_groups, calls))
        report["refusals"][cp] = _refusals(info.process_groups)
        destroy_distributed()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


LAUNCH = torchrun_batch.job(WORLD, __file__, "{out}")


@pytest.fixture(scope="module")
def reports(torchrun_jobs):
    return torchrun_jobs(LAUNCH).ranks()


@pytest.mark.parametrize("cp", CP_SIZES)
@pytest.mark.parametrize("backend, query_groups", CASES)
def test_context_parallel_layer_equals_full_sequence_layer(cp, backend, query_groups, reports):
    seen = 0
    for rank, report in enumerate(reports):
        for case in report["cases"]:
            layout = case["layout"]
            if (layout["cp_size"], layout["backend"], layout["query_groups"]) != (cp, backend,
                                                                                  query_groups):
                continue
            seen += 1
            where = f"CP = {cp}, {backend}, {query_groups} query groups, rank {rank}"
            assert layout["group_rank"] == rank % cp, where
            assert layout["local_seqlen"] == SEQLEN // cp, where
            assert layout["output_shape"] == [SEQLEN // cp, BATCH, HIDDEN], where
            assert layout["key_value_heads"] == query_groups, where
            assert layout["cp_attention_calls"] == 1, where
            assert layout["fused_rope_calls"] == (1 if backend == "triton" else 0), where
            assert layout["weight_gap"] == 0.0, f"{where}: ranks built different weights"
            bad = {k: v for k, v in case["errors"].items() if not v <= TOL}
            assert not bad, f"{where}: relative errors above {TOL}: {bad}"
            assert len(case["errors"]) > 3, where              # parameter gradients were compared
    assert seen == WORLD


def test_context_parallel_refuses_dropout_unsharded_documents_and_a_cache(reports):
    for report in reports:
        for cp in map(str, CP_SIZES):
            refusals = report["refusals"][cp]
            assert "dropout is not supported under context parallelism" in refusals["dropout"]
            assert f"documents of CP rank 0 of 1 given to a CP group of {cp}" in refusals["packed"]
            assert "cache (inference) with context parallelism" in refusals["cache"]


def test_context_parallel_size_without_a_cp_group_is_refused():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_transmamba.layers.attention import SDPAttention

    with pytest.raises(ValueError, match="context_parallel_size=2 but the CP group has 1 rank"):
        SDPAttention(_config("torch", HEADS, 2), 1, AttnMaskType.causal, "self")


@pytest.mark.parametrize("p", [0, 1, 17, SEQLEN])
def test_one_process_is_causal_attention_over_the_first_p_tokens(p):
    from megatron_transmamba.parallel.context_parallel_attention import (
        context_parallel_causal_attention)

    generator = torch.Generator().manual_seed(SEED)
    q = torch.randn(BATCH, SEQLEN, HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(BATCH, SEQLEN, 2, HEAD_DIM, generator=generator, dtype=torch.float64)
            for _ in range(2))
    out = context_parallel_causal_attention(q, k, v, p, 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t[:, :p].transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=0.3,
        enable_gqa=True).transpose(1, 2)
    assert out.shape == (BATCH, p, HEADS, HEAD_DIM)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
