"""The one-process runs of the layout-parity tests against their golden loss files
(tests/data/golden, see golden.py): a change that moves every layout alike fails here, where
the parity tests cannot see it. The runs are the parity tests' own references (the session's
``one_process_run``), so this costs nothing in a full run. When a change is meant to move the
losses, regenerate the files (``python -m tests.tools.regenerate_golden``) and say why in the
commit."""

import pytest

import golden


@pytest.mark.parametrize("case", list(golden.CASES))
def test_one_process_run_repeats_its_golden_losses(case, one_process_run):
    problems = golden.differences(case, one_process_run(case))
    assert not problems, (f"{case} differs from {golden.path(case)}: " + "; ".join(problems)
                          + f". If the change is meant to move the losses: {golden.COMMAND} "
                          f"{case}")


def test_every_golden_file_has_a_case():
    files = sorted(p.stem for p in golden.GOLDEN_DIR.glob("*.json"))
    assert files == sorted(golden.CASES)
