"""The shipped instruction dataset (mintune/datasets/instructions/) and its generator
(tools/make_instructions.py).

The answer checkers here are written independently of the generator: they parse the numbers, dates and
words back out of the instruction/input text and recompute the answer, so a generator bug that writes
a wrong output (or a row whose text does not say what its output assumes) is caught.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "mintune" / "datasets" / "instructions"
GENERATOR = ROOT / "tools" / "make_instructions.py"
SPLITS = ("train", "validation", "test")
TASKS = ("arithmetic", "even_odd", "sort_words", "date_rewrite", "extraction", "count_words",
         "number_to_words", "formatting")
PER_TASK = {"train": 48, "validation": 6, "test": 6}  # as documented in the README


def load(directory: Path = DATA) -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        lines = (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        out[split] = [json.loads(line) for line in lines]
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return load()


def rows_of(data, task):
    return [r for split in SPLITS for r in data[split] if r["task"] == task]


def text(row) -> str:
    return f"{row['instruction']} {row['input']}"


# ----------------------------------------------------------------------------------------------------
# Shape, counts, balance, leakage
# ----------------------------------------------------------------------------------------------------
def test_files_exist_and_parse(data):
    for split in SPLITS:
        raw = (DATA / f"{split}.jsonl").read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw, split
        for row in data[split]:
            assert list(row) == ["instruction", "input", "output", "task"], row
            assert all(isinstance(v, str) for v in row.values()), row
            assert row["instruction"].strip() and row["output"].strip(), row
            assert row["task"] in TASKS, row
            assert row["output"] == row["output"].strip(), row


def test_counts_and_task_balance(data):
    assert sum(len(rows) for rows in data.values()) == 480
    for split in SPLITS:
        counts = Counter(r["task"] for r in data[split])
        assert counts == {t: PER_TASK[split] for t in TASKS}, (split, counts)


def test_readme_table_matches_files(data):
    """The datasheet's per-task table states the real counts."""
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    table = {}
    for m in re.finditer(r"^\|\s*`?(\w+)`?\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", readme, re.M):
        table[m.group(1)] = tuple(int(x) for x in m.group(2, 3, 4, 5))
    for task in TASKS:
        counts = tuple(sum(r["task"] == task for r in data[s]) for s in SPLITS)
        assert table[task] == counts + (sum(counts),), task
    totals = tuple(len(data[s]) for s in SPLITS)
    assert table["total"] == totals + (sum(totals),)
    assert "Apache-2.0" in readme


def test_no_instruction_input_pair_repeats(data):
    seen = {}
    for split in SPLITS:
        for row in data[split]:
            key = (" ".join(row["instruction"].lower().split()), " ".join(row["input"].lower().split()))
            assert key not in seen, f"{row} repeats a row of {seen[key]}"
            seen[key] = split


def test_outputs_are_short(data):
    for split in SPLITS:
        for row in data[split]:
            assert len(row["output"].split()) <= 8 and len(row["output"]) <= 60, row


def test_every_task_has_varied_phrasings(data):
    for task in TASKS:
        instructions = {re.sub(r"\d+", "N", r["instruction"]) for r in rows_of(data, task)}
        assert len(instructions) >= 3, (task, instructions)


# ----------------------------------------------------------------------------------------------------
# Independent re-derivation of every output
# ----------------------------------------------------------------------------------------------------
def test_arithmetic(data):
    ops = {
        "add": r"\+|\bplus\b|\bsum\b|\badd\b",
        "sub": r"\s-\s|\bminus\b|\bsubtract\b|\baway\b",
        "mul": r"\*|\btimes\b|\bproduct\b|\bmultiply\b",
    }
    for row in rows_of(data, "arithmetic"):
        t = text(row)
        found = [op for op, pattern in ops.items() if re.search(pattern, t, re.I)]
        assert len(found) == 1, row
        x, y = (int(n) for n in re.findall(r"\d+", t))  # exactly two numbers
        if re.search(r"\bfrom\b", t):  # "Subtract 11 from 30", "Take 11 away from 30"
            x, y = y, x
        expected = {"add": x + y, "sub": x - y, "mul": x * y}[found[0]]
        assert row["output"] == str(expected), row


def test_even_odd(data):
    labels = Counter()
    for row in rows_of(data, "even_odd"):
        (n,) = re.findall(r"\d+", text(row))
        assert row["output"] == ("odd" if int(n) & 1 else "even"), row
        labels[row["output"]] += 1
    assert labels["even"] == labels["odd"]


