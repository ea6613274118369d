"""Packed documents under tensor and sequence parallelism (gloo, CPU): TP = 2 and TP = 2 + SP
give the TP = 1 logits and gradients of a micro-batch of packed documents (the same
``cu_seqlens`` on every rank; under SP the mixers and attention gather the whole sequence
before they look at the documents). Tolerances as in test_tensor_parallel.py (float32)."""

from pathlib import Path

import pytest
import torch

import torchrun_batch

WORKER = Path(__file__).with_name("packed_documents_worker.py")
LAUNCH = torchrun_batch.job(2, WORKER, "{out}")

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)")


def test_tensor_and_sequence_parallel_packed_documents_match_tp1(torchrun_jobs):
    for results in torchrun_jobs(LAUNCH).ranks():
        assert results["packing_changes_logits"] > 1e-2       # the documents are really apart
        for layout in ("tp2", "tp2_sp"):
            case = results[layout]
            assert case["logits"] < 1e-5, (layout, case)
            assert case["grads"] < 1e-5, (layout, case)
            assert case["replica_gap"] < 1e-6, (layout, case)
