"""The launch counter (tools/bench/count_launches.py) and the lean-step budgets it checks.

Budgets (triton backend, bf16 step as GPUs train it, counted on the CPU): a TransMamba layer
forward+backward <= 40 launches at 0 < p < T, ``M`` <= 30, ``*`` <= 24, ``-`` <= 14; the
optimizer step <= 24 whatever the number of parameters; no host sync in forward or backward
and at most one in the whole step (it has none: the step's outcome is read one step late).
Layers are counted as the step calls them, with the residual stream (layers/norm.py). The
tests print the counts."""

import json

import pytest
import torch

from megatron_transmamba.training.config import load_run_config
from megatron_transmamba.training.launch_counter import PHASES, LaunchCounter, count_training_step

pytest.importorskip("triton")

BUDGETS = {"T": 40, "M": 30, "*": 24, "-": 14}


def config(pattern: str, transpoints=None, **training):
    overrides = [f"--model.layer_pattern={json.dumps(pattern)}", "--model.mixer_backend=triton",
                 "--checkpoint.save=null", "--training.eval_interval=0",
                 "--logging.progress_bar=false"]
    if transpoints is not None:
        overrides += ["--model.transpoint_schedule=list",
                      f"--model.transpoint_values={json.dumps(transpoints)}"]
    else:
        overrides.append("--model.transpoint_schedule=mamba")
    overrides += [f"--training.{k}={v}" for k, v in training.items()]
    return load_run_config("examples/configs/tiny_cpu.yaml", overrides)


def test_counter_counts_kernels_not_views_and_sees_host_syncs():
    x = torch.randn(4, 6)
    with LaunchCounter() as counter:
        y = x.t().reshape(24)            # a copy (flattening a transposed tensor): 1
        z = (y + 1).sum()                # 2
        x.view(24).unsqueeze(0)          # views: 0
        torch.empty(3)                   # allocation: 0
        z.item()                         # a host sync, no launch
    assert counter.trace == ["clone", "add", "sum"]
    assert sum(counter.counts.host_syncs.values()) == 1


@pytest.fixture(scope="module")
def lean_step() -> dict:
    """The counts of one lean step with every layer kind and TransPoints 0 < p < T and at the
    ends, shared by the tests below (under the Triton interpreter one count takes minutes)."""
    counts = count_training_step(config("T-T-T-M-*-", [0, 64, 256]))    # T = 256, shrunk to 64
    print({k: v for k, v in counts.items() if k not in ("layers", "ops", "sync_ops")})
    return counts


def test_lean_step_budgets(lean_step):
    """Every layer kind, TransPoints 0 < p < T and at the ends, and the optimizer."""
    counts = lean_step
    for symbol, budget in BUDGETS.items():
        assert counts[symbol]["forward"] + counts[symbol]["backward"] <= budget, (symbol, counts[symbol])
    inside = [r for r in counts["layers"] if r["inside"]]
    assert [r["transpoint"] for r in inside] == [16]          # the budgeted T layer is 0 < p < T
    assert counts["optimizer"] <= 24
    assert counts["host_syncs"] == 0 and counts["host_syncs_step"] <= 1, counts["sync_ops"]
    # the layers are counted as the step calls them (the residual stream: each layer's add is
    # in the next norm's kernel, its gradient added in that kernel's backward); in the step
    # only the first layer's input (the embedding output, its norm's input and the stream)
    # has one more gradient sum
    layers = counts["layers"]
    for symbol in "TM*-":
        alone = [sum(r[phase] for r in layers if r["symbol"] == symbol) for phase in PHASES]
        step = [sum(counts["ops"][f"{symbol}/{phase}"].values()) for phase in PHASES]
        assert step == [alone[0], alone[1] + (layers[0]["symbol"] == symbol)], symbol


def test_optimizer_launches_do_not_grow_with_the_parameters(lean_step):
    small = count_training_step(config("-"))            # one MLP layer
    large = lean_step                                   # ten layers of every kind
    assert small["optimizer"] == large["optimizer"] <= 24
    # DDP's accumulation into main_grad is one add per parameter (counted apart)
    assert large["grad_accumulation"] > small["grad_accumulation"]
