"""Writes Tessera's built-in benchmark suites, deterministically.

    python evaluation/suites/generate.py [--out DIR]
    TESSERA_SUITE_SEED=... python evaluation/suites/generate.py --secret-out DIR

The first rewrites the committed files: ``<DIR>/<suite>.jsonl`` (one file per suite: its
header, its tasks and its public split; nothing else), ``<DIR>/train/<skill>.jsonl``
(training examples for the demo adapters, disjoint from every evaluation split) and
``<DIR>/train/replay.jsonl`` (everyday prompts whose base-model answers training replays),
byte for byte identically on every run: every random choice comes from a ``random.Random``
seeded per suite from PUBLIC_SEED, and nothing depends on the date, the machine or dict
ordering. DIR defaults to this file's folder.

The hidden splits (and the skills' paraphrase splits, and the composite suite's hidden
split), which decide admission and the public scoreboard, are never committed: anyone could
train on them. ``secret_suites(seed)`` draws them from a secret seed (TESSERA_SUITE_SEED),
each from a stream of its own, on problems that no committed public or training example
asks, and none that the first PUBLIC_SEED draws held while they were the committed hidden
split (they are in the history: see _splits); ``manage.py load_suites`` merges them into
the committed files at deployment time. ``--secret-out`` writes them as private files
instead (a header line, then hidden and paraphrase example lines: what ``load_suites
--private`` reads), never into this folder. Two seeds give splits of the same shape: the
same tasks, counts, phrasings, templates and answer formats. The skills' problems come from
large spaces (the number-words skill's two- and three-digit numbers are nearly all taken by
the training and public examples, so its hidden numbers are mostly four-digit); the general
suite's items come from the short lists below, so what stays secret there is which items
are asked and how (distractors, choice order, scrambles), never its public items.

The file format (one JSON object a line; see evaluation/suite_io.py, which validates it):

    {"suite": slug, "title": ..., "description": ..., "purpose": "skill" | "general" |
     "composite"}
    {"task": slug, "title": ..., "description": ..., "tags": [...], "metric": ...,
     "prompt_template": "...{field}...", "max_new_tokens": n}
    {"task": slug, "split": "public" | "hidden", "fields": {...}, "target": "...",
     "choices": [...]}          (hidden: secret parts only)
    {"task": slug, "split": "paraphrase", "prompt_template": "{question}",
     "fields": {"question": ..., ...}, "target": "..."}      (secret parts only)

Training files use the same format with ``"split": "train"``; they are never imported as
suites (evaluation.training reads them).

The six skills are ones SmolLM2-135M-Instruct does badly out of the box and a rank-8 LoRA
learns in ~150 steps; each has several phrasings (the ``question`` field) so an adapter
cannot win by memorising one template. Each skill also has a hidden ``paraphrase`` split:
the same kind of problem asked in a dozen hand-written wordings that no other split, no
training file and no demo adapter's example prompt uses (other words and word order,
questions inside a sentence, no "Answer with only ..." line), on keys no other split
holds, so that routing and scores can be checked away from the training templates. The
``general`` suite holds what the base model already does well, so that a harmful adapter
shows up as a drop there; it has no paraphrase split.

The ``composite`` suite asks for two skills in one prompt (unit conversion and date
formatting; addition, then converting the sum; number words, then adding to the number;
sorting and word reversal), each part of the answer on a line of its own and in exactly
the format that skill's own task answers in. Its ``parts`` metric checks each part apart
(the target holds them one a line), so a mixture that routes each part to the right adapter
can be told from one that solves only half. Its keys are drawn afresh, not kept apart from
the skills' splits: what it judges is the combination. No adapter's admission reads it; its
hidden split is secret like the others, since the public scoreboard reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The committed files' seed. The secret splits come from another one (TESSERA_SUITE_SEED),
# drawn away from every key this one gave.
PUBLIC_SEED = 0
HIDDEN_PER_TASK = 200
PUBLIC_PER_TASK = 50
TRAIN_PER_SKILL = 2400  # 150 steps x batch 16, each seen once
PARAPHRASE_PER_TASK = 60
# Paraphrase examples hold their whole prompt: no answer-format line is appended.
PARAPHRASE_TEMPLATE = "{question}"

NUMBER_ONLY = "\nAnswer with only the number."
# The composite suite's targets: one part a line (the parts metric's format; suite_io).
PARTS_SEPARATOR = "\n"


# --- Small helpers ----------------------------------------------------------------------------


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n"


def _unique(make: Callable[[random.Random], tuple], rng: random.Random, count: int) -> list:
    """``count`` distinct keys from ``make``, in the order first drawn."""
    seen: set = set()
    out: list = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could not draw {count} distinct items")
        key = make(rng)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def _splits(keys: list, *, train: int) -> Iterator[tuple[str, object]]:
    """Retired first, then public, then train: disjoint by construction. The retired keys
    were the hidden split while it was committed; they are still drawn (so the public and
    training examples stay what they were) and never used again, since anyone can read
    them in the history."""
    for index, key in enumerate(keys):
        if index < HIDDEN_PER_TASK:
            yield "retired", key
        elif index < HIDDEN_PER_TASK + PUBLIC_PER_TASK:
            yield "public", key
        elif index < HIDDEN_PER_TASK + PUBLIC_PER_TASK + train:
            yield "train", key


def _draw_new(
    skill: Skill,
    rng: random.Random,
    count: int,
    *,
    avoid: set,
    keep: Callable[[object], dict | None],
) -> list[tuple[object, dict]]:
    """``count`` (key, example) pairs drawn from ``rng`` on distinct problems not in
    ``avoid`` (which grows with them): ``keep(key)`` makes a key's example, or None to
    skip the key."""
    out: list[tuple[object, dict]] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could not draw {count} new {skill.slug} keys")
        key = skill.draw(rng)
        if skill.problem(key) in avoid:
            continue
        example = keep(key)
        if example is None:
            continue
        avoid.add(skill.problem(key))
        out.append((key, example))
    return out


# --- Number words -------------------------------------------------------------------------------

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1_000_000, American style: "three hundred forty-two"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = f"{_ONES[hundreds]} hundred"
        return head + (f" {number_to_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    head = f"{number_to_words(thousands)} thousand"
    return head + (f" {number_to_words(rest)}" if rest else "")


# --- Skill suites -------------------------------------------------------------------------------


class Skill:
    """One skill task. ``phrasings`` fill the task's ``prompt_template`` (the hidden,
    public and train splits); ``paraphrases`` are whole prompts in other words, without
    the template's answer-format line (the paraphrase split)."""

    slug: str
    title: str
    description: str
    tags: list[str]
    prompt_template: str
    max_new_tokens: int
    phrasings: list[str]
    paraphrases: list[str]

    def draw(self, rng: random.Random) -> tuple | int: ...

    def fill(self, key, phrasing: str) -> dict: ...

    def problem(self, key) -> object:
        """What the key asks, for telling apart paraphrase keys: keys that only reorder
        what the answer does not depend on ask the same."""
        return key

    def keys(self, rng: random.Random, count: int) -> list:
        return _unique(self.draw, rng, count)

    def example(self, key, rng: random.Random) -> dict:
        return self.fill(key, rng.choice(self.phrasings))


