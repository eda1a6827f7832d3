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
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "mintune" / "datasets" / "quotes"
SEED = 0
VALIDATION_FRACTION = 0.10
MIN_WORDS, MAX_WORDS = 8, 30


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def load_and_validate(path: Path) -> list[dict]:
    errors = []
    seen: dict[str, int] = {}
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: invalid JSON: {exc}")
                continue
            if not isinstance(row, dict) or set(row) != {"text"}:
                errors.append(f"{where}: expected exactly one key, 'text'")
                continue
            text = row["text"]
            if not isinstance(text, str) or not text or text != text.strip():
                errors.append(f"{where}: text must be a non-empty, stripped string")
                continue
            n = len(text.split())
            if not MIN_WORDS <= n <= MAX_WORDS:
                errors.append(f"{where}: {n} words, outside [{MIN_WORDS}, {MAX_WORDS}]")
            key = _norm(text)
            if key in seen:
                errors.append(f"{where}: duplicate of line {seen[key]}")
            else:
                seen[key] = lineno
            rows.append(row)
    if errors:
        raise ValueError("validation failed:\n  " + "\n  ".join(errors))
    return rows


def split(rows: list[dict], seed: int = SEED) -> dict[str, list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = round(len(rows) * VALIDATION_FRACTION)
    return {"train": rows[n_val:], "validation": rows[:n_val]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="validate all.jsonl and exit")
    args = ap.parse_args(argv)

    rows = load_and_validate(HERE / "all.jsonl")
    splits = split(rows)
    for name, part in splits.items():
        words = [len(r["text"].split()) for r in part]
        print(f"{name:10s} {len(part):4d} rows  words/row min={min(words)} "
              f"mean={sum(words) / len(words):.1f} max={max(words)}")
    if not args.check:
        for name, part in splits.items():
            with (HERE / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
                for r in part:
                    fh.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
        print(f"wrote {', '.join(f'{n}.jsonl' for n in splits)} to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
