"""Generate mintune's small instruction-tuning dataset (Alpaca-style rows, exact-match answers).

    python tools/make_instructions.py                      # seed 0, 60 rows per task -> mintune/datasets/instructions/
    python tools/make_instructions.py --seed 3 --per-task 90 --out /tmp/instr

Every row is {"instruction", "input", "output", "task"}; "input" may be "". Each output is computed
here from the sampled data (never typed by hand), is short, and is meant to be checked by exact string
equality after strip(). All words, names and sentence templates below were written for this file.

Determinism: only random.Random(seed) is used (no set iteration, no hashing, no locale, no clock), so the
same seed and --per-task give byte-identical files. Each task's rows are split 80/10/10 (per task, so the
splits are stratified by task). No (instruction, input) pair occurs twice in the whole set, and within a
task no underlying question occurs twice either (e.g. "3 + 4" and "What is 4 plus 3?" count as the same),
so a question in test is never asked, in other words, in train.

Stdlib only; files are written atomically (temp file in the same directory, then os.replace).
"""
from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import sys
import tempfile
from pathlib import Path

DEFAULT_SEED = 0
DEFAULT_PER_TASK = 60
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mintune" / "datasets" / "instructions"
SPLITS = ("train", "validation", "test")

# ----------------------------------------------------------------------------------------------------
# Word lists (all lowercase unless noted)
# ----------------------------------------------------------------------------------------------------
NOUNS = [
    "acorn", "anchor", "apple", "badger", "basket", "beacon", "biscuit", "bramble", "candle", "canyon",
    "cedar", "cobalt", "compass", "copper", "daisy", "dolphin", "ember", "falcon", "ferry", "garnet",
    "glacier", "hammer", "harbor", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "marble",
    "meadow", "mitten", "needle", "nectar", "orchid", "otter", "oyster", "parrot", "pebble", "pepper",
    "pillow", "quilt", "raven", "ribbon", "rocket", "saddle", "shovel", "spruce", "thimble", "tractor",
    "tulip", "umbrella", "valley", "violin", "wagon", "walnut", "whistle", "willow", "yarn", "zebra",
]
ADJECTIVES = [
    "amber", "bold", "brave", "bright", "calm", "clever", "crisp", "dusty", "eager", "gentle",
    "golden", "green", "hollow", "humble", "lazy", "little", "lucky", "misty", "narrow", "noisy",
    "old", "pale", "quiet", "rapid", "rusty", "shiny", "silver", "sleepy", "small", "smooth",
    "sturdy", "sunny", "tall", "tiny", "warm", "wild", "wooden", "young",
]
VERBS = [  # third person singular, intransitive
    "sleeps", "waits", "sings", "rests", "glows", "drifts", "hums", "wobbles", "shines", "spins",
    "sways", "creaks", "wanders", "blinks", "rolls", "squeaks", "floats", "leans",
]
ADVERBS = ["quietly", "slowly", "again", "today", "softly", "happily", "alone", "gently", "often"]
PREPOSITIONS = ["near", "under", "behind", "beside", "above", "inside", "beyond", "across"]
DETERMINERS = ["the", "one", "my", "our", "every", "that", "this", "your"]

FIRST_NAMES = [
    "Alma", "Bruno", "Celia", "Dario", "Edith", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kaia",
    "Lionel", "Mira", "Nils", "Odette", "Pavel", "Quinn", "Rosa", "Soren", "Talia", "Ugo", "Vera",
    "Wendel", "Ximena", "Yusuf", "Zora",
]
LAST_NAMES = [
    "Aldana", "Brook", "Castell", "Dorr", "Ekwue", "Fenn", "Galloway", "Halvorsen", "Ivers", "Juarez",
    "Kemp", "Lindqvist", "Moreau", "Nakata", "Okafor", "Petrov", "Quist", "Reyes", "Sato", "Tamm",
    "Udall", "Varga", "Wexley", "Yilmaz",
]
DOMAINS = ["example.org", "example.com", "example.net", "mail.example.org", "post.example.com",
           "inbox.example.net"]
CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Denver", "Osaka", "Lima", "Porto", "Dublin", "Quito", "Hanoi",
    "Perth", "Tallinn", "Krakow", "Austin", "Seville", "Cairo", "Bergen", "Halifax", "Valencia",
    "Accra", "Leeds", "Lyon", "Zurich", "Cape Town", "Buenos Aires", "San Diego", "Kyoto", "Montreal",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
THINGS = ["invoice", "report", "schedule", "photo album", "contract", "parcel", "map", "ticket",
          "slide deck", "poster", "budget", "survey"]