class Addition(Skill):
    slug = "addition"
    title = "Three-digit addition"
    description = "Add two three-digit numbers; the answer is the sum in digits."
    tags = ["addition", "arithmetic"]
    prompt_template = "{question}" + NUMBER_ONLY
    max_new_tokens = 8
    phrasings = [
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Compute the sum of {a} and {b}.",
        "What do you get when you add {a} to {b}?",
        "Calculate {a} plus {b}.",
        "{a} + {b} = ?",
    ]
    paraphrases = [
        "I'd like to know the total of {a} and {b}.",
        "If you put {a} and {b} together, what number do you end up with?",
        "Please tell me what {a} plus {b} comes to.",
        "There are {a} red marbles and {b} blue ones in a jar; how many marbles are in the "
        "jar altogether?",
        "Quick check: {b} added to {a} makes what?",
        "Could you work out the sum {a}+{b} for me?",
        "Starting from {a} and counting up another {b}, where do you land?",
        "A library owns {a} novels and {b} comics. What is the combined number of books?",
        "Find the total when {a} is increased by {b}.",
        "Tell me the result of adding together the numbers {a} and {b}, just the number please.",
        "Sum up {a} with {b}; what is the result?",
        "{a} and {b} added up equal how much?",
    ]

    def draw(self, rng):
        return (rng.randint(100, 999), rng.randint(100, 999))

    def problem(self, key):
        return tuple(sorted(key))

    def fill(self, key, phrasing):
        a, b = key
        question = phrasing.format(a=a, b=b)
        return {"fields": {"question": question, "a": a, "b": b}, "target": str(a + b)}


_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "green",
    "house",
    "music",
    "paper",
    "candle",
    "window",
    "garden",
    "orange",
    "bridge",
    "silver",
    "forest",
    "rabbit",
    "pencil",
    "mirror",
    "rocket",
    "island",
    "yellow",
    "winter",
    "summer",
    "basket",
    "doctor",
    "guitar",
    "planet",
    "spoon",
    "jacket",
    "violet",
    "turtle",
    "coffee",
    "butter",
    "dragon",
    "engine",
    "farmer",
    "helmet",
    "kitten",
    "ladder",
    "marble",
    "needle",
    "pillow",
    "rain",
    "snow",
    "wind",
    "fire",
    "lamp",
    "desk",
    "chair",
    "table",
    "horse",
    "sheep",
    "goat",
    "duck",
    "fish",
    "bird",
    "tree",
    "leaf",
    "road",
    "car",
    "boat",
    "train",
    "plane",
    "ship",
    "bread",
    "milk",
    "cheese",
    "salt",
    "sugar",
    "honey",
    "lemon",
    "grape",
    "peach",
    "plum",
    "melon",
    "onion",
    "carrot",
    "potato",
    "tomato",
    "king",
    "queen",
    "castle",
    "tower",
    "valley",
    "hill",
    "lake",
    "ocean",
    "beach",
    "desert",
    "moon",
    "star",
    "sun",
    "sky",
]


class WordReversal(Skill):
    slug = "word-reversal"
    title = "Reverse the order of words"
    description = (
        "Given three to five words, write the same words in reverse order (last word "
        "first), separated by single spaces."
    )
    tags = ["word-reversal"]
    prompt_template = "{question}\nAnswer with only the words, in the new order."
    max_new_tokens = 16
    phrasings = [
        "Reverse the order of these words: {words}",
        "Write these words in reverse order: {words}",
        'Reverse the word order of "{words}".',
        "Say these words backwards, last word first: {words}",
        "List the following words from last to first: {words}",
    ]
    paraphrases = [
        "Starting with the final word and ending with the first one, repeat {words}.",
        'Can you flip the order of the words in "{words}" so the final one comes first?',
        "Here is a list of words: {words}. Please read it back to me from the end to the "
        "beginning.",
        'If you read "{words}" right to left, word by word, what do you get?',
        "Put the words {words} back to front.",
        "I wrote {words}, but I need the words the other way round. What should it say?",
        "Take the sequence {words} and turn it around, keeping each word spelled the same.",
        'What does "{words}" become when the order of its words is inverted?',
        "Please mirror the word order of this phrase: {words}",
        "Rearrange {words} so the first word becomes the last, the last becomes the first, "
        "and so on.",
        "Backwards by word, not by letter: {words}",
        "My list is {words}; give it to me again with its words in opposite order.",
    ]

    def draw(self, rng):
        return tuple(rng.sample(_WORDS, rng.randint(3, 5)))

    def fill(self, key, phrasing):
        words = " ".join(key)
        question = phrasing.format(words=words)
        return {"fields": {"question": question, "words": words}, "target": " ".join(key[::-1])}


_UNITS = [
    # (from, to, factor)
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("tonnes", "kilograms", 1000),
    ("kilobytes", "bytes", 1000),
    ("meters", "millimeters", 1000),
]


class UnitConversion(Skill):
    slug = "unit-conversion"
    title = "Metric unit conversion"
    description = (
        "Convert a whole number of a metric unit to a smaller unit (km to m, kg to g, "
        "L to mL, m to cm, ...); the answer is the whole number of the smaller unit."
    )
    tags = ["unit-conversion"]
    prompt_template = "{question}" + NUMBER_ONLY
    max_new_tokens = 10
    phrasings = [
        "Convert {value} {source} to {dest}.",
        "How many {dest} are in {value} {source}?",
        "{value} {source} is how many {dest}?",
        "Express {value} {source} in {dest}.",
        "What is {value} {source} in {dest}?",
    ]
    paraphrases = [
        "I have {value} {source}. How many {dest} is that?",
        "Tell me how many {dest} there are in {value} {source}.",
        "The amount is {value} {source}; what is it when written in {dest}?",
        "If something measures {value} {source}, how many {dest} does it measure?",
        "Please change {value} {source} into {dest}.",
        "In {dest}, how much is {value} {source}?",
        "Going from {source} to {dest}, what does {value} become?",
        "I need {value} {source} given as a number of {dest}.",
        "Could you turn {value} {source} into {dest} for me?",
        "Someone measured {value} {source}. Give that figure in {dest}.",
        "What number of {dest} equals {value} {source}?",
        "Work out {value} {source} in terms of {dest}, giving just the figure.",
    ]

    def draw(self, rng):
        return (rng.randrange(len(_UNITS)), rng.randint(2, 999))

    def fill(self, key, phrasing):
        unit, value = key
        source, dest, factor = _UNITS[unit]
        question = phrasing.format(value=value, source=source, dest=dest)
        fields = {"question": question, "value": value, "from": source, "to": dest}
        return {"fields": fields, "target": str(value * factor)}


_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


