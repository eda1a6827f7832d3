"""Build the quotes train/validation splits from all.jsonl.

Reads the hand-written master file ``all.jsonl`` next to this script,
validates it (one ``text`` field per row, 8-30 words, no duplicates), and
writes ``train.jsonl`` (90%) and ``validation.jsonl`` (10%)
deterministically (seed 0).

Usage:
    python tools/make_quotes_splits.py          # write splits
    python tools/make_quotes_splits.py --check  # validate only
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from splits import read_checked, write_jsonl

HERE = Path(__file__).resolve().parent.parent / "mintune" / "datasets" / "quotes"
SEED = 0
VALIDATION_FRACTION = 0.10
MIN_WORDS, MAX_WORDS = 8, 30


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def split(rows: list[dict], seed: int = SEED) -> dict[str, list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = round(len(rows) * VALIDATION_FRACTION)
    return {"train": rows[n_val:], "validation": rows[:n_val]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="validate all.jsonl and exit")
    args = ap.parse_args(argv)

    rows = read_checked(HERE / "all.jsonl", {"text"}, (MIN_WORDS, MAX_WORDS), _norm)
    splits = split(rows)
    for name, part in splits.items():
        words = [len(r["text"].split()) for r in part]
        print(f"{name:10s} {len(part):4d} rows  words/row min={min(words)} "
              f"mean={sum(words) / len(words):.1f} max={max(words)}")
    if not args.check:
        for name, part in splits.items():
            write_jsonl(HERE / f"{name}.jsonl", part, ("text",))
        print(f"wrote {', '.join(f'{n}.jsonl' for n in splits)} to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
