"""Tokenize text into a megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

    python tools/data/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus

Inputs: ``.txt`` files (one document per file, or per non-blank line with --split-lines) and
``.jsonl`` files (one document per line, the string under --json-key). Every document is
followed by the tokenizer's EOD token. ``--tokenizer train-bpe`` first trains a byte-level
BPE of --vocab-size on the inputs and writes it as ``<output-prefix>.tokenizer.json``, to be
given as ``data.tokenizer_path`` with ``data.tokenizer: hf`` (--tokenizer-path overrides
that location). Bad input (a .jsonl line that is not JSON or lacks the key, a glob that
matches nothing) stops the tool with the file and line named.
"""

from __future__ import annotations

import argparse
import sys

from megatron_transmamba.data.preprocess import build_indexed_dataset, expand_inputs, iter_documents
from megatron_transmamba.data.tokenizer import build_tokenizer, train_bpe_tokenizer_from_iterator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or globs")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and .idx")
    parser.add_argument("--tokenizer", choices=("byte", "hf", "train-bpe"), default="byte")
    parser.add_argument(
        "--tokenizer-path",
        help="tokenizer.json to read (hf) or write (train-bpe; default "
        "<output-prefix>.tokenizer.json)",
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="for --tokenizer train-bpe")
    parser.add_argument("--json-key", default="text", help="document field of .jsonl records")
    parser.add_argument(
        "--split-lines", action="store_true", help="one document per non-blank .txt line"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tokenizer == "hf" and not args.tokenizer_path:
        raise ValueError("--tokenizer hf needs --tokenizer-path (a tokenizer.json)")
    files = expand_inputs(args.input)

    def documents():
        return iter_documents(files, json_key=args.json_key, split_lines=args.split_lines)

    if args.tokenizer == "train-bpe":
        tokenizer_path = args.tokenizer_path or f"{args.output_prefix}.tokenizer.json"
        tokenizer = train_bpe_tokenizer_from_iterator(documents(), args.vocab_size, tokenizer_path)
        print(f"wrote {tokenizer_path} (vocab {tokenizer.vocab_size})")
    else:
        tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)

    stats = build_indexed_dataset(documents(), tokenizer, args.output_prefix)
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens"
        + (f" ({stats.skipped} empty documents skipped)" if stats.skipped else "")
        + f" from {len(files)} files"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