class DateFormatting(Skill):
    slug = "date-formatting"
    title = "Reformat ISO dates"
    description = 'Rewrite an ISO date (YYYY-MM-DD) as "Month D, YYYY", e.g. March 7, 2024.'
    tags = ["date-formatting"]
    prompt_template = '{question}\nAnswer with only the date, like "January 5, 2020".'
    max_new_tokens = 12
    phrasings = [
        "Rewrite the date {date} in words.",
        "Convert {date} to the format Month D, YYYY.",
        "Write the ISO date {date} as a month name, day and year.",
        "How would you write {date} in long form?",
        "Format this date for a letter: {date}",
    ]
    paraphrases = [
        "On a wedding invitation, how would {date} be spelled out with the month's name first?",
        "Please turn {date} into the style of American letters, for example July 4, 1976.",
        "What is {date} when written as the month in words, then the day, a comma and the year?",
        "My calendar says {date}. How do I say that date the American way?",
        "Spell out the month of {date}, keeping the day and year as numbers.",
        "The form wants the date {date} written like December 1, 1999. What should I put?",
        "Could you give me {date} as month name, day and year?",
        "How does a US newspaper print the date {date}?",
        "Someone sent me {date}; I need it as something like April 9, 2010 instead.",
        "Change the numeric date {date} into words for the month and digits for the day and year.",
        "Year-month-day {date}: what is it in Month Day, Year order?",
        "For the top of a formal letter, {date} should read how?",
    ]

    def draw(self, rng):
        return (rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28))

    def fill(self, key, phrasing):
        year, month, day = key
        date = f"{year:04d}-{month:02d}-{day:02d}"
        question = phrasing.format(date=date)
        target = f"{_MONTHS[month - 1]} {day}, {year}"
        return {"fields": {"question": question, "date": date}, "target": target}


class NumberWords(Skill):
    slug = "number-words"
    title = "Number words to digits"
    description = (
        'Write a number given in English words as digits: "three hundred forty-two" is 342. '
        "Numbers have two to four digits."
    )
    tags = ["number-words"]
    prompt_template = "{question}" + NUMBER_ONLY
    max_new_tokens = 8
    phrasings = [
        "Write {words} as digits.",
        'What number is "{words}"?',
        "Convert the number words to a numeral: {words}",
        "Write this number in digits: {words}",
        'Turn "{words}" into a number.',
    ]
    # The other splits use every two-digit number and all but a few three-digit ones, so
    # these are asked almost only of four-digit numbers.
    paraphrases = [
        'Someone said "{words}" over the phone; how would I type that number?',
        "How is {words} written using numerals?",
        "I read the amount {words} on a cheque. What is it in figures?",
        "Give me the digits for {words}.",
        "If I write {words} with digits instead of letters, what do I get?",
        "The number {words}, written the usual way with digits, is what?",
        "Please express {words} as a plain number without any words.",
        "What numeral stands for {words}?",
        "My friend spelled out a number for me: {words}. Can you write it as figures?",
        "Using only digits, write down {words}.",
        "Change the spelled-out number {words} into its numeric form.",
        "Which number do the words {words} describe?",
    ]

    def draw(self, rng):
        digits = rng.choice([2, 3, 3, 4])
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def fill(self, key, phrasing):
        words = number_to_words(key)
        question = phrasing.format(words=words)
        return {"fields": {"question": question, "words": words}, "target": str(key)}


class Sorting(Skill):
    slug = "sorting"
    title = "Sort a short list of numbers"
    description = (
        "Sort four to six numbers (1 to 99) in ascending order; the answer lists them "
        'separated by ", ".'
    )
    tags = ["sorting"]
    prompt_template = "{question}\nAnswer with only the sorted numbers, separated by commas."
    max_new_tokens = 24
    phrasings = [
        "Sort these numbers in ascending order: {numbers}",
        "Arrange these numbers from smallest to largest: {numbers}",
        "Put the following numbers in increasing order: {numbers}",
        "Order from lowest to highest: {numbers}",
        "Sort the list [{numbers}] from smallest to biggest.",
    ]
    paraphrases = [
        "Could you line up {numbers} from the smallest to the biggest?",
        "I have these numbers: {numbers}. What are they in ascending order, separated by commas?",
        "Starting with the lowest, list {numbers}.",
        "Please rewrite {numbers} so that each number is larger than the one before it.",
        "What order do {numbers} go in if you count upward?",
        "Rank the values {numbers} from least to greatest.",
        "Put {numbers} in order, smallest first, with commas between them.",
        "When {numbers} are sorted low to high, what is the result?",
        "Reorder the list {numbers} so it goes up.",
        "My test scores were {numbers}. Show them from the lowest score to the highest.",
        "From small to large, how do {numbers} line up?",
        "In rising order, what are the following: {numbers}?",
    ]

    def draw(self, rng):
        return tuple(rng.sample(range(1, 100), rng.randint(4, 6)))

    def problem(self, key):
        return tuple(sorted(key))

    def fill(self, key, phrasing):
        numbers = ", ".join(str(n) for n in key)
        question = phrasing.format(numbers=numbers)
        target = ", ".join(str(n) for n in sorted(key))
        return {"fields": {"question": question, "numbers": numbers}, "target": target}


SKILLS: list[Skill] = [
    Addition(),
    WordReversal(),
    UnitConversion(),
    DateFormatting(),
    NumberWords(),
    Sorting(),
]


def _task_line(skill: Skill) -> dict:
    return {
        "task": skill.slug,
        "title": skill.title,
        "description": skill.description,
        "tags": skill.tags,
        "metric": "exact_match",
        "prompt_template": skill.prompt_template,
        "max_new_tokens": skill.max_new_tokens,
    }


def paraphrase_lines(skill: Skill, seed: int | str, *, taken: list) -> list[str]:
    """The paraphrase split: PARAPHRASE_PER_TASK examples, each paraphrase in turn, whose
    problems none of the ``taken`` keys (committed, retired and hidden) asks, and whose
    prompts do not already hold their answer (a list drawn in sorted order, an example date
    that is the key's own). ``seed`` is the secret seed; the stream is the split's own."""
    rng = random.Random(f"tessera:{skill.slug}:paraphrase:{seed}")
    lines: list[str] = []

    def make(key) -> dict | None:
        phrasing = skill.paraphrases[len(lines) % len(skill.paraphrases)]
        example = skill.fill(key, phrasing)
        if example["target"] in example["fields"]["question"]:
            return None
        lines.append(
            _line(
                {
                    "task": skill.slug,
                    "split": "paraphrase",
                    "prompt_template": PARAPHRASE_TEMPLATE,
                    **example,
                }
            )
        )
        return example

    avoid = {skill.problem(key) for key in taken}
    _draw_new(skill, rng, PARAPHRASE_PER_TASK, avoid=avoid, keep=make)
    return lines


def _committed_keys(skill: Skill, public_seed: int) -> list:
    """Every key the committed files were drawn from: retired, public and train."""
    rng = random.Random(f"tessera:{skill.slug}:{public_seed}")
    return skill.keys(rng, HIDDEN_PER_TASK + PUBLIC_PER_TASK + TRAIN_PER_SKILL)