WRITINGS = ["song", "recipe", "legend", "poem", "rule book", "folk tale", "lullaby", "town charter"]
CLUBS = ["chess club", "book club", "choir", "running group", "garden society", "film circle"]
ITEMS = ["notebook", "lamp", "kettle", "umbrella", "backpack", "teapot", "scarf", "bicycle bell",
         "flower pot", "desk fan", "candle", "puzzle", "rain jacket", "water bottle"]
BUILDINGS = ["library", "bridge", "museum", "lighthouse", "train station", "town hall", "theater"]
FOODS = ["oranges", "dried figs", "chocolate", "tea", "olives", "cheese", "honey", "almonds"]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


# ----------------------------------------------------------------------------------------------------
# Tasks. Each generator takes (rng, i) -> (instruction, input, output, key). i is the row's index in its
# task and picks the sub-kind round-robin so sub-kinds (and labels) stay balanced. key identifies the
# underlying question: two rows of one task with the same key are duplicates however they are phrased.
# ----------------------------------------------------------------------------------------------------
ARITH_TEMPLATES = {
    "add": [
        ("What is {a} + {b}?", ""),
        ("What is {a} plus {b}?", ""),
        ("Add {a} and {b}.", ""),
        ("Compute the sum of {a} and {b}.", ""),
        ("Calculate the expression. Reply with the number only.", "{a} + {b}"),
    ],
    "sub": [
        ("What is {a} - {b}?", ""),
        ("What is {a} minus {b}?", ""),
        ("Subtract {b} from {a}.", ""),
        ("Calculate the expression. Reply with the number only.", "{a} - {b}"),
        ("Take {b} away from {a}. What is left?", ""),
    ],
    "mul": [
        ("What is {a} * {b}?", ""),
        ("What is {a} times {b}?", ""),
        ("Multiply {a} by {b}.", ""),
        ("What is the product of {a} and {b}?", ""),
        ("Calculate the expression. Reply with the number only.", "{a} * {b}"),
    ],
}


def gen_arithmetic(rng: random.Random, i: int):
    op = ("add", "sub", "mul")[i % 3]
    if op == "add":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out, key = a + b, ("add", min(a, b), max(a, b))
    elif op == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        out, key = a - b, ("sub", a, b)
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        if rng.random() < 0.5:
            a, b = b, a
        out, key = a * b, ("mul", min(a, b), max(a, b))
    instruction, inp = rng.choice(ARITH_TEMPLATES[op])
    return instruction.format(a=a, b=b), inp.format(a=a, b=b), str(out), key


EVEN_ODD_TEMPLATES = [
    ("Is {n} even or odd? Answer even or odd.", ""),
    ("Is the number {n} odd or even? Answer with one word: odd or even.", ""),
    ("Tell me whether {n} is an even or an odd number. Reply with even or odd.", ""),
    ("Classify the number as even or odd.", "{n}"),
    ("Even or odd? Answer with one word.", "{n}"),
]


def gen_even_odd(rng: random.Random, i: int):
    want_even = i % 2 == 0  # balanced labels
    n = rng.randint(0, 999) if rng.random() < 0.8 else rng.randint(1000, 99999)
    if (n % 2 == 0) != want_even:
        n += 1
    instruction, inp = rng.choice(EVEN_ODD_TEMPLATES)
    return instruction.format(n=n), inp.format(n=n), "even" if n % 2 == 0 else "odd", n


SORT_INSTRUCTIONS = [
    "Sort these words alphabetically and list them separated by commas.",
    "Put the following words in alphabetical order.",
    "Arrange the words from A to Z. Answer with a comma-separated list.",
    "Alphabetize this list.",
    "Reorder the comma-separated words so that they are in alphabetical order.",
]


def gen_sort_words(rng: random.Random, i: int):
    pool = NOUNS if i % 2 == 0 else NOUNS + ADJECTIVES
    while True:
        words = rng.sample(pool, rng.randint(3, 6))
        if words != sorted(words):  # never already in order: the model has to do something
            break
    return rng.choice(SORT_INSTRUCTIONS), ", ".join(words), ", ".join(sorted(words)), tuple(sorted(words))


DATE_FORMATS = {  # name -> (how the instruction names it, formatter)
    "mdy_num": ("the format MM/DD/YYYY", lambda y, m, d: f"{m:02d}/{d:02d}/{y}"),
    "dmy_dots": ("the format DD.MM.YYYY", lambda y, m, d: f"{d:02d}.{m:02d}.{y}"),
    "dmy_words": ("the format D Month YYYY (like 7 March 2024)", lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}"),
    "mdy_words": ("the format Month D, YYYY (like March 7, 2024)", lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}"),
}
DATE_TEMPLATES = [
    ("Convert the date {iso} to {spec}.", ""),
    ("Rewrite this ISO date in {spec}.", "{iso}"),
    ("Change the date below to {spec}.", "{iso}"),
    ("Express {iso} in {spec}.", ""),
    ("Write the following date using {spec}.", "{iso}"),
]


