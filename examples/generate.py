"""Generate text from a training checkpoint with the hybrid cache (megatron_transmamba.inference).

    python examples/generate.py runs/tiny_cpu --prompt "def main(" --max-new-tokens 128

Reads the newest checkpoint in (or at) the path at any TP / PP layout, runs the model at
TP = 1 on the CPU (float32) and prints the prompt and its continuation. Greedy by default;
``--sample`` draws with --temperature and --top-k.
"""

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="(Transformer Engine|Apex).* not installed")

import torch  # noqa: E402

from megatron_transmamba.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_transmamba.hf.export import (build_training_model, ensure_single_process_group,  # noqa: E402
                                           read_checkpoint)
from megatron_transmamba.inference.generate import generate  # noqa: E402
from megatron_transmamba.training.checkpoint import CheckpointError  # noqa: E402


def sample_text(checkpoint: str, prompt: str, max_new_tokens: int = 64, sample: bool = False,
                temperature: float = 1.0, top_k=None, seed: int = 0) -> str:
    full, config, run_config, _ = read_checkpoint(checkpoint)
    data = run_config.get("data", {})
    tokenizer = build_tokenizer(data.get("tokenizer", "byte"), data.get("tokenizer_path"))
    ensure_single_process_group()
    model = build_training_model(full, config)
    ids = torch.as_tensor(tokenizer.tokenize(prompt), dtype=torch.long)[None]
    out = generate(model, ids, max_new_tokens, do_sample=sample, temperature=temperature,
                   top_k=top_k, eos_token_id=tokenizer.eod,
                   generator=torch.Generator().manual_seed(seed))
    new = [t for t in out[0, ids.shape[1]:].tolist() if t < tokenizer.vocab_size and t != tokenizer.eod]
    return prompt + tokenizer.detokenize(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint.save directory or one iter_XXXXXXX folder")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        text = sample_text(args.checkpoint, args.prompt, args.max_new_tokens, args.sample,
                           args.temperature, args.top_k, args.seed)
    except (ValueError, FileNotFoundError, NotImplementedError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