def _skill_header(skill: Skill) -> dict:
    return {
        "suite": skill.slug,
        "title": skill.title,
        "description": skill.description,
        "purpose": "skill",
    }


def skill_files(skill: Skill, seed: int = PUBLIC_SEED) -> tuple[str, str]:
    """(suite JSONL, train JSONL) for one skill, as committed: the suite file holds the
    header, the task and the public split; the secret splits come from skill_secret."""
    rng = random.Random(f"tessera:{skill.slug}:{seed}")
    keys = skill.keys(rng, HIDDEN_PER_TASK + PUBLIC_PER_TASK + TRAIN_PER_SKILL)
    header = _skill_header(skill)
    suite = [_line(header), _line(_task_line(skill))]
    train = [_line({**header, "title": f"{skill.title} (training data)"})]
    train.append(_line(_task_line(skill)))
    for split, key in _splits(keys, train=TRAIN_PER_SKILL):
        # Retired examples are still made: their phrasings come from the same stream.
        line = _line({"task": skill.slug, "split": split, **skill.example(key, rng)})
        if split == "train":
            train.append(line)
        elif split == "public":
            suite.append(line)
    return "".join(suite), "".join(train)


def skill_secret(skill: Skill, secret_seed: str, *, public_seed: int = PUBLIC_SEED) -> str:
    """One skill's secret part (a private file: the header, then HIDDEN_PER_TASK hidden and
    PARAPHRASE_PER_TASK paraphrase examples), drawn from ``secret_seed`` on problems that no
    committed or retired key asks, the paraphrase split's away from the hidden one's too.
    The same phrasings, template and answer format as the committed public split."""
    taken = _committed_keys(skill, public_seed)
    rng = random.Random(f"tessera:{skill.slug}:hidden:{secret_seed}")
    avoid = {skill.problem(key) for key in taken}
    hidden = _draw_new(
        skill, rng, HIDDEN_PER_TASK, avoid=avoid, keep=lambda key: skill.example(key, rng)
    )
    lines = [_line(_skill_header(skill))]
    lines += [_line({"task": skill.slug, "split": "hidden", **example}) for _, example in hidden]
    lines += paraphrase_lines(skill, secret_seed, taken=taken + [key for key, _ in hidden])
    return "".join(lines)


# --- The general suite --------------------------------------------------------------------------

_CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("the United Kingdom", "London"),
    ("England", "London"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Kenya", "Nairobi"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("India", "New Delhi"),
    ("the United States", "Washington"),
    ("Chile", "Santiago"),
    ("Venezuela", "Caracas"),
    ("Saudi Arabia", "Riyadh"),
    ("Turkey", "Ankara"),
    ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Switzerland", "Bern"),
    ("Iceland", "Reykjavik"),
    ("Vietnam", "Hanoi"),
    ("Malaysia", "Kuala Lumpur"),
    ("Singapore", "Singapore"),
    ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"),
    ("Nepal", "Kathmandu"),
    ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"),
    ("Scotland", "Edinburgh"),
]
_CAPITAL_PHRASINGS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "What city is {country}'s capital?",
    "Tell me the capital of {country}.",
]

_CATEGORIES = {
    "an animal": [
        "dog",
        "cat",
        "horse",
        "cow",
        "lion",
        "tiger",
        "rabbit",
        "elephant",
        "sheep",
        "mouse",
        "bear",
        "monkey",
    ],
    "a fruit": [
        "apple",
        "banana",
        "orange",
        "grape",
        "lemon",
        "cherry",
        "peach",
        "pear",
        "mango",
        "strawberry",
    ],
    "a color": [
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "orange",
        "black",
        "white",
        "pink",
        "brown",
    ],
    "a vehicle": [
        "car",
        "bus",
        "bicycle",
        "truck",
        "train",
        "airplane",
        "boat",
        "motorcycle",
        "ship",
        "taxi",
    ],
    "a piece of furniture": [
        "chair",
        "table",
        "sofa",
        "bed",
        "desk",
        "shelf",
        "stool",
        "cupboard",
        "dresser",
    ],
    "a musical instrument": [
        "piano",
        "guitar",
        "violin",
        "drum",
        "flute",
        "trumpet",
        "cello",
        "harp",
    ],
    "a body part": ["hand", "foot", "nose", "ear", "eye", "arm", "leg", "knee", "elbow", "finger"],
    "a drink": ["water", "milk", "tea", "coffee", "juice", "lemonade", "soda"],
}
_CATEGORY_NOUNS = {
    "an animal": "animal",
    "a fruit": "fruit",
    "a color": "color",
    "a vehicle": "vehicle",
    "a piece of furniture": "piece of furniture",
    "a musical instrument": "musical instrument",
    "a body part": "part of the body",
    "a drink": "drink",
}
_COLORS = [
    ("a ripe banana", "yellow"),
    ("grass", "green"),
    ("snow", "white"),
    ("the sky on a clear day", "blue"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("a carrot", "orange"),
    ("milk", "white"),
    ("a lemon", "yellow"),
    ("a strawberry", "red"),
    ("blood", "red"),
    ("a cucumber", "green"),
    ("chocolate", "brown"),
    ("charcoal", "black"),
    ("a fire truck", "red"),
    ("a lime", "green"),
    ("a polar bear", "white"),
    ("a crow", "black"),
    ("a pumpkin", "orange"),
    ("an eggplant", "purple"),
    ("a sunflower", "yellow"),
    ("a school bus", "yellow"),
    ("a flamingo", "pink"),
    ("coffee", "brown"),
    ("a cherry", "red"),
    ("a frog", "green"),
    ("a swan", "white"),
    ("a tree trunk", "brown"),
]
_COLOR_PHRASINGS = [
    "What color is {thing}?",
    "What is the usual color of {thing}?",
    "Name the color of {thing}.",
]

_OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("day", "night"),
    ("happy", "sad"),
    ("open", "closed"),
    ("light", "dark"),
    ("old", "young"),
    ("wet", "dry"),
    ("full", "empty"),
    ("early", "late"),
    ("tall", "short"),
    ("rich", "poor"),
    ("hard", "soft"),
    ("left", "right"),
    ("begin", "end"),
    ("win", "lose"),
    ("buy", "sell"),
    ("push", "pull"),
    ("inside", "outside"),
    ("strong", "weak"),
    ("loud", "quiet"),
    ("clean", "dirty"),
    ("first", "last"),
    ("true", "false"),
    ("thick", "thin"),
    ("north", "south"),
    ("east", "west"),
]

