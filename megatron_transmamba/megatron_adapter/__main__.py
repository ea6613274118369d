"""``python -m megatron_transmamba.megatron_adapter``: the patch inventory as a markdown table,
with the installed megatron-core release and whether the patches were checked against it."""

from megatron_transmamba import megatron_adapter


def main() -> None:
    version = megatron_adapter.megatron_core_version()
    patches = megatron_adapter.inventory()
    unchecked = [p.name for p in patches if version not in p.versions]
    print(megatron_adapter.inventory_table())
    print()
    if unchecked:
        print(f"megatron-core {version}: {len(unchecked)} patches not checked against it: "
              f"{', '.join(unchecked)}")
    else:
        print(f"megatron-core {version}: every patch was checked against it ({len(patches)})")


if __name__ == "__main__":
    main()