def gen_date_rewrite(rng: random.Random, i: int):
    fmt = list(DATE_FORMATS)[i % len(DATE_FORMATS)]
    y, m = rng.randint(1950, 2040), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    iso = f"{y:04d}-{m:02d}-{d:02d}"
    spec, render = DATE_FORMATS[fmt]
    instruction, inp = rng.choice(DATE_TEMPLATES)
    return instruction.format(iso=iso, spec=spec), inp.format(iso=iso), render(y, m, d), (iso, fmt)


def _email(rng: random.Random, first: str, last: str) -> str:
    f, l = first.lower(), last.lower()
    local = rng.choice([f"{f}.{l}", f"{f[0]}{l}", f"{f}_{l}", f"{f}{rng.randint(10, 99)}", f"{l}.{f[0]}"])
    return f"{local}@{rng.choice(DOMAINS)}"


EXTRACT_KINDS = {
    "email": (
        ["Extract the email address from the text.",
         "What email address is mentioned below?",
         "Find the email address in this sentence and return it exactly."],
        ["Please send the {thing} to {email} by {weekday}.",
         "{first} said the team can be reached at {email} during office hours.",
         "For questions about the {thing}, write to {email} and mention your order number.",
         "You can contact {first} {last} at {email} if the {thing} arrives damaged.",
         "The new address for the {club} is {email} starting in {month}."],
    ),
    "year": (
        ["Which year is mentioned in the sentence?",
         "Extract the year from the text.",
         "Pull out the four-digit year from the following sentence."],
        ["The {building} in {city} opened in {year} and still has {k} original windows.",
         "{first} {last} was born in {year} and has lived in {city} for {k} years.",
         "In {year}, the town of {city} hosted a festival with {k} bands.",
         "The {writing} was first written down in {year} by a clerk named {first}.",
         "Our team started the project in {year} with only {k} people."],
    ),
    "price": (
        ["What price is mentioned in the sentence? Include the $ sign.",
         "Extract the price from this sentence.",
         "How much does it cost according to the text? Answer with the price as written."],
        ["{A_item} costs {price} at the corner shop.",
         "{first} paid {price} for {a_item} and {k} stamps.",
         "The {item} is on sale for {price} until {weekday}.",
         "At the market in {city}, {a_item} sells for {price}.",
         "This week the price of {a_item} dropped to {price}."],
    ),
    "city": (
        ["Which city is mentioned in the sentence?",
         "Extract the name of the city from the text.",
         "Name the city that appears below."],
        ["{first} moved to {city} last spring to open a bakery.",
         "The train from {city} arrives at platform {k} every morning.",
         "Next month the conference will take place in {city}.",
         "{first} {last} has never visited {city}, but plans to go in {month}.",
         "Our cousins in {city} sent us a box of {food}."],
    ),
}


def gen_extraction(rng: random.Random, i: int):
    kind = list(EXTRACT_KINDS)[i % len(EXTRACT_KINDS)]
    instructions, templates = EXTRACT_KINDS[kind]
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    slots = {
        "first": first, "last": last, "email": _email(rng, first, last),
        "year": str(rng.randint(1820, 2024)), "price": f"${rng.randint(1, 249)}.{rng.randint(0, 99):02d}",
        "city": rng.choice(CITIES), "k": str(rng.randint(2, 60)), "thing": rng.choice(THINGS),
        "club": rng.choice(CLUBS), "writing": rng.choice(WRITINGS), "item": rng.choice(ITEMS), "building": rng.choice(BUILDINGS),
        "food": rng.choice(FOODS), "weekday": rng.choice(WEEKDAYS), "month": rng.choice(MONTHS),
    }
    slots["a_item"] = ("an " if slots["item"][0] in "aeiou" else "a ") + slots["item"]
    slots["A_item"] = slots["a_item"][0].upper() + slots["a_item"][1:]
    sentence = rng.choice(templates).format(**slots)
    return rng.choice(instructions), sentence, slots[kind], sentence