_SENTENCE_SUBJECTS = [
    "The cat",
    "My brother",
    "The old man",
    "Our teacher",
    "The little girl",
    "A farmer",
    "The dog",
    "My friend",
    "The doctor",
    "Her mother",
]
_SENTENCE_ACTIONS = [
    ("is sleeping on the sofa", "rest"),
    ("went to the market to buy some bread", "shopping"),
    ("likes to read books in the evening", "reading"),
    ("is drinking a cup of hot tea", "drinks"),
    ("walked to school in the rain", "weather"),
    ("plays the piano every morning", "music"),
    ("is cooking dinner for the family", "cooking"),
    ("planted tomatoes in the garden", "gardening"),
    ("watched a movie with friends last night", "movies"),
    ("opened the window to let in fresh air", "home"),
    ("is writing a letter to an old friend", "writing"),
    ("found a lost key under the table", "home"),
    ("always wakes up early on Sundays", "habits"),
    ("painted the fence white last summer", "home"),
    ("takes the bus to work every day", "travel"),
]


def general_suite(seed: int = PUBLIC_SEED) -> str:
    """The general suite as committed: header, tasks and public split (_general_all's
    hidden lines are retired: see _splits)."""
    return _without_secret(_general_all(seed))


def _general_all(seed: int) -> str:
    rng = random.Random(f"tessera:general:{seed}")
    lines = [
        _line(
            {
                "suite": "general",
                "title": "General ability",
                "description": (
                    "What the base model already does well: capital cities; colours, "
                    "opposites and categories scored by log-likelihood; and whether plain "
                    "English sentences are likelier than the same words scrambled. A drop "
                    "here means an adapter harms the model."
                ),
                "purpose": "general",
            }
        )
    ]

    # Capital cities: generated answers, scored by whether they contain the capital.
    lines.append(
        _line(
            {
                "task": "capitals",
                "title": "Capital cities",
                "description": "Name a country's capital; the answer must contain it.",
                "tags": ["general", "knowledge"],
                "metric": "contains",
                "prompt_template": "{question}",
                "max_new_tokens": 24,
            }
        )
    )
    capital_keys = [
        (country, capital, phrasing)
        for country, capital in _CAPITALS
        for phrasing in range(len(_CAPITAL_PHRASINGS))
    ]
    rng.shuffle(capital_keys)
    for index, (country, capital, phrasing) in enumerate(capital_keys[:250]):
        split = "hidden" if index < HIDDEN_PER_TASK else "public"
        question = _CAPITAL_PHRASINGS[phrasing].format(country=country)
        fields = {"question": question, "country": country}
        lines.append(
            _line({"task": "capitals", "split": split, "fields": fields, "target": capital})
        )

    # Colours of familiar things, by log-likelihood of each colour as the answer.
    lines.append(
        _line(
            {
                "task": "colors",
                "title": "Colours of familiar things",
                "description": "What colour is snow? The likeliest of four colours must be right.",
                "tags": ["general", "knowledge"],
                "metric": "multiple_choice",
                "prompt_template": "{question}",
                "max_new_tokens": 4,
            }
        )
    )
    color_items = [
        (thing, color, phrasing)
        for thing, color in _COLORS
        for phrasing in rng.sample(range(len(_COLOR_PHRASINGS)), 2)
    ]
    rng.shuffle(color_items)
    palette = sorted({color for _thing, color in _COLORS})
    for index, (thing, color, phrasing) in enumerate(color_items):
        split = "hidden" if index < len(color_items) - 10 else "public"
        choices = [color, *rng.sample([c for c in palette if c != color], 3)]
        rng.shuffle(choices)
        lines.append(
            _line(
                {
                    "task": "colors",
                    "split": split,
                    "fields": {"question": _COLOR_PHRASINGS[phrasing].format(thing=thing)},
                    "target": color,
                    "choices": choices,
                }
            )
        )

    # Opposites and odd-one-in, by log-likelihood of each choice.
    lines.append(
        _line(
            {
                "task": "common-sense-choice",
                "title": "Choose the right word",
                "description": (
                    "Opposites and categories as multiple choice (the choices are not shown); "
                    "the likeliest choice must be the right one."
                ),
                "tags": ["general", "common-sense"],
                "metric": "multiple_choice",
                "prompt_template": "{question}",
                "max_new_tokens": 4,
            }
        )
    )
    categories = sorted(_CATEGORIES)
    choice_items = []
    all_words = sorted({w for pair in _OPPOSITES for w in pair})
    for word, opposite in _OPPOSITES + [(b, a) for a, b in _OPPOSITES]:
        distractors = rng.sample([w for w in all_words if w not in (word, opposite)], 3)
        choice_items.append(
            ("What is the opposite of {}?".format(f'"{word}"'), opposite, distractors)
        )
    for category in categories:
        for thing in _CATEGORIES[category]:
            others = [
                w
                for c in categories
                if c != category
                for w in _CATEGORIES[c]
                if w not in _CATEGORIES[category]
            ]
            distractors = rng.sample(sorted(set(others)), 3)
            noun = _CATEGORY_NOUNS[category]
            choice_items.append((f"Which word names a {noun}?", thing, distractors))
    rng.shuffle(choice_items)
    for index, (question, answer, distractors) in enumerate(choice_items[:150]):
        split = "hidden" if index < 120 else "public"
        choices = [answer, *distractors]
        rng.shuffle(choices)
        fields = {"question": question}
        lines.append(
            _line(
                {
                    "task": "common-sense-choice",
                    "split": split,
                    "fields": fields,
                    "target": answer,
                    "choices": choices,
                }
            )
        )

    # Plain sentences: is a fluent reference sentence likelier than the same words
    # scrambled? Log-likelihood of reference sentences, as a 0/1 score: a raw mean
    # log-likelihood (in nats) would not share a scale with the other tasks' accuracies,
    # which the admission policy averages.
    lines.append(
        _line(
            {
                "task": "plain-sentences",
                "title": "Plain English over word salad",
                "description": (
                    "Asked for a simple sentence, the model must find a fluent reference "
                    "sentence likelier than the same words in scrambled order."
                ),
                "tags": ["general", "fluency"],
                "metric": "multiple_choice",
                "prompt_template": "Write one simple sentence about {topic}.",
                "max_new_tokens": 24,
            }
        )
    )
    sentences = [(s, a, t) for s in _SENTENCE_SUBJECTS for a, t in _SENTENCE_ACTIONS]
    rng.shuffle(sentences)
    for index, (subject, action, topic) in enumerate(sentences[:150]):
        split = "hidden" if index < 120 else "public"
        fluent = f"{subject} {action}."
        words = fluent.rstrip(".").split()
        scrambled = words[:]
        while scrambled == words:
            rng.shuffle(scrambled)
        salad = " ".join(scrambled).capitalize() + "."
        choices = [fluent, salad]
        rng.shuffle(choices)
        lines.append(
            _line(
                {
                    "task": "plain-sentences",
                    "split": split,
                    "fields": {"topic": topic},
                    "target": fluent,
                    "choices": choices,
                }
            )
        )
    return "".join(lines)


def _identity(example: dict) -> str:
    """What an example asks and answers, its wording aside where the wording is the only
    field (the general tasks), for keeping a secret split away from the public one."""
    return json.dumps([example["fields"], example["target"]], sort_keys=True)


GENERAL_HEADER_KEYS = ("suite", "title", "description", "purpose")


