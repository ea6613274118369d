import pytest

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.training.config import build_run_config, load_run_config, parse_overrides

BASE = dict(hidden_size=32, num_attention_heads=4, mamba_num_heads=4, mamba_num_groups=2,
            mamba_head_dim=8, mamba_state_dim=8, seq_length=64)


def test_layer_pattern_sets_layers_and_transpoints():
    cfg = TransMambaConfig(**BASE, layer_pattern="T-M-*-T-", transpoint_schedule="list",
                           transpoint_values=[5, 60])
    assert cfg.num_layers == 8
    assert [cfg.transpoint_of_layer(i) for i in (0, 2, 6)] == [5, 0, 60]


@pytest.mark.parametrize("overrides,match", [
    (dict(mamba_num_heads=6, mamba_num_groups=4), "mamba_num_heads=6 must be divisible by mamba_num_groups=4"),
    (dict(layer_pattern="T-X"), r"layer_pattern='T-X': unknown symbols \['X'\]"),
    (dict(layer_pattern="T-T-", transpoint_schedule="list", transpoint_values=[1, 2, 3]),
     "transpoint_values has 3 entries but the model has 2"),
    (dict(mixer_position_embedding="alibi"), "mixer_position_embedding='alibi'"),
    (dict(mamba_state_dim=7), "mamba_state_dim=7 must be even"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min=0.5, dt_max=0.1"),
    (dict(ssd_chunk_size=0), "ssd_chunk_size=0"),
    (dict(mixer_backend="cuda"), "mixer_backend='cuda'"),
    (dict(tensor_model_parallel_size=4, mamba_num_groups=2), "mamba_num_groups=2 must be divisible by tensor_model_parallel_size=4"),
    (dict(tensor_model_parallel_size=2, mamba_num_heads=3, mamba_num_groups=1),
     r"mamba_num_heads=3 must be divisible by tensor_model_parallel_size=2 \(parallel\."),
    (dict(tensor_model_parallel_size=2, layer_pattern="T-", ffn_hidden_size=33),
     "ffn_hidden_size=33 must be divisible by tensor_model_parallel_size=2"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, seq_length=63),
     "seq_length=63 must be divisible by tensor_model_parallel_size=2"),
])
def test_model_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        TransMambaConfig(**{**BASE, **overrides})


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=true needs "
                                         r"parallel.tensor_model_parallel_size > 1"):
        build_run_config({"parallel": {"sequence_parallel": True}})
    cfg = build_run_config({"parallel": {"sequence_parallel": True, "tensor_model_parallel_size": 2}})
    assert cfg.parallel.sequence_parallel


def test_yaml_unknown_keys_and_types_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model key 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        build_run_config({"model": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="unknown config section 'trainig'"):
        build_run_config({"trainig": {}})
    with pytest.raises(ValueError, match="unknown training key 'lrr'"):
        build_run_config({"training": {"lrr": 1}})
    with pytest.raises(ValueError, match=r"training.train_iters='ten': expected int"):
        build_run_config({"training": {"train_iters": "ten"}})
    with pytest.raises(ValueError, match="model.hidden_size=True: expected int"):
        build_run_config({"model": {"hidden_size": True}})
    with pytest.raises(ValueError, match="does not exist"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_command_line_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 64\ntraining:\n  lr: 0.1\n")
    cfg = load_run_config(str(path), ["--training.lr=3e-4", "--model.layer_pattern", "T-*-",
                                      "--model.dt_limit=[0.0, inf]"])
    assert cfg.training.lr == 3e-4 and cfg.model["hidden_size"] == 64
    assert cfg.model["layer_pattern"] == "T-*-"
    assert cfg.model["dt_limit"] == (0.0, float("inf"))
    with pytest.raises(ValueError, match="expected --section.key=value"):
        parse_overrides(["--lr=3"])


@pytest.mark.parametrize("pattern", ["*-*-*-*-", "*-", "*", '"*-T-"'])
def test_a_pattern_starting_with_star_is_text_not_a_yaml_alias(pattern):
    """The README's Transformer baseline, ``--model.layer_pattern='*-*-*-*-'`` (the shell drops
    the quotes): a leading ``*`` is a YAML alias, so the value is taken as the text it is."""
    cfg = load_run_config("examples/configs/tiny_cpu.yaml", [f"--model.layer_pattern={pattern}"])
    assert cfg.model["layer_pattern"] == pattern.strip('"')


def test_a_value_that_is_not_yaml_names_its_field():
    with pytest.raises(ValueError, match=r"^training.lr='\[1,': expected float"):
        load_run_config(None, ["--training.lr=[1,"])


def test_example_configs_load():
    import glob
    files = sorted(glob.glob("examples/configs/*.yaml"))
    assert files
    for path in files:
        cfg = load_run_config(path)
        model = TransMambaConfig(**cfg.model)
        assert model.num_layers == len(model.layer_pattern)
