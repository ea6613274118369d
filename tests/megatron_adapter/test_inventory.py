"""megatron_adapter's contract: every patch is listed with its name, target, reason, CPU-only flag
and checked versions; apply is once per process and picks the patches by machine; remove puts
back the very objects that were there; an unchecked megatron-core release is refused in one line
(or warned about, on request) before anything changes."""

import warnings

import pytest
import torch

from megatron_transmamba import megatron_adapter
from megatron_transmamba.megatron_adapter import __main__ as adapter_main
from megatron_transmamba.megatron_adapter.patching import Override, Polyfill, PrivateCall

PATCHES = megatron_adapter.inventory()
ON_DEMAND = [patch.name for patch in PATCHES if patch.on_demand]


@pytest.fixture
def clean():
    """No patch applied inside the test; afterwards the process has the patches it had."""
    before = set(megatron_adapter.applied())
    megatron_adapter.remove()
    yield
    megatron_adapter.remove()
    if before - set(ON_DEMAND):
        megatron_adapter.apply()
    for name in sorted(before & set(ON_DEMAND)):
        megatron_adapter.apply_on_demand(name)


def snapshots() -> dict:
    return {patch.name: patch.snapshot() for patch in PATCHES}


def differing(before: dict, after: dict) -> list:
    """Patches some of whose targets hold another object than before (compared with ``is``)."""
    return sorted(name for name in before
                  if len(before[name]) != len(after[name])
                  or any(a is not b for a, b in zip(before[name], after[name])))


def test_inventory_lists_every_patch_with_its_declaration():
    names = [patch.name for patch in PATCHES]
    assert len(names) == len(set(names)) > 30
    for patch in PATCHES:
        assert patch.name.isidentifier() and patch.reason and patch.target, patch
        assert isinstance(patch.cpu_only, bool) and patch.versions, patch
        assert all(t.startswith(("megatron.core.", "logging.getLogger('megatron.core."))
                   for t in patch.targets), patch.targets
    assert {"foreach_l2_norm", "foreach_scale", "distributed_optimizer_foreach_copy",
            "fully_reshardable_bucket_padding", "sigterm_proof_write_queue",
            "compiled_tp_group_without_warning", "blended_dataset_without_process_group",
            "language_module_tied_embedding_setup", "cpu_rng_seed", "cpu_p2p"} <= set(names)
    # what is CPU-only is exactly the CUDA stand-ins; everything else runs on GPUs too
    assert {p.name for p in PATCHES if p.cpu_only} == {p.name for p in PATCHES
                                                       if p.name.startswith("cpu_")}


def test_the_table_has_a_row_per_patch(capsys):
    adapter_main.main()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "| name | target | reason | CPU-only | versions |"
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == len(PATCHES)
    for patch, row in zip(PATCHES, rows):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[0] == patch.name and cells[3].startswith("yes" if patch.cpu_only else "no")
        assert cells[4] == ", ".join(patch.versions)
    assert f"megatron-core {megatron_adapter.megatron_core_version()}: every patch was checked" \
        in out


def test_apply_then_remove_leaves_every_target_as_it_was(clean):
    before = snapshots()
    megatron_adapter.apply(cuda=False)
    for name in ON_DEMAND:
        megatron_adapter.apply_on_demand(name)
    applied = set(megatron_adapter.applied())
    changed = set(differing(before, snapshots()))
    overrides = {p.name for p in PATCHES if isinstance(p, (Override, PrivateCall))}
    # every patch in force changed its targets (an override or a private call changes nothing;
    # a polyfill's registration in Dynamo stays, its flag is the target), nothing else did
    conditional = {p.name for p in PATCHES if getattr(p, "only_if", None)}  # TE / apex
    assert applied >= {p.name for p in PATCHES} - conditional
    assert changed == applied - overrides
    assert all(p.snapshot()[2] is True for p in PATCHES if isinstance(p, Polyfill))
    megatron_adapter.remove()
    assert megatron_adapter.applied() == []
    assert differing(before, snapshots()) == []


def test_apply_is_once_per_process(clean):
    megatron_adapter.apply(cuda=False)
    first = snapshots()
    megatron_adapter.apply(cuda=False)
    assert differing(first, snapshots()) == []


def test_with_cuda_the_cpu_only_patches_are_not_applied(clean):
    """A GPU run gets every patch but the CPU-only ones (and the on-demand ones when asked)."""
    before = snapshots()
    megatron_adapter.apply(cuda=True)
    assert set(megatron_adapter.applied()) == {p.name for p in PATCHES
                                               if not p.cpu_only and not p.on_demand}
    cpu_only = {p.name for p in PATCHES if p.cpu_only}
    assert not cpu_only & set(differing(before, snapshots()))
    megatron_adapter.apply(cuda=False)                 # the rest, once
    assert cpu_only <= set(megatron_adapter.applied())


def test_a_patch_whose_condition_is_false_changes_nothing(clean, monkeypatch):
    """foreach_l2_norm replaces only megatron-core's local fallback, not TE's or apex's kernel."""
    from megatron.core.optimizer import clip_grads

    kernel = object()
    monkeypatch.setattr(clip_grads, "l2_norm_impl", kernel)
    megatron_adapter.apply(cuda=False)
    assert clip_grads.l2_norm_impl is kernel
    assert "foreach_l2_norm" not in megatron_adapter.applied()
    assert "foreach_scale" in megatron_adapter.applied()


def test_suspended_gives_megatron_core_as_is_for_the_block(clean):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    megatron_adapter.apply(cuda=False)
    patched = vars(DistributedOptimizer)["get_parameter_state_dp_zero"]
    megatron_adapter.remove()
    original = vars(DistributedOptimizer)["get_parameter_state_dp_zero"]
    megatron_adapter.apply(cuda=False)
    with megatron_adapter.suspended("fully_reshardable_bucket_padding"):
        assert vars(DistributedOptimizer)["get_parameter_state_dp_zero"] is original
    assert vars(DistributedOptimizer)["get_parameter_state_dp_zero"] is not original
    assert vars(DistributedOptimizer)["get_parameter_state_dp_zero"].__wrapped__ is \
        patched.__wrapped__


def test_an_unchecked_megatron_core_is_refused_before_anything_changes(clean, monkeypatch):
    monkeypatch.setattr("megatron.core.__version__", "0.17.0")
    monkeypatch.delenv(megatron_adapter.UNCHECKED_ENV, raising=False)
    before = snapshots()
    with pytest.raises(megatron_adapter.UncheckedMegatronCoreError) as error:
        megatron_adapter.apply(cuda=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("megatron-core 0.17.0 is not a release the megatron_adapter "
                              "patches were checked against (0.16.1)")
    assert "python -m megatron_transmamba.megatron_adapter" in message
    assert megatron_adapter.applied() == [] and differing(before, snapshots()) == []


def test_the_environment_variable_turns_the_refusal_into_a_warning(clean, monkeypatch):
    monkeypatch.setattr("megatron.core.__version__", "0.17.0")
    monkeypatch.setenv(megatron_adapter.UNCHECKED_ENV, "warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        megatron_adapter.apply(cuda=True)
    assert [str(w.message) for w in caught
            if "megatron-core 0.17.0 is not a release" in str(w.message)]
    assert "foreach_scale" in megatron_adapter.applied()


def test_on_demand_patches_are_only_applied_on_demand(clean):
    megatron_adapter.apply(cuda=not torch.cuda.is_available())
    assert not set(ON_DEMAND) & set(megatron_adapter.applied())
    with pytest.raises(ValueError, match="not on demand"):
        megatron_adapter.apply_on_demand("foreach_scale")
