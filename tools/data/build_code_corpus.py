"""Build the local code corpus: the installed packages' ``.py`` sources, split by package.

    python tools/data/build_code_corpus.py --output runs/code_corpus
    # then: --data.data_path=[runs/code_corpus/train] --data.valid_data_path=[runs/code_corpus/valid]

Reads every ``.py`` file under this interpreter's site-packages directories (or the folders
given with --site-packages), drops byte-identical copies, puts whole packages into a validation
split of about --valid-fraction of the bytes and the rest into training, and writes
``<output>/train.bin/.idx``, ``<output>/valid.bin/.idx`` and ``<output>/manifest.json`` (files,
bytes, tokens and packages per split, the folders read, duplicate counts). Nothing is
downloaded; the same installed files give the same datasets, and a second run with nothing
changed only checks them (megatron_transmamba/data/code_corpus.py). Bad input stops the tool
with one line naming the path, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

# megatron-core announces on import that optional fused kernels (Apex, Transformer Engine) are
# absent; the tool's own output is easier to read without it.
warnings.filterwarnings("ignore", message="(Transformer Engine|Apex).* not installed")

from megatron_transmamba.data.code_corpus import (  # noqa: E402
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_VALID_FRACTION,
    CorpusError,
    build_code_corpus,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for train/valid .bin/.idx and "
                                                         "manifest.json")
    parser.add_argument("--site-packages", action="append", metavar="DIR",
                        help="read this folder instead of the interpreter's site-packages "
                             "(repeatable)")
    parser.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION,
                        help=f"share of the bytes for validation, whole packages "
                             f"(default {DEFAULT_VALID_FRACTION})")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="skip larger .py files: generated tables (default 1 MiB)")
    parser.add_argument("--tokenizer", choices=("byte", "hf", "train-bpe"), default="byte")
    parser.add_argument("--tokenizer-path", help="tokenizer.json to read (hf)")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="for --tokenizer train-bpe (trained on the train split, written as "
                             "<output>/tokenizer.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    manifest = build_code_corpus(
        args.output, roots=args.site_packages, valid_fraction=args.valid_fraction,
        max_file_bytes=args.max_file_bytes, tokenizer_kind=args.tokenizer,
        tokenizer_path=args.tokenizer_path, vocab_size=args.vocab_size, log=print)
    splits, dup = manifest["splits"], manifest["duplicates"]
    print(f"read {', '.join(manifest['site_packages'])}: {manifest['py_files_found']:,} .py files; "
          f"removed {dup['removed']:,} duplicates ({dup['removed_bytes'] / 1e6:.1f} MB), skipped "
          f"{manifest['skipped']['over_max_file_bytes']} files over {args.max_file_bytes:,} bytes")
    print(f"validation packages: {', '.join(splits['valid']['package_names'])}")
    total = sum(s["bytes"] for s in splits.values())
    print(f"corpus: {total / 1e6:,.1f} MB, train {splits['train']['tokens']:,} tokens, valid "
          f"{splits['valid']['tokens']:,} tokens ({time.time() - start:.0f} s); "
          f"wrote {args.output}/manifest.json")
    train, valid = splits["train"]["prefix"], splits["valid"]["prefix"]
    hint = f"--data.data_path=[{train}] --data.valid_data_path=[{valid}]"
    if manifest["tokenizer_path"]:
        hint += f" --data.tokenizer=hf --data.tokenizer_path={manifest['tokenizer_path']}"
    print(f"use with: {hint}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CorpusError, OSError) as error:
        sys.exit(f"error: {error}")