def general_secret(secret_seed: str, *, public_seed: int = PUBLIC_SEED) -> str:
    """The general suite's secret part: each task's hidden split drawn from ``secret_seed``
    out of the whole of that task's items less its committed public ones. The items are the
    short lists above, so what stays secret is which of them are asked, how (distractors,
    choice order, the scrambled sentence), and never the public ones; a maintainer who
    wants more provides a private file (load_suites --private)."""
    rng = random.Random(f"tessera:general:hidden:{secret_seed}")
    committed = [json.loads(line) for line in general_suite(public_seed).splitlines()]
    public = {_identity(line) for line in committed if line.get("split") == "public"}
    header = {key: committed[0][key] for key in GENERAL_HEADER_KEYS}
    lines = [_line(header)]

    def emit(task: str, items: list[dict], count: int) -> None:
        rng.shuffle(items)
        fresh = [item for item in items if _identity(item) not in public]
        seen: set = set()
        for item in fresh:
            if len(seen) == count:
                break
            if _identity(item) in seen:
                continue
            seen.add(_identity(item))
            lines.append(_line({"task": task, "split": "hidden", **item}))

    capitals = [
        {
            "fields": {"question": phrasing.format(country=country), "country": country},
            "target": capital,
        }
        for country, capital in _CAPITALS
        for phrasing in _CAPITAL_PHRASINGS
    ]
    emit("capitals", capitals, HIDDEN_PER_TASK)

    palette = sorted({color for _thing, color in _COLORS})
    colors = []
    for thing, color in _COLORS:
        for phrasing in _COLOR_PHRASINGS:
            choices = [color, *rng.sample([c for c in palette if c != color], 3)]
            rng.shuffle(choices)
            colors.append(
                {
                    "fields": {"question": phrasing.format(thing=thing)},
                    "target": color,
                    "choices": choices,
                }
            )
    emit("colors", colors, 2 * len(_COLORS) - 10)

    all_words = sorted({w for pair in _OPPOSITES for w in pair})
    choice_items = []
    for word, opposite in _OPPOSITES + [(b, a) for a, b in _OPPOSITES]:
        distractors = rng.sample([w for w in all_words if w not in (word, opposite)], 3)
        choice_items.append((f'What is the opposite of "{word}"?', opposite, distractors))
    categories = sorted(_CATEGORIES)
    for category in categories:
        others = sorted(
            {
                w
                for c in categories
                if c != category
                for w in _CATEGORIES[c]
                if w not in _CATEGORIES[category]
            }
        )
        for thing in _CATEGORIES[category]:
            noun = _CATEGORY_NOUNS[category]
            choice_items.append((f"Which word names a {noun}?", thing, rng.sample(others, 3)))
    common = []
    for question, answer, distractors in choice_items:
        choices = [answer, *distractors]
        rng.shuffle(choices)
        common.append({"fields": {"question": question}, "target": answer, "choices": choices})
    emit("common-sense-choice", common, 120)

    sentences = []
    for subject in _SENTENCE_SUBJECTS:
        for action, topic in _SENTENCE_ACTIONS:
            fluent = f"{subject} {action}."
            words = fluent.rstrip(".").split()
            scrambled = words[:]
            while scrambled == words:
                rng.shuffle(scrambled)
            choices = [fluent, " ".join(scrambled).capitalize() + "."]
            rng.shuffle(choices)
            sentences.append({"fields": {"topic": topic}, "target": fluent, "choices": choices})
    emit("plain-sentences", sentences, 120)
    return "".join(lines)


# --- The composite suite ------------------------------------------------------------------------

COMPOSITE_HIDDEN_PER_TASK = 60  # the scoreboard's union takes each split's first 60 too
COMPOSITE_PUBLIC_PER_TASK = 20
_BOUNDARY = "(?<![0-9A-Za-z])"
_BOUNDARY_END = "(?![0-9A-Za-z])"


def _found(part: str, text: str) -> bool:
    """Whether ``part`` is in ``text`` as a whole (not run on into a letter or digit), case
    aside: how the parts metric looks for it (evaluation.worker.scoring.part_found), which
    this file cannot import (it runs as a plain script)."""
    pattern = _BOUNDARY + re.escape(part.lower()) + _BOUNDARY_END
    return re.search(pattern, text.lower()) is not None


class Composite:
    """One composite task: two skills asked in one prompt, the answer on two lines. Each
    part of the target is exactly what that skill's own task would answer (computed by the
    skill's own ``fill``), so an adapter trained on one skill can answer its part."""

    slug: str
    title: str
    description: str
    skills: tuple[Skill, Skill]
    prompt_template: str
    max_new_tokens: int
    phrasings: list[str]

    @property
    def tags(self) -> list[str]:
        return ["composite", *(skill.slug for skill in self.skills)]

    def draw(self, rng: random.Random) -> tuple: ...

    def fill(self, key, phrasing: str) -> dict: ...


def _answer(skill: Skill, key) -> str:
    """What ``skill``'s own task answers for ``key`` (the phrasing does not matter)."""
    return skill.fill(key, skill.phrasings[0])["target"]


class UnitsAndDates(Composite):
    slug = "units-and-dates"
    title = "Convert a unit and reformat a date"
    description = (
        "Convert a metric amount to a smaller unit and rewrite an ISO date as "
        '"Month D, YYYY": the number on one line, the date on the next.'
    )
    skills = (UnitConversion(), DateFormatting())
    prompt_template = (
        "{question}\nAnswer on two lines: the number on the first line, then the date, "
        'like "January 5, 2020", on the second.'
    )
    max_new_tokens = 32
    phrasings = [
        "Convert {value} {source} to {dest}, and rewrite the date {date} in words.",
        "How many {dest} are in {value} {source}? Also write the ISO date {date} as a month "
        "name, day and year.",
        "Do two things: express {value} {source} in {dest}, then format the date {date} for "
        "a letter.",
        "First, what is {value} {source} in {dest}? Second, how would you write {date} in "
        "long form?",
    ]

    def draw(self, rng):
        units, dates = self.skills
        return (units.draw(rng), dates.draw(rng))

    def fill(self, key, phrasing):
        (unit, value), (year, month, day) = key
        source, dest, _factor = _UNITS[unit]
        date = f"{year:04d}-{month:02d}-{day:02d}"
        question = phrasing.format(value=value, source=source, dest=dest, date=date)
        fields = {"question": question, "value": value, "from": source, "to": dest, "date": date}
        return {
            "fields": fields,
            "parts": [_answer(self.skills[0], key[0]), _answer(self.skills[1], key[1])],
        }


