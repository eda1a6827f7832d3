"""What every `python -m mintune.<command>` shares: a user's mistake ends in one line on stderr and
exit status 2, Ctrl-C in a short line and exit status 130, never in a traceback.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run_command(lambda: do_the_work(args))
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .hf import load_model
from .tokenizer import load_tokenizer

# A bad file, directory, config value or argument: the message already names it.
USER_ERRORS = (OSError, ValueError)


class Interrupted(Exception):
    """Ctrl-C, with what the user needs to know next (e.g. the checkpoint to resume from)."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_command(work, also: tuple[type[BaseException], ...] = ()) -> int:
    """Run work(); 0 when it returns, 2 with 'error: <message>' when it raises a user error (or one of
    `also`), 130 with 'interrupted' on Ctrl-C. Warnings print as 'warning: <message>'."""
    warnings.formatwarning = _one_line_warning
    try:
        work()
    except (*USER_ERRORS, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted. {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--model, --dtype, --quantize, --group-size, --device: how a command line loads a model."""
    ap.add_argument("--model", required=True, help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--quantize", default=None, choices=["int8"], help="store the block linear weights in int8")
    ap.add_argument("--group-size", type=int, default=None,
                    help="with --quantize int8: one scale per this many inputs (default: one per output channel)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


def load_model_from(args: argparse.Namespace):
    """The model and tokenizer that add_model_options' arguments describe."""
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                       group_size=args.group_size)
    tok = load_tokenizer(args.model)
    tok.check_fits(model.cfg.vocab_size, args.model)
    return model, tok