def test_sort_words(data):
    for row in rows_of(data, "sort_words"):
        words = [w.strip() for w in row["input"].split(",")]
        out = row["output"].split(", ")
        assert Counter(out) == Counter(words), row  # same words...
        assert all(a <= b for a, b in zip(out, out[1:])), row  # ...in ascending order
        assert out != words, row  # the input was not already sorted


MONTH_NAMES = ("January February March April May June July August September October November "
               "December").split()


def test_date_rewrite(data):
    formats = Counter()
    for row in rows_of(data, "date_rewrite"):
        t = text(row)
        (iso,) = re.findall(r"\b\d{4}-\d{2}-\d{2}\b", t)
        date = datetime.date.fromisoformat(iso)
        y, m, d = date.year, date.month, date.day
        wanted = {
            "MM/DD/YYYY": "%02d/%02d/%04d" % (m, d, y),
            "DD.MM.YYYY": "%02d.%02d.%04d" % (d, m, y),
            "D Month YYYY": "%d %s %d" % (d, MONTH_NAMES[m - 1], y),
            "Month D, YYYY": "%s %d, %d" % (MONTH_NAMES[m - 1], d, y),
        }
        named = [spec for spec in wanted if spec in t]
        assert len(named) == 1, row
        assert row["output"] == wanted[named[0]], row
        formats[named[0]] += 1
    assert len(formats) == 4


WORD_VALUES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
WORD_VALUES.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})


def test_number_to_words(data):
    for row in rows_of(data, "number_to_words"):
        (n,) = re.findall(r"\d+", text(row))
        parts = row["output"].split("-")
        value = sum(WORD_VALUES[p] for p in parts)  # read the words back as a number
        assert value == int(n), row
        if len(parts) == 2:
            assert WORD_VALUES[parts[0]] % 10 == 0 and 0 < WORD_VALUES[parts[1]] < 10, row
        else:
            assert int(n) < 20 or int(n) % 10 == 0, row


def test_count_words(data):
    for row in rows_of(data, "count_words"):
        assert row["output"] == str(len(row["input"].split())), row


def test_formatting(data):
    for row in rows_of(data, "formatting"):
        ins, words = row["instruction"].lower(), row["input"].split()
        if "uppercase" in ins or "capital" in ins:
            assert row["output"] == row["input"].upper(), row
        elif "revers" in ins or "backwards" in ins:
            assert row["output"].split() == words[::-1], row
        elif "hyphen" in ins:
            assert row["output"] == "-".join(words), row
        else:
            pytest.fail(f"unrecognised formatting instruction: {row}")


def test_extraction(data):
    patterns = {
        "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
        "year": r"\b\d{4}\b",
        "price": r"\$\d+\.\d{2}",
        "city": None,
    }
    kinds = Counter()
    for row in rows_of(data, "extraction"):
        ins = row["instruction"].lower()
        kind = next(k for k in ("email", "year", "price", "city") if k in ins) if "cost" not in ins else "price"
        kinds[kind] += 1
        if patterns[kind]:
            assert re.findall(patterns[kind], row["input"]) == [row["output"]], row
        else:  # a capitalised name standing once in the sentence, not at its start
            assert row["input"].count(row["output"]) == 1 and not row["input"].startswith(row["output"]), row
            assert all(w[0].isupper() for w in row["output"].split()), row
    assert len(set(kinds.values())) == 1 and len(kinds) == 4, kinds


# ----------------------------------------------------------------------------------------------------
# The generator: deterministic, and it reproduces the shipped files
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("make_instructions", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_generator_is_deterministic(generator, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        assert generator.main(["--seed", str(seed), "--out", str(out)]) == 0
    assert file_bytes(a) == file_bytes(b)
    assert sorted(file_bytes(a)) == [f"{s}.jsonl" for s in sorted(SPLITS)]  # no temp files left
    for split in SPLITS:
        assert file_bytes(a)[f"{split}.jsonl"] != file_bytes(c)[f"{split}.jsonl"]


def test_generator_per_task_option(generator, tmp_path, capsys):
    assert generator.main(["--per-task", "20", "--out", str(tmp_path)]) == 0
    data = load(tmp_path)
    for split, n in (("train", 16), ("validation", 2), ("test", 2)):
        assert Counter(r["task"] for r in data[split]) == {t: n for t in TASKS}
    with pytest.raises(SystemExit):
        generator.main(["--per-task", "5", "--out", str(tmp_path)])


def test_default_seed_reproduces_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True, capture_output=True)
    shipped = {name: b for name, b in file_bytes(DATA).items() if name.endswith(".jsonl")}
    assert file_bytes(tmp_path) == shipped