class SumThenConvert(Composite):
    slug = "sum-then-convert"
    title = "Add, then convert the sum"
    description = (
        "Add two three-digit numbers, then read the sum as a metric amount and convert it "
        "to a smaller unit: the sum on one line, the converted number on the next."
    )
    skills = (Addition(), UnitConversion())
    prompt_template = (
        "{question}\nAnswer on two lines: the sum on the first line, then the converted "
        "number on the second."
    )
    max_new_tokens = 24
    phrasings = [
        "Add {a} and {b}, then convert that many {source} to {dest}.",
        "What is {a} + {b}? Then say how many {dest} are in that many {source}.",
        "Compute the sum of {a} and {b}; then express the sum, read as {source}, in {dest}.",
        "Calculate {a} plus {b}, and convert the result from {source} to {dest}.",
    ]

    def draw(self, rng):
        # The sum stays within the unit-conversion task's amounts (2 to 999).
        a = rng.randint(100, 899)
        return (a, rng.randint(100, 999 - a), rng.randrange(len(_UNITS)))

    def fill(self, key, phrasing):
        a, b, unit = key
        source, dest, _factor = _UNITS[unit]
        question = phrasing.format(a=a, b=b, source=source, dest=dest)
        fields = {"question": question, "a": a, "b": b, "from": source, "to": dest}
        total = _answer(self.skills[0], (a, b))
        return {"fields": fields, "parts": [total, _answer(self.skills[1], (unit, int(total)))]}


class WordsThenAdd(Composite):
    slug = "words-then-add"
    title = "Read a number in words, then add to it"
    description = (
        "Write a three-digit number given in English words as digits, then add a "
        "three-digit number to it: the number on one line, the sum on the next."
    )
    skills = (NumberWords(), Addition())
    prompt_template = (
        "{question}\nAnswer on two lines: the number in digits on the first line, then the "
        "sum on the second."
    )
    max_new_tokens = 20
    phrasings = [
        "Write {words} as digits, then add {b} to it.",
        'What number is "{words}"? Add {b} to that number as well.',
        "Convert the number words to a numeral: {words}. Then compute the sum of that number "
        "and {b}.",
        'Turn "{words}" into a number, and then calculate it plus {b}.',
    ]

    def draw(self, rng):
        return (rng.randint(100, 999), rng.randint(100, 999))

    def fill(self, key, phrasing):
        a, b = key
        words = number_to_words(a)
        question = phrasing.format(words=words, b=b)
        fields = {"question": question, "words": words, "b": b}
        return {
            "fields": fields,
            "parts": [_answer(self.skills[0], a), _answer(self.skills[1], key)],
        }


class SortAndReverse(Composite):
    slug = "sort-and-reverse"
    title = "Sort numbers and reverse words"
    description = (
        "Sort four to six numbers in ascending order and write three to five words in "
        "reverse order: the sorted numbers on one line, the words on the next."
    )
    skills = (Sorting(), WordReversal())
    prompt_template = (
        "{question}\nAnswer on two lines: the sorted numbers, separated by commas, on the "
        "first line, then the words in their new order on the second."
    )
    max_new_tokens = 40
    phrasings = [
        "Sort these numbers in ascending order: {numbers}. Then reverse the order of these "
        "words: {words}",
        "Arrange {numbers} from smallest to largest, and write these words in reverse order: "
        "{words}",
        "Two tasks. Put the following numbers in increasing order: {numbers}. List the "
        "following words from last to first: {words}",
    ]

    def draw(self, rng):
        numbers, words = self.skills
        return (numbers.draw(rng), words.draw(rng))

    def fill(self, key, phrasing):
        numbers, words = key
        listed = ", ".join(str(n) for n in numbers)
        question = phrasing.format(numbers=listed, words=" ".join(words))
        fields = {"question": question, "numbers": listed, "words": " ".join(words)}
        parts = [_answer(self.skills[0], numbers), _answer(self.skills[1], words)]
        return {"fields": fields, "parts": parts}


COMPOSITES: list[Composite] = [
    UnitsAndDates(),
    SumThenConvert(),
    WordsThenAdd(),
    SortAndReverse(),
]


def _composite_task_line(task: Composite) -> dict:
    return {
        "task": task.slug,
        "title": task.title,
        "description": task.description,
        "tags": task.tags,
        "metric": "parts",
        "prompt_template": task.prompt_template,
        "max_new_tokens": task.max_new_tokens,
    }


def _composite_examples(
    task: Composite, rng: random.Random, count: int, *, avoid: frozenset = frozenset()
) -> list[dict]:
    """``count`` examples on distinct keys from ``rng``, none on a key whose example (its
    wording aside) is in ``avoid``. A key is skipped when a part is in the question already
    (a model repeating the prompt would score) or inside the other part (it would be found
    whenever that one is; suite_io refuses it)."""
    seen: set = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could not draw {count} {task.slug} examples")
        key = task.draw(rng)
        if key in seen:
            continue
        example = task.fill(key, rng.choice(task.phrasings))
        first, second = example["parts"]
        question = example["fields"]["question"]
        if _found(first, question) or _found(second, question):
            continue
        if _found(first, second) or _found(second, first):
            continue
        example = {"fields": example["fields"], "target": PARTS_SEPARATOR.join(example["parts"])}
        if _composite_identity(example) in avoid:
            continue
        seen.add(key)
        out.append(example)
    return out


def _composite_identity(example: dict) -> str:
    fields = {k: v for k, v in example["fields"].items() if k != "question"}
    return json.dumps(fields, sort_keys=True)


def _composite_committed(task: Composite, public_seed: int) -> list[dict]:
    """The public seed's draw: COMPOSITE_HIDDEN_PER_TASK retired examples (see _splits),
    then the COMPOSITE_PUBLIC_PER_TASK public ones."""
    rng = random.Random(f"tessera:composite:{task.slug}:{public_seed}")
    return _composite_examples(task, rng, COMPOSITE_HIDDEN_PER_TASK + COMPOSITE_PUBLIC_PER_TASK)


def composite_lines(task: Composite, seed: int = PUBLIC_SEED) -> list[str]:
    """The task line, then its COMPOSITE_PUBLIC_PER_TASK public examples, as committed."""
    public = _composite_committed(task, seed)[COMPOSITE_HIDDEN_PER_TASK:]
    lines = [_line(_composite_task_line(task))]
    lines += [_line({"task": task.slug, "split": "public", **example}) for example in public]
    return lines


def composite_secret(secret_seed: str, *, public_seed: int = PUBLIC_SEED) -> str:
    """The composite suite's secret part: COMPOSITE_HIDDEN_PER_TASK hidden examples a task,
    from ``secret_seed``, on keys that neither its public nor its retired examples use."""
    lines = [_line(COMPOSITE_HEADER)]
    for task in COMPOSITES:
        avoid = frozenset(_composite_identity(e) for e in _composite_committed(task, public_seed))
        rng = random.Random(f"tessera:composite:{task.slug}:hidden:{secret_seed}")
        for example in _composite_examples(task, rng, COMPOSITE_HIDDEN_PER_TASK, avoid=avoid):
            lines.append(_line({"task": task.slug, "split": "hidden", **example}))
    return "".join(lines)


COMPOSITE_HEADER = {
    "suite": "composite",
    "title": "Two skills in one answer",
    "description": (
        "Each prompt asks for two of the skills at once (convert and reformat a date, add "
        "then convert, read a number then add, sort and reverse), each part in the format "
        "that skill's own task answers in, on a line of its own. Scored per part; never "
        "part of an adapter's admission: it judges composed mixtures."
    ),
    "purpose": "composite",
}


