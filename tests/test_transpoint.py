import pytest

from megatron_transmamba.transpoint import PAPER_PRESETS, build_transpoints, scale_to_length


def test_v9_at_paper_length_gives_the_paper_values_cyclically():
    points = build_transpoints("v9", None, 24, 8192)
    assert points[:8] == (0, 128, 256, 512, 1024, 2048, 4096, 8192)
    assert points == points[:8] * 3


def test_all_paper_presets_at_8192():
    assert PAPER_PRESETS["v8"] == (0, 1024, 2048, 6144, 8192)
    assert build_transpoints("v1", None, 3, 8192) == (2048,) * 3
    assert build_transpoints("v4", None, 4, 8192) == (3072, 4096, 5120, 3072)
    assert set(PAPER_PRESETS) == {f"v{i}" for i in range(1, 10)}


def test_presets_scale_as_fractions_of_T():
    assert build_transpoints("V9", None, 8, 2048) == (0, 32, 64, 128, 256, 512, 1024, 2048)
    assert scale_to_length([4096, 8192], 100) == (50, 100)
    assert build_transpoints("v2", None, 2, 1) == (0, 0) or build_transpoints("v2", None, 2, 1) == (1, 1)


def test_transformer_mamba_fixed_list_cyclic():
    assert build_transpoints("transformer", None, 3, 64) == (64, 64, 64)
    assert build_transpoints("mamba", None, 2, 64) == (0, 0)
    assert build_transpoints("fixed", [7], 3, 64) == (7, 7, 7)
    assert build_transpoints("list", [1, 2, 3], 3, 64) == (1, 2, 3)
    assert build_transpoints("cyclic", [5, 9], 5, 64) == (5, 9, 5, 9, 5)


@pytest.mark.parametrize("schedule,values,match", [
    ("nope", None, "transpoint_schedule='nope'"),
    ("list", [1, 2], "transpoint_values has 2 entries but the model has 3"),
    ("fixed", [1, 2], "exactly one value"),
    ("cyclic", None, "needs a non-empty list"),
    ("v9", [3], "takes no values"),
    ("cyclic", [65], r"outside \[0, seq_length=64\]"),
    ("cyclic", [1.5], "not an integer"),
])
def test_bad_schedules_name_the_field(schedule, values, match):
    with pytest.raises(ValueError, match=match):
        build_transpoints(schedule, values, 3, 64)
