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
import json
import random
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "mintune" / "datasets" / "sentiment"
LABELS = ("positive", "negative", "neutral")
KINDS = ("review", "message", "headline")
FIELDS = {"text", "label", "kind"}
SEED = 0
FRACTIONS = {"validation": 0.15, "test": 0.15}  # train gets the rest
MIN_WORDS, MAX_WORDS = 3, 60


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def load(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name}:{lineno}: invalid JSON: {exc}") from exc
            rows.append((lineno, row))
    return rows


def validate(numbered: list) -> list[dict]:
    errors = []
    seen: dict[str, int] = {}
    rows = []
    for lineno, row in numbered:
        where = f"all.jsonl:{lineno}"
        if not isinstance(row, dict) or set(row) != FIELDS:
            errors.append(f"{where}: expected exactly the keys {sorted(FIELDS)}")
            continue
        text, label, kind = row["text"], row["label"], row["kind"]
        if not isinstance(text, str) or text != text.strip() or not text:
            errors.append(f"{where}: text must be a non-empty, stripped string")
            continue
        if label not in LABELS:
            errors.append(f"{where}: bad label {label!r}")
        if kind not in KINDS:
            errors.append(f"{where}: bad kind {kind!r}")
        n = len(text.split())
        if not MIN_WORDS <= n <= MAX_WORDS:
            errors.append(f"{where}: {n} words, outside [{MIN_WORDS}, {MAX_WORDS}]")
        key = _norm(text)
        if key in seen:
            errors.append(f"{where}: duplicate of line {seen[key]}")
        else:
            seen[key] = lineno
        rows.append(row)
    counts = Counter(r["label"] for r in rows)
    if len(set(counts[l] for l in LABELS)) != 1:
        errors.append(f"labels are not balanced: {dict(counts)}")
    if errors:
        raise ValueError("validation failed:\n  " + "\n  ".join(errors))
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


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps({"text": r["text"], "label": r["label"], "kind": r["kind"]},
                                ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="validate all.jsonl and exit")
    args = ap.parse_args(argv)

    rows = validate(load(HERE / "all.jsonl"))
    splits = split(rows)
    for name, part in splits.items():
        labels = Counter(r["label"] for r in part)
        kinds = Counter(r["kind"] for r in part)
        print(f"{name:10s} {len(part):4d}  labels={dict(sorted(labels.items()))}  "
              f"kinds={dict(sorted(kinds.items()))}")
    if not args.check:
        for name, part in splits.items():
            write(HERE / f"{name}.jsonl", part)
        print(f"wrote {', '.join(f'{n}.jsonl' for n in splits)} to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