def composite_suite(seed: int = PUBLIC_SEED) -> str:
    lines = [_line(COMPOSITE_HEADER)]
    for task in COMPOSITES:
        lines += composite_lines(task, seed)
    return "".join(lines)


# --- Replay prompts -----------------------------------------------------------------------------

# Everyday requests unrelated to any suite (no capitals, colours, opposites or "write one
# sentence" requests: the general suite must stay a held-out check). Training replays the
# base model's own answers to them, so a narrow adapter keeps answering ordinary requests
# the way the base model does instead of answering everything in its skill's format.
_REPLAY_TEMPLATES = [
    (
        "What is {thing} used for?",
        [
            "a hammer",
            "an umbrella",
            "a ladder",
            "a spoon",
            "a key",
            "a map",
            "a compass",
            "a broom",
            "a kettle",
            "a microscope",
            "a thermometer",
            "glue",
            "a calendar",
            "a pillow",
            "a shovel",
            "soap",
        ],
    ),
    (
        "Tell me one interesting fact about {animal}.",
        [
            "owls",
            "dolphins",
            "bees",
            "camels",
            "penguins",
            "octopuses",
            "giraffes",
            "ants",
            "bats",
            "horses",
            "sharks",
            "parrots",
        ],
    ),
    (
        "Explain {concept} in simple words.",
        [
            "gravity",
            "photosynthesis",
            "a vaccine",
            "inflation",
            "a volcano",
            "electricity",
            "recycling",
            "an election",
            "a rainbow",
            "the water cycle",
            "a computer program",
            "friction",
            "erosion",
            "a habit",
        ],
    ),
    (
        "What does a {job} do?",
        [
            "baker",
            "nurse",
            "pilot",
            "librarian",
            "plumber",
            "judge",
            "gardener",
            "firefighter",
            "architect",
            "journalist",
            "mechanic",
            "chemist",
        ],
    ),
    (
        "How do I {task}?",
        [
            "boil an egg",
            "plant a seed",
            "write a thank-you note",
            "make a cup of tea",
            "fall asleep faster",
            "start running",
            "save money",
            "learn new words",
            "clean a window",
            "wrap a present",
            "fix a flat bicycle tire",
            "remember a name",
        ],
    ),
    (
        "Give me one tip for {goal}.",
        [
            "studying for an exam",
            "a job interview",
            "staying healthy",
            "cooking rice",
            "keeping a plant alive",
            "a long flight",
            "speaking in public",
            "reading more books",
            "working from home",
            "a rainy day",
        ],
    ),
    (
        "Why do {subject}?",
        [
            "leaves fall in autumn",
            "people yawn",
            "birds migrate",
            "cats purr",
            "we need sleep",
            "bread rise",
            "ships float",
            "stars twinkle",
            "onions make us cry",
            "we dream",
        ],
    ),
    (
        "Can you suggest a name for {pet}?",
        ["a small dog", "a black cat", "a goldfish", "a parrot", "a rabbit", "a turtle"],
    ),
    (
        "Describe {place} in a few words.",
        [
            "a busy market",
            "a quiet library",
            "a mountain village",
            "an old castle",
            "a train station",
            "a school playground",
            "a sandy beach",
            "a thick forest",
        ],
    ),
    (
        "What should I pack for {trip}?",
        ["a beach holiday", "a ski trip", "a camping weekend", "a business trip", "a hiking day"],
    ),
]


def replay_prompts(seed: int) -> str:
    rng = random.Random(f"tessera:replay:{seed}")
    prompts = [
        template.format(**{template[template.index("{") + 1 : template.index("}")]: filler})
        for template, fillers in _REPLAY_TEMPLATES
        for filler in fillers
    ]
    rng.shuffle(prompts)
    return "".join(_line({"prompt": prompt}) for prompt in prompts)


# --- Entry point --------------------------------------------------------------------------------

SECRET_SPLITS = ("hidden", "paraphrase")


def _without_secret(text: str) -> str:
    return "".join(
        line + "\n"
        for line in text.splitlines()
        if json.loads(line).get("split") not in SECRET_SPLITS
    )


def generate(out_dir: Path, *, seed: int = PUBLIC_SEED) -> list[Path]:
    """Write every committed file under ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    written = []
    for skill in SKILLS:
        suite, train = skill_files(skill, seed)
        for path, text in (
            (out_dir / f"{skill.slug}.jsonl", suite),
            (out_dir / "train" / f"{skill.slug}.jsonl", train),
        ):
            path.write_text(text, encoding="utf-8", newline="\n")
            written.append(path)
    path = out_dir / "train" / "replay.jsonl"
    path.write_text(replay_prompts(seed), encoding="utf-8", newline="\n")
    written.append(path)
    path = out_dir / "general.jsonl"
    path.write_text(general_suite(seed), encoding="utf-8", newline="\n")
    written.append(path)
    path = out_dir / "composite.jsonl"
    path.write_text(composite_suite(seed), encoding="utf-8", newline="\n")
    written.append(path)
    return written


def secret_suites(secret_seed: str, *, public_seed: int = PUBLIC_SEED) -> dict[str, str]:
    """Every built-in suite's secret part, by suite slug: what ``load_suites`` merges into
    the committed files, in the format of its ``--private`` files."""
    if not str(secret_seed):
        raise ValueError("the secret seed is empty")
    parts = {
        skill.slug: skill_secret(skill, secret_seed, public_seed=public_seed) for skill in SKILLS
    }
    parts["general"] = general_secret(secret_seed, public_seed=public_seed)
    parts["composite"] = composite_secret(secret_seed, public_seed=public_seed)
    return parts


def write_secret(out_dir: Path, *, secret_seed: str) -> list[Path]:
    """Write each suite's secret part to ``out_dir/<suite>.jsonl`` (private files for
    ``load_suites --private``); never into this folder, whose files are committed."""
    out_dir = Path(out_dir).resolve()
    if out_dir == HERE or HERE in out_dir.parents:
        raise SystemExit(f"refusing to write secret splits under {HERE}: its files are committed")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for slug, text in secret_suites(secret_seed).items():
        path = out_dir / f"{slug}.jsonl"
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: here)")
    parser.add_argument("--seed", type=int, default=PUBLIC_SEED, help="the committed files' seed")
    parser.add_argument(
        "--secret-out",
        type=Path,
        help="write the secret splits (private files) to this folder instead, from the "
        "secret seed in the TESSERA_SUITE_SEED environment variable",
    )
    args = parser.parse_args()
    if args.secret_out is not None:
        secret_seed = os.environ.get("TESSERA_SUITE_SEED", "")
        if not secret_seed:
            raise SystemExit("set TESSERA_SUITE_SEED to the secret seed")
        for path in write_secret(args.secret_out, secret_seed=secret_seed):
            print(path)
        return
    for path in generate(args.out, seed=args.seed):
        print(path)


if __name__ == "__main__":
    main()
