"""The sentiment and quotes datasets shipped with mintune: present, parseable, balanced as documented,
and their splits are exactly the master file (instructions have tests/test_instructions_data.py)."""
import json
from collections import Counter

import mintune


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_sentiment_splits_balanced_and_disjoint():
    d = mintune.datasets_dir() / "sentiment"
    splits = {s: rows(d / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 462, "validation": 99, "test": 99}
    for name, split in splits.items():
        labels = Counter(r["label"] for r in split)
        assert set(labels) == {"positive", "negative", "neutral"} and len(set(labels.values())) == 1, name
        assert all(r["kind"] in ("review", "message", "headline") and r["text"].strip() for r in split)
    texts = [r["text"] for split in splits.values() for r in split]
    assert len(set(t.lower() for t in texts)) == len(texts)  # no text twice, so no leak between splits
    master = rows(d / "all.jsonl")
    assert sorted(json.dumps(r, sort_keys=True) for r in master) == sorted(
        json.dumps(r, sort_keys=True) for split in splits.values() for r in split)


def test_quotes_splits():
    d = mintune.datasets_dir() / "quotes"
    train, val = rows(d / "train.jsonl"), rows(d / "validation.jsonl")
    assert len(train) + len(val) >= 300 and len(val) >= 30
    texts = [r["text"] for r in train + val]
    assert all(set(r) == {"text"} for r in train + val)
    assert len(set(texts)) == len(texts)
    assert all(8 <= len(t.split()) <= 30 for t in texts)
    assert sorted(texts) == sorted(r["text"] for r in rows(d / "all.jsonl"))
