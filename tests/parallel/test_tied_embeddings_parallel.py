"""A tied embedding and LM head (``model.share_embeddings_and_output_weights``) under pipeline
and tensor parallelism, against one process (gloo, CPU, float32).

The tiny model of ``data_parallel_common.py`` with tied weights trains 5 steps on one process
(the reference) and, in one 2-process launch (``tied_embeddings_worker.py``), at PP = 2 (the
last stage holds a copy of the embedding), interleaved PP = 2 (the copy is on rank 1's second
chunk) and TP = 2 (embedding and LM head share one [V/2, d] shard). Losses and gradient norms
must repeat the reference within 1e-5; after training the first stage's embedding and the last
stage's copy must be bitwise equal (finalize_model_grads all-reduces their gradients over the
embedding group, so both take the same Adam steps). The PP = 2 run's checkpoint of step 3
stores the tied matrix once and resumes at PP = 1 with the reference's losses of steps 4 and
5; it also exports to Hugging Face (self-verified logits).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import torchrun_batch  # noqa: E402
from data_parallel_common import MODEL, TIED, run_config  # noqa: E402
from test_data_parallel import losses  # noqa: E402

WORKER = Path(__file__).with_name("tied_embeddings_worker.py")
TOL = 1e-5

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)"
)


@pytest.fixture(scope="module")
def reference(one_process_run):
    return one_process_run("data_parallel_tied")


LAUNCH = torchrun_batch.job(2, WORKER, "{out}")


@pytest.fixture(scope="module")
def launched(torchrun_jobs):
    run = torchrun_jobs(LAUNCH)
    for layout in ("TP=1 x PP=2 x DP=1", "TP=1 x PP=2 (virtual 2) x DP=1", "TP=2 x PP=1 x DP=1"):
        assert f"layout {layout} = 2 ranks" in run.stdout
    return run.out_dir, run.ranks()


def test_tied_reference_counts_the_matrix_once(reference):
    from megatron_transmamba import flops
    from megatron_transmamba.config import TransMambaConfig

    vocab = 320                               # the byte tokenizer's 257, padded to a multiple of 64
    tied = TransMambaConfig(**MODEL, **TIED)
    untied = TransMambaConfig(**MODEL)
    assert reference["parameters"] == flops.count_parameters(tied, vocab) \
        == flops.count_parameters(untied, vocab) - vocab * MODEL["hidden_size"]


@pytest.mark.parametrize("case", ["pp2", "pp2_interleaved", "tp2"])
def test_tied_layouts_match_single_process(reference, launched, case):
    out_dir, ranks = launched
    for rank, runs in enumerate(ranks):
        run = runs[case]
        layout = run["layout"]
        assert (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"],
                layout["data_parallel_size"]) == ((2, 1, 1) if case == "tp2" else (1, 2, 1))
        assert run["parameters"] == reference["parameters"], (rank, case)
        assert losses(run["losses"]) == pytest.approx(reference["losses"], abs=TOL), (rank, case)
        assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=TOL), (rank, case)


def test_tp2_embedding_and_lm_head_share_one_shard(launched):
    _, ranks = launched
    for runs in ranks:
        [chunk] = runs["tp2"]["chunks"]
        assert chunk["pre_process"] and chunk["post_process"]
        assert not chunk["own_output_weight"]              # the head multiplies by the embedding
        assert chunk["tied_shape"] == [320 // 2, MODEL["hidden_size"]]


@pytest.mark.parametrize("case, holders", [
    ("pp2", {0: [0], 1: [0]}),                             # rank: chunks holding the matrix
    ("pp2_interleaved", {0: [0], 1: [1]}),
])
def test_first_stage_embedding_and_last_stage_copy_stay_bitwise_equal(launched, case, holders):
    out_dir, ranks = launched
    first, last = ranks[0][case]["chunks"], ranks[1][case]["chunks"]
    assert [i for i, c in enumerate(first) if c["has_tied_weight"]] == holders[0]
    assert [i for i, c in enumerate(last) if c["has_tied_weight"]] == holders[1]
    embedding, copy = first[holders[0][0]], last[holders[1][0]]
    assert embedding["pre_process"] and not embedding["shared"] and embedding["shared_embedding"]
    assert copy["post_process"] and copy["own_output_weight"]
    assert copy["shared"] and copy["shared_embedding"]    # out of the grad norm and the count
    a = torch.load(out_dir / f"{case}_rank0.pt")
    b = torch.load(out_dir / f"{case}_rank1.pt")
    a_key, b_key = f"chunk{holders[0][0]}", f"chunk{holders[1][0]}"
    assert torch.equal(a[a_key + "_initial"], b[b_key + "_initial"])      # copied at build
    assert torch.equal(a[a_key], b[b_key])                                # and after 5 steps
    assert not torch.equal(a[a_key], a[a_key + "_initial"])               # that did train it


def test_pp2_checkpoint_stores_the_matrix_once_and_resumes_at_pp1(reference, launched, tmp_path):
    from megatron_transmamba.training import checkpoint as ckpt
    from megatron_transmamba.training.pretrain import pretrain

    out_dir, ranks = launched
    assert ranks[0]["pp2"]["saved"] == ["iter_0000003", "iter_0000005"]
    save = tmp_path / "ckpt"
    shutil.copytree(out_dir / "ckpt_pp2", save)
    shutil.rmtree(save / "iter_0000005")
    shapes = ckpt.tensor_metadata(str(save / "iter_0000003"))
    assert shapes["embedding.word_embeddings.weight"][0] == (320, MODEL["hidden_size"])
    assert not [key for key in shapes if "output_layer" in key]
    result = pretrain(run_config(tmp_path, save=str(save), resume=True, model=TIED))
    assert result.resumed_from.endswith("iter_0000003") and result.layout["world_size"] == 1
    assert [result.train_losses[s] for s in (4, 5)] == pytest.approx(reference["losses"][3:],
                                                                     abs=TOL)


def test_pp2_tied_checkpoint_exports_to_hugging_face(launched, tmp_path):
    from megatron_transmamba.hf import export as E

    out_dir, _ = launched
    summary = E.export_checkpoint(str(out_dir / "ckpt_pp2"), str(tmp_path / "hf"), tolerance=1e-4)
    assert summary["step"] == 5 and summary["max_abs_logit_diff"] <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in E.read_safetensors(str(tmp_path / "hf"))


def _saved_optimizer_gaps(tmp_path, name, ddp, optimizer, scheduler, model, groups) -> dict:
    """Save a checkpoint; {parameter key: max |saved - live|} of its Adam moments."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_transmamba.training import checkpoint as ckpt

    folder = ckpt.Checkpointer(str(tmp_path / name), groups, {"world_size": 1}, {}, 32,
                               log=lambda text: None).save(1, 8, [model], optimizer, scheduler)
    stored = dist_checkpointing.load_tensors_metadata(folder)
    saved = dist_checkpointing.load(
        {k: v for k, v in stored.items() if k.startswith("optimizer.state.exp_avg.")}, folder)
    [inner] = ckpt._optimizers(optimizer)
    gaps = {}
    for value in model.sharded_state_dict().values():
        if isinstance(value, ShardedTensor) and isinstance(value.data, torch.nn.Parameter):
            live = inner._get_main_param_and_optimizer_states(value.data)["exp_avg"]
            gaps[value.key] = (saved[f"optimizer.state.exp_avg.{value.key}"].flatten()
                               - live).abs().max().item()
    return gaps


