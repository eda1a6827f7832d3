"""Build the sentiment train/validation/test splits from all.jsonl.

Reads the hand-written master file ``all.jsonl`` next to this script,
validates it, and writes ``train.jsonl``, ``validation.jsonl`` and
``test.jsonl`` deterministically (seed 0). Each split is balanced across
the three labels (70% / 15% / 15% of every label).

Usage:
    python tools/make_sentiment_splits.py          # write splits
    python tools/make_sentiment_splits.py --check  # validate only
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

from splits import read_checked, write_jsonl

HERE = Path(__file__).resolve().parent.parent / "mintune" / "datasets" / "sentiment"
LABELS = ("positive", "negative", "neutral")
KINDS = ("review", "message", "headline")
FIELDS = {"text", "label", "kind"}
SEED = 0
FRACTIONS = {"validation": 0.15, "test": 0.15}  # train gets the rest
MIN_WORDS, MAX_WORDS = 3, 60


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _problems(row: dict) -> list[str]:
    problems = []
    if row["label"] not in LABELS:
        problems.append(f"bad label {row['label']!r}")
    if row["kind"] not in KINDS:
        problems.append(f"bad kind {row['kind']!r}")
    return problems


def load(path: Path) -> list[dict]:
    rows = read_checked(path, FIELDS, (MIN_WORDS, MAX_WORDS), _norm, _problems)
    counts = Counter(r["label"] for r in rows)
    if len(set(counts[label] for label in LABELS)) != 1:
        raise ValueError(f"validation failed: labels are not balanced: {dict(counts)}")
    return rows


def split(rows: list[dict], seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label in LABELS:
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        n_val = round(len(group) * FRACTIONS["validation"])
        n_test = round(len(group) * FRACTIONS["test"])
        out["validation"] += group[:n_val]
        out["test"] += group[n_val : n_val + n_test]
        out["train"] += group[n_val + n_test :]
    for name in out:  # mix labels within each split
        rng.shuffle(out[name])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="validate all.jsonl and exit")
    args = ap.parse_args(argv)

    rows = load(HERE / "all.jsonl")
    splits = split(rows)
    for name, part in splits.items():
        labels = Counter(r["label"] for r in part)
        kinds = Counter(r["kind"] for r in part)
        print(f"{name:10s} {len(part):4d}  labels={dict(sorted(labels.items()))}  "
              f"kinds={dict(sorted(kinds.items()))}")
    if not args.check:
        for name, part in splits.items():
            write_jsonl(HERE / f"{name}.jsonl", part, ("text", "label", "kind"))
        print(f"wrote {', '.join(f'{n}.jsonl' for n in splits)} to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
