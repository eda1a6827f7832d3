"""Command line: generate text with a Hugging Face model directory.

    python -m mintune.generate --model DIR --prompt "Once upon a time"
    python -m mintune.generate --model DIR --chat --prompt "What is the capital of France?"
    python -m mintune.generate --model DIR --adapter out/adapter --prompt "..."

The logic lives in generation.py (this file is only the command line, so that `mintune.generate`
stays the function).
"""
from __future__ import annotations

import argparse
import sys

from .adapter_files import load_adapter
from .cli import add_model_options, load_model_from, run_command
from .generation import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mintune.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--adapter", default=None, help="a saved adapter to apply (peft's layout or mintune's)")
    ap.add_argument("--prompt", action="append", required=True,
                    help="text to continue; give it several times for a batch")
    ap.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    ap.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    ap.add_argument("--max-new-tokens", type=int, default=50, help="most tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens of total mass p")
    ap.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    args = ap.parse_args(argv)
    return run_command(lambda: _generate(args))


def _generate(args) -> None:
    model, tok = load_model_from(args)
    if args.adapter:
        load_adapter(model, args.adapter)
    prompts = args.prompt
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [system + [{"role": "user", "content": p}] for p in prompts]
    texts = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)
    for text in texts:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