def test_checkpoint_keeps_the_optimizer_state_of_every_ddp_bucket(tmp_path):
    """The checkpoint fix the tied PP = 2 run needed (its embedding has a DDP bucket of its
    own): megatron-core 0.16's fully_reshardable distributed-optimizer state cuts every
    parameter after the first bucket at the wrong offset (its gathered tensors drop the padding
    between buckets). One process, the untied model in buckets of ~4k parameters: with the
    ``megatron_adapter`` patch ``fully_reshardable_bucket_padding`` every saved Adam moment is
    the live one; without it (megatron-core as is) later buckets' are not. When the second half
    fails, megatron-core has fixed its slicing and the patch can go."""
    from functools import partial

    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_transmamba import megatron_adapter
    from megatron_transmamba.config import TransMambaConfig
    from megatron_transmamba.models.language_model import TransMambaLanguageModel
    from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed
    from megatron_transmamba.training.config import TrainingConfig
    from megatron_transmamba.training.pretrain import build_optimizer, lm_forward_step

    info = initialize_distributed(seed=3)
    try:
        config = TransMambaConfig(**MODEL, use_cpu_initialization=True)
        model = TransMambaLanguageModel(config, 64, pg_collection=info.process_groups)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True,
            bucket_size=4000), module=model)
        assert len(ddp.buffers[0].buckets) > 3
        config.finalize_model_grads_func = finalize_model_grads
        training = TrainingConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=0, train_iters=2)
        optimizer, scheduler = build_optimizer(ddp, training, False, torch.float32, True)
        tokens = torch.randint(0, 64, (2, 33))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                 "loss_mask": torch.ones(2, 32)}
        get_forward_backward_func()(
            forward_step_func=partial(lm_forward_step, device=torch.device("cpu")),
            data_iterator=iter([batch]), model=[ddp], num_microbatches=1, seq_length=32,
            micro_batch_size=2, forward_only=False, pg_collection=info.process_groups)
        assert optimizer.step()[0]
        corrected = _saved_optimizer_gaps(tmp_path, "corrected", ddp, optimizer, scheduler, model,
                                          info.process_groups)
        assert max(corrected.values()) == 0.0 and len(corrected) > 10
        with megatron_adapter.suspended("fully_reshardable_bucket_padding"):
            as_is = _saved_optimizer_gaps(tmp_path, "as_is", ddp, optimizer, scheduler, model,
                                          info.process_groups)
        assert max(as_is.values()) > 1e-4
    finally:
        destroy_distributed()
