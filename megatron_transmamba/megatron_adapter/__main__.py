"""``python -m megatron_transmamba.megatron_adapter``: the patch inventory as a markdown table,
with the installed megatron-core release and whether the patches were checked against it."""

from megatron_transmamba import megatron_adapter


def main() -> None:
    version = megatron_adapter.megatron_core_version()
    unchecked = [p.name for p in megatron_adapter.inventory() if version not in p.versions]
    print(megatron_adapter.inventory_table())
    print()
    print(f"megatron-core {version}: "
          + (f"{len(unchecked)} patches not checked against it: {', '.join(unchecked)}"
             if unchecked else f"every patch was checked against it ({len(megatron_adapter.inventory())})"))


if __name__ == "__main__":
    main()
