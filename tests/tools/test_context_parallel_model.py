"""The context-parallel cost model (megatron_transmamba/parallel/cp_cost.py) and its tool:
state passing is constant in T for Mamba layers, the all-to-all linear in T, CP = 1 free, and a
tiny config matches a hand computation."""

import json
import os
import sys

import pytest

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.parallel import cp_cost

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

TINY = dict(hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, mamba_num_heads=2,
            mamba_num_groups=1, mamba_head_dim=4, mamba_state_dim=2, seq_length=8,
            ssd_chunk_size=4, use_cpu_initialization=True)


def tiny(pattern, **kw):
    return TransMambaConfig(**{**TINY, "layer_pattern": pattern, **kw})


def test_mamba_state_passing_is_constant_and_all_to_all_linear_in_seq_length():
    config = tiny("M-", transpoint_schedule="mamba")
    for cp in (2, 4, 8):
        ours = [cp_cost.communication(config, t, cp)["state_passing_per_layer"] for t in (64, 128, 256, 512)]
        theirs = [cp_cost.communication(config, t, cp)["all_to_all_per_layer"] for t in (64, 128, 256, 512)]
        assert ours[0] > 0 and ours == [ours[0]] * 4
        assert theirs == [theirs[0] * k for k in (1, 2, 4, 8)]


@pytest.mark.parametrize("pattern, kw", [("M-", {"transpoint_schedule": "mamba"}),
                                         ("T-", {"transpoint_schedule": "fixed", "transpoint_values": [5]}),
                                         ("*-", {"transpoint_schedule": "transformer"})])
def test_cp_1_communicates_nothing(pattern, kw):
    c = cp_cost.communication(tiny(pattern, **kw), 8, 1)
    assert c["state_passing_total"] == 0 and c["all_to_all_total"] == 0


def test_tiny_config_matches_hand_computation():
    # H=2, P=4, G=1, N=2, W=4, T=8, CP=2 (S=4), one T layer with TransPoint 6.
    config = tiny("T-", transpoint_schedule="fixed", transpoint_values=[6])
    state = 1 * 4 * (2 * 4 * 2 + 2)                 # one fp32 piece received: 72
    halo = 3 * (2 * 4 + 2 * 1 * 2) * 2 / 2          # rank 1 gets 3 rows x 12 ch bf16, mean: 36
    prefix = (0 + 4) * (1 * 2 + 2 * 4) * 2 / 2      # rank 1 needs tokens 0..3 of K,V: mean 40
    assert cp_cost.state_passing_layer_bytes(config, 0, 8, 2) == state + halo + prefix == 148
    # in_proj out 2HP+2GN+H = 22 plus y HP = 8, half of 4 tokens received, bf16: 120
    assert cp_cost.all_to_all_layer_bytes(config, 0, 8, 2) == 0.5 * 4 * (22 + 8) * 2 == 120
    assert cp_cost.state_passing_layer_bytes(config, 1, 8, 2) == 0     # the MLP

    attention = tiny("*-", transpoint_schedule="transformer")          # h=g=2, k=4
    assert cp_cost.ring_kv_bytes(attention, 8, 2) == (0 + 4) / 2 * 2 * 2 * 4 * 2 == 64
    assert cp_cost.all_to_all_layer_bytes(attention, 0, 8, 2) == 0.5 * 4 * (6 * 4 + 8) * 2 == 128


def test_memory_shrinks_with_cp_and_max_length_grows():
    config = tiny("M-", transpoint_schedule="mamba")
    one, two = (cp_cost.memory_per_rank(config, 64, 1024, cp) for cp in (1, 2))
    assert two["activations"] == one["activations"] / 2 and two["static"] == one["static"]
    fit = [cp_cost.max_seq_length(config, 64, cp, capacity=2e8) for cp in (1, 2, 4)]
    assert fit[0] is not None and fit[1] == 2 * fit[0] and fit[2] == 4 * fit[0]


def test_tool_prints_json_for_one_config(capsys):
    import context_parallel_model
    context_parallel_model.main(["--configs", os.path.join(ROOT, "examples/configs/mamba2_400m.yaml"),
                                 "--seq-lengths", "8192,16384", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["assumptions"]["bandwidth_is_assumed"]
    assert [(r["T"], r["cp"]) for r in result["rows"]] == [(t, cp) for t in (8192, 16384) for cp in (1, 2, 4, 8)]
    assert result["max_seq_length"][0]["config"] == "mamba2_400m"


def test_check_compares_the_estimate_with_measured_peaks(tmp_path):
    """--check: one row per micro-batch-1 record, measured / estimate from the same formula."""
    import context_parallel_model as tool
    config, vocab = tool.load("examples/configs/tiny_cpu.yaml")
    estimate = cp_cost.memory_per_rank(config, vocab, config.seq_length, 1)["total"] / 2 ** 30
    records = [{"config": "examples/configs/tiny_cpu.yaml", "T": config.seq_length,
                "micro_batch": 1, "variant": "eager", "status": "ok", "peak_gib": 2 * estimate},
               {"config": "examples/configs/tiny_cpu.yaml", "T": config.seq_length,
                "micro_batch": 2, "variant": "eager", "status": "ok", "peak_gib": 1.0},
               {"config": "examples/configs/tiny_cpu.yaml", "T": config.seq_length,
                "micro_batch": 1, "variant": "eager", "status": "oom", "peak_gib": None}]
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"records": records}))
    rows = tool.check([str(path)]).splitlines()[2:]
    assert len(rows) == 1 and rows[0].endswith("| 2.00 |")
