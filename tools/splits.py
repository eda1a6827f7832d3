"""What the dataset split tools share: reading a hand-written master file (JSON Lines) with every
problem listed by line, and writing a split.

    rows = read_checked(path, fields={"text"}, words=(8, 30), key=normalise)   # or ValueError listing all
    write_jsonl(path, rows, fields=("text",))
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def read_checked(path: Path, fields: set[str], words: tuple[int, int], key: Callable[[str], str],
                 check: Callable[[dict], list[str]] = lambda row: []) -> list[dict]:
    """The rows of `path`; each must be an object with exactly `fields`, a non-empty stripped "text" of
    words[0]..words[1] words, no duplicate under `key`, and pass `check` (its list of problems).
    Raises ValueError listing every problem, each with its line."""
    errors, seen, rows = [], {}, []
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
            if not isinstance(row, dict) or set(row) != fields:
                errors.append(f"{where}: expected exactly the keys {sorted(fields)}")
                continue
            text = row["text"]
            if not isinstance(text, str) or not text or text != text.strip():
                errors.append(f"{where}: text must be a non-empty, stripped string")
                continue
            n = len(text.split())
            if not words[0] <= n <= words[1]:
                errors.append(f"{where}: {n} words, outside [{words[0]}, {words[1]}]")
            errors += [f"{where}: {problem}" for problem in check(row)]
            if key(text) in seen:
                errors.append(f"{where}: duplicate of line {seen[key(text)]}")
            else:
                seen[key(text)] = lineno
            rows.append(row)
    if errors:
        raise ValueError("validation failed:\n  " + "\n  ".join(errors))
    return rows


def write_jsonl(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    """One JSON object per line with `fields` in that order, UTF-8, '\\n' line ends."""
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps({f: r[f] for f in fields}, ensure_ascii=False) + "\n")