COUNT_INSTRUCTIONS = [
    "How many words are in the following sentence? Answer with a number.",
    "Count the words in this sentence.",
    "Tell me the number of words in the text below.",
    "How many words does this phrase contain?",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(DETERMINERS)]
    words += rng.sample(ADJECTIVES, rng.randint(0, 2))
    words += [rng.choice(NOUNS), rng.choice(VERBS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADVERBS))
    if rng.random() < 0.6:
        words += [rng.choice(PREPOSITIONS), rng.choice(DETERMINERS)]
        words += rng.sample(ADJECTIVES, rng.randint(0, 1))
        words.append(rng.choice(NOUNS))
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def gen_count_words(rng: random.Random, i: int):
    sentence = _sentence(rng)
    return rng.choice(COUNT_INSTRUCTIONS), sentence, str(len(sentence.split())), sentence


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


NUMBER_TEMPLATES = [
    ("Write the number {n} in words.", ""),
    ("Spell out {n} in English words, using lowercase letters.", ""),
    ("Convert this number to words.", "{n}"),
    ("How do you write {n} in words?", ""),
    ("Write the following number in English words.", "{n}"),
]


def gen_number_to_words(rng: random.Random, i: int):
    n = rng.randint(0, 99)
    instruction, inp = rng.choice(NUMBER_TEMPLATES)
    return instruction.format(n=n), inp.format(n=n), number_words(n), n


FORMAT_KINDS = {  # name -> (instructions, transform of the list of words)
    "uppercase": (["Convert the phrase to uppercase.",
                   "Rewrite the text in capital letters.",
                   "Make every letter of this phrase uppercase."],
                  lambda ws: " ".join(ws).upper()),
    "reverse": (["Reverse the order of the words.",
                 "Write the words in reverse order, last word first.",
                 "List these words backwards, word by word (do not reverse the letters)."],
                lambda ws: " ".join(reversed(ws))),
    "hyphenate": (["Join the words with hyphens.",
                   "Connect these words using hyphens instead of spaces.",
                   "Replace each space in the phrase with a hyphen."],
                  lambda ws: "-".join(ws)),
}


def gen_formatting(rng: random.Random, i: int):
    kind = list(FORMAT_KINDS)[i % len(FORMAT_KINDS)]
    instructions, transform = FORMAT_KINDS[kind]
    words = rng.sample(ADJECTIVES, rng.randint(0, 2)) + rng.sample(NOUNS, rng.randint(1, 3))
    if len(words) < 2:
        words.append(rng.choice(VERBS))
    return rng.choice(instructions), " ".join(words), transform(words), (kind, tuple(words))


TASKS = {
    "arithmetic": gen_arithmetic,
    "even_odd": gen_even_odd,
    "sort_words": gen_sort_words,
    "date_rewrite": gen_date_rewrite,
    "extraction": gen_extraction,
    "count_words": gen_count_words,
    "number_to_words": gen_number_to_words,
    "formatting": gen_formatting,
}


# ----------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------
def split_sizes(per_task: int) -> dict[str, int]:
    """Rows of one task in each split: 10% validation, 10% test (rounded down), the rest train."""
    n_eval = per_task // 10
    return {"train": per_task - 2 * n_eval, "validation": n_eval, "test": n_eval}


def build(seed: int = DEFAULT_SEED, per_task: int = DEFAULT_PER_TASK) -> dict[str, list[dict]]:
    """All rows, by split. Raises ValueError if a task cannot supply per_task distinct questions."""
    if per_task < 10:
        raise ValueError(f"--per-task must be at least 10 (got {per_task}) so every split gets each task")
    rng = random.Random(seed)
    sizes = split_sizes(per_task)
    seen_pairs: set[tuple[str, str]] = set()
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for task, gen in TASKS.items():
        rows, keys = [], set()
        attempts = 0
        while len(rows) < per_task:
            attempts += 1
            if attempts > 200 * per_task:
                raise ValueError(f"task {task!r} ran out of distinct questions after {len(rows)} rows; "
                                 f"use a smaller --per-task")
            instruction, inp, out, key = gen(rng, len(rows))
            if key in keys or (instruction, inp) in seen_pairs:
                continue
            keys.add(key)
            seen_pairs.add((instruction, inp))
            rows.append({"instruction": instruction, "input": inp, "output": out, "task": task})
        rng.shuffle(rows)
        start = 0
        for split in SPLITS:
            splits[split].extend(rows[start:start + sizes[split]])
            start += sizes[split]
    for split in SPLITS:
        rng.shuffle(splits[split])
    return splits


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument("--per-task", type=int, default=DEFAULT_PER_TASK,
                   help=f"rows per task across all splits (default {DEFAULT_PER_TASK}; at least 10)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    try:
        splits = build(args.seed, args.per_task)
    except ValueError as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_atomic(args.out / f"{split}.jsonl", to_jsonl(rows))
    counts = ", ".join(f"{s} {len(r)}" for s, r in splits.items())
    print(f"wrote {len(TASKS)} tasks x {args.per_task} rows (seed {args.seed}) to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
