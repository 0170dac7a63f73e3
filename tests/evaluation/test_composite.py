"""The composite suite (two skills in one answer) and its ``parts`` metric: the generator is
deterministic, each part is the single-skill answer (recomputed here from the example's
fields, not by the generator's code), the metric counts whole parts after normalisation,
suite files refuse malformed parts targets, and the suite stays out of admission and of
the union while composite_splits() exposes it."""

from __future__ import annotations

import datetime
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from evaluation import selectors
from evaluation.models import Example, Outcome, Suite, Task
from evaluation.services import outcomes
from evaluation.services.plans import plan_for, union_examples
from evaluation.suite_io import PURPOSES, parse_suite_jsonl
from evaluation.suites import complete_suite
from evaluation.suites_selectors import tasks_targeted
from evaluation.worker import scoring
from evaluation.worker.scoring import (
    GENERATIVE_METRICS,
    METRICS,
    normalize_answer,
    part_found,
    parts,
    score_task,
    target_parts,
)
from evaluation.worker.specs import ExampleSpec, TaskSpec
from tessera.errors import DomainError
from tests.evaluation.test_runs import make_task, upload_version
from tests.evaluation.test_scoring import TEMPLATE, answers_of, tiny  # noqa: F401 (fixture)

SUITES_DIR = Path(settings.BASE_DIR) / "evaluation" / "suites"
COMPOSITE_TASKS = {
    "units-and-dates": ("unit-conversion", "date-formatting"),
    "sum-then-convert": ("addition", "unit-conversion"),
    "words-then-add": ("number-words", "addition"),
    "sort-and-reverse": ("sorting", "word-reversal"),
}
# The metric conversions, written out again rather than read from the generator.
FACTORS = {
    ("kilometers", "meters"): 1000,
    ("kilograms", "grams"): 1000,
    ("liters", "milliliters"): 1000,
    ("meters", "centimeters"): 100,
    ("centimeters", "millimeters"): 10,
    ("tonnes", "kilograms"): 1000,
    ("kilobytes", "bytes"): 1000,
    ("meters", "millimeters"): 1000,
}
_SMALL = [
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
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# What each skill's own task answers look like; checked against the skill's own suite file.
ANSWER_FORMS = {
    "addition": r"\d+",
    "unit-conversion": r"\d+",
    "number-words": r"\d+",
    "date-formatting": r"(January|February|March|April|May|June|July|August|September|"
    r"October|November|December) [1-9]\d?, \d{4}",
    "sorting": r"\d+(, \d+)+",
    "word-reversal": r"[a-z]+( [a-z]+)+",
}


def words_to_number(words: str) -> int:
    total = current = 0
    for word in words.replace("-", " ").split():
        if word in _SMALL:
            current += _SMALL.index(word)
        elif word in _TENS:
            current += 20 + 10 * _TENS.index(word)
        elif word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            raise ValueError(word)
    return total + current


def long_date(iso: str) -> str:
    day = datetime.date.fromisoformat(iso)
    month = [
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
    ][day.month - 1]
    return f"{month} {day.day}, {day.year}"


def expected_parts(task: str, fields: dict) -> list[str]:
    if task == "units-and-dates":
        converted = fields["value"] * FACTORS[(fields["from"], fields["to"])]
        return [str(converted), long_date(fields["date"])]
    if task == "sum-then-convert":
        total = fields["a"] + fields["b"]
        return [str(total), str(total * FACTORS[(fields["from"], fields["to"])])]
    if task == "words-then-add":
        number = words_to_number(fields["words"])
        return [str(number), str(number + fields["b"])]
    if task == "sort-and-reverse":
        numbers = sorted(int(n) for n in fields["numbers"].split(", "))
        return [", ".join(map(str, numbers)), " ".join(reversed(fields["words"].split()))]
    raise AssertionError(task)


def committed():
    """The composite suite whole: its committed public part and the test seed's hidden one."""
    return parse_suite_jsonl(complete_suite(SUITES_DIR / "composite.jsonl"))


def _load_generator():
    spec = importlib.util.spec_from_file_location("suites_generate", SUITES_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()


# --- The generated suite ------------------------------------------------------------------------


def test_the_composite_suite_is_generated_deterministically():
    text = GENERATOR.composite_suite(0)
    assert text == GENERATOR.composite_suite(0)
    assert text.encode() == (SUITES_DIR / "composite.jsonl").read_bytes()
    assert GENERATOR.composite_suite(1) != text


def test_the_suite_holds_the_composite_tasks_scored_by_parts_with_enough_examples():
    suite = committed()
    assert (suite.slug, suite.purpose) == ("composite", "composite")
    assert [task.slug for task in suite.tasks] == list(COMPOSITE_TASKS)
    for task in suite.tasks:
        assert task.metric == "parts"
        assert task.tags == ["composite", *COMPOSITE_TASKS[task.slug]]
        assert len(task.split("hidden")) >= 40 and len(task.split("public")) >= 10
        assert not task.split("paraphrase")
        hidden = {json.dumps(e.fields, sort_keys=True) for e in task.split("hidden")}
        public = {json.dumps(e.fields, sort_keys=True) for e in task.split("public")}
        assert len(hidden) == len(task.split("hidden")) and not hidden & public
        # The answer is asked for on two lines.
        assert "two lines" in task.prompt_template


def test_each_part_is_the_single_skill_answer_in_that_skills_own_format():
    for skill in {s for pair in COMPOSITE_TASKS.values() for s in pair}:
        own = parse_suite_jsonl(complete_suite(SUITES_DIR / f"{skill}.jsonl")).tasks[0]
        assert all(re.fullmatch(ANSWER_FORMS[skill], e.target) for e in own.examples), skill
    for task in committed().tasks:
        for example in task.examples:
            got = example.target.split("\n")
            assert got == expected_parts(task.slug, example.fields), example.line
            assert target_parts(example.target) == got
            for part, skill in zip(got, COMPOSITE_TASKS[task.slug], strict=True):
                assert re.fullmatch(ANSWER_FORMS[skill], part), (example.line, part)
                # A model repeating the prompt must not score a part.
                assert not part_found(part, example.fields["question"]), example.line
            assert parts(example.target, example.target) == 1.0


# --- The parts metric ---------------------------------------------------------------------------

TARGET = "12000\nMarch 5, 2024"


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("12000\nMarch 5, 2024", 1.0),
        ("12000", 0.5),
        ("March 5, 2024", 0.5),
        ("", 0.0),
        ("I cannot say.", 0.0),
        # contains's normalisation, over every line: case, spaces, trailing punctuation.
        ("  The answer is 12000.\n\n  MARCH   5,  2024!  ", 1.0),
        ("12000 metres, and the date is march 5, 2024.", 1.0),
        ("March 5, 2024\n12000", 1.0),  # order does not matter
        ("12000\nMarch\n5, 2024", 1.0),  # a part broken over lines is still whole
        # A part must not run on into a letter or digit.
        ("120000\nMarch 5, 2024", 0.5),
        ("12000\nMarch 5, 20245", 0.5),
        ("112000\nMarch 15, 2024", 0.0),
        ("12000m\nMarch 5, 2024", 0.5),
    ],
)
def test_the_share_of_parts_found_in_the_answer(answer: str, score: float):
    assert parts(answer, TARGET) == score


def test_a_chained_tasks_first_part_is_not_found_inside_its_second():
    target = "742\n742000"
    assert parts("742000", target) == 0.5
    assert parts("742", target) == 0.5
    assert parts("The sum is 742.\nThat makes 742000 metres.", target) == 1.0
    assert parts("1742\n742000", target) == 0.5


def test_the_target_is_read_as_stripped_non_blank_lines():
    assert target_parts("  12000 \n\n March 5, 2024 \n") == ["12000", "March 5, 2024"]
    assert parts("12000 march 5, 2024", "  12000 \n\n March 5, 2024 \n") == 1.0
    assert parts("a b", "a\nb\nc") == pytest.approx(2 / 3)
    assert parts("anything", "") == 0.0
    assert parts("anything", " \n \n") == 0.0
    # A part that normalises to nothing is never found.
    assert not part_found("...", "...")
    # Parts with punctuation at their edges match as written.
    assert part_found("(b)", "answer: (b)") and part_found("3, 15, 42", "3, 15, 42, 57")
    assert normalize_answer("  March 5, 2024. ") == "march 5, 2024"


def test_parts_is_a_known_generative_metric_everywhere_metrics_are_listed():
    assert "parts" in METRICS and "parts" in GENERATIVE_METRICS
    assert {choice for choice, _label in Task.Metric.choices} == set(METRICS)
    assert {choice for choice, _label in Suite.Purpose.choices} == set(PURPOSES)
    assert "composite" in PURPOSES


class _EchoTokenizer:
    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        return messages[0]["content"]


class _Model:
    training = False

    def eval(self):
        return self


def test_score_task_returns_a_score_per_example_through_the_generative_path(monkeypatch):
    said = {
        "Q: one": "12000\nMarch 5, 2024",
        "Q: two": "The number is 12000.",
        "Q: three": "no idea",
    }
    seen = {}

    def generate(model, tokenizer, prompts, *, max_new_tokens, **kwargs):
        seen["max_new_tokens"] = max_new_tokens
        return [said[prompt] for prompt in prompts]

    monkeypatch.setattr(scoring, "generate_answers", generate)
    task = TaskSpec(
        key="task:1:hidden",
        metric="parts",
        prompt_template="Q: {q}",
        max_new_tokens=32,
        examples=[ExampleSpec(fields={"q": q}, target=TARGET) for q in ("one", "two", "three")],
    )
    assert score_task(_Model(), _EchoTokenizer(), task, batch_size=2) == [1.0, 0.5, 0.0]
    assert seen["max_new_tokens"] == 32


def test_the_tiny_models_own_answers_score_per_part(tiny):  # noqa: F811 (the fixture)
    model, tokenizer = tiny
    questions = ["What is 123 + 456?", "Add 7 and 8.", "The capital of France is?", "hello"]
    answers = answers_of(model, tokenizer, questions, max_new_tokens=6)
    usable = [(q, a) for q, a in zip(questions, answers, strict=True) if normalize_answer(a)]
    assert len(usable) >= 2
    examples = [
        ExampleSpec(fields={"question": q}, target=f"{normalize_answer(a)}\nzebra-never-said")
        for q, a in usable
    ]
    examples.append(ExampleSpec(fields={"question": usable[0][0]}, target="zebra\nokapi-qq"))
    task = TaskSpec(
        key="test:parts",
        metric="parts",
        prompt_template=TEMPLATE,
        max_new_tokens=6,
        examples=examples,
    )
    assert score_task(model, tokenizer, task, batch_size=3) == [0.5] * len(usable) + [0.0]


# --- Suite files refuse malformed parts targets ----------------------------------------------


def parts_suite(target: str, *, purpose: str = "composite") -> bytes:
    lines = [
        {"suite": "combo", "title": "Combo", "description": "", "purpose": purpose},
        {
            "task": "pair",
            "title": "Pair",
            "tags": ["composite"],
            "metric": "parts",
            "prompt_template": "{question}",
            "max_new_tokens": 16,
        },
    ]
    for split, count in (("hidden", 30), ("public", 5)):
        for i in range(count):
            fields = {"question": f"Add {i} and 1000, then say hello {split}."}
            lines.append(
                {"task": "pair", "split": split, "fields": fields, "target": f"{i + 1000}\nhello"}
            )
    lines[2]["target"] = target
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_a_well_formed_parts_suite_parses():
    parsed = parse_suite_jsonl(parts_suite("742\n742000"))
    assert parsed.purpose == "composite"
    assert parsed.tasks[0].examples[0].target == "742\n742000"


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("12000", "two or more parts"),
        ("12000\n\nMarch 5, 2024", "Part 2 of the target is blank"),
        ("12000\n  ", "Part 2 of the target is blank"),
        ("12000\n...", "Part 2 of the target is blank (or only punctuation)"),
        ("12000\n12000.", "Part 2 of the target ('12000.') repeats an earlier part"),
        ("March\nmarch", "repeats an earlier part"),
        ("5\nMarch 5, 2024", "Part 1 of the target ('5') is inside part 2"),
        ("March 5, 2024\n5", "Part 2 of the target ('5') is inside part 1"),
    ],
)
def test_a_malformed_parts_target_is_refused_with_a_clear_error(target: str, words: str):
    with pytest.raises(DomainError) as caught:
        parse_suite_jsonl(parts_suite(target))
    assert caught.value.code == "suite_parts_invalid"
    assert words in caught.value.message
    assert caught.value.details["line"] == 3


def test_only_parts_tasks_have_their_targets_split_into_parts():
    data = parts_suite("12000").replace(b'"metric": "parts"', b'"metric": "contains"')
    assert parse_suite_jsonl(data).tasks[0].examples[0].target == "12000"


# --- Apart from admission and the union ---------------------------------------------------------


@pytest.fixture
def no_runs(monkeypatch):
    from evaluation.tasks import evaluate_run

    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)


@pytest.mark.django_db
def test_the_built_in_composite_suite_is_for_mixtures_only():
    call_command("load_suites", stdout=io.StringIO())
    composite = list(
        Task.objects.filter(
            suite_version__suite__slug="composite", suite_version__is_current=True
        ).order_by("slug")
    )
    assert [t.slug for t in composite] == sorted(COMPOSITE_TASKS)
    assert {t.suite_version.suite.purpose for t in composite} == {"composite"}
    ids = {t.pk for t in composite}
    assert [t.pk for t in selectors.tasks_composite()] == [t.pk for t in composite]
    assert not ids & {t.pk for t in selectors.tasks_skill()}
    assert not ids & {t.pk for t in selectors.tasks_general()}
    every_tag = sorted({tag for t in composite for tag in t.tags})
    assert not ids & {t.pk for t in tasks_targeted(tags=every_tag)}
    assert "composite" not in selectors.task_tags_available()

    assert not ids & {split.task.pk for split in outcomes.union_splits()}
    assert not ids & {split.task.pk for split in outcomes.public_splits()}
    splits = outcomes.composite_splits()
    assert [(s.task.slug, s.split) for s in splits] == [
        (slug, "hidden") for slug in sorted(COMPOSITE_TASKS)
    ]
    for split in splits:
        hidden = Example.objects.filter(task=split.task, split="hidden").order_by("position")
        assert split.example_ids == [e.pk for e in hidden][: union_examples()]
        assert [e.target for e in split.examples] == [e.target for e in hidden][: union_examples()]
        assert split.key == f"task:{split.task.pk}:hidden"
        assert split.prompts()[0] == split.task.prompt_template.format_map(hidden[0].fields)
        assert all(len(target_parts(e.target)) == 2 for e in split.examples)


def test_composite_splits_take_the_unions_cap(db, settings):
    settings.TESSERA_EVAL_UNION_EXAMPLES = 5
    task = make_task(suite="combo", purpose=Suite.Purpose.COMPOSITE, slug="pair", metric="parts")
    make_task(suite="combo", slug="loglik", metric="mean_loglik")  # not a 0-1 score: left out
    assert [(s.task.pk, len(s.example_ids)) for s in outcomes.composite_splits()] == [(task.pk, 5)]
    assert outcomes.union_splits() == []


def test_admission_never_measures_a_composite_task_even_one_with_the_adapters_tags(
    db, tiny_base_model, contributor, fast_eval, no_runs, settings
):
    settings.TESSERA_EVAL_UNION = True
    skill = make_task()  # addition, tagged "arithmetic" like the upload
    general = make_task(suite="general", purpose=Suite.Purpose.GENERAL, slug="general-qa")
    composite = make_task(
        suite="combo", purpose=Suite.Purpose.COMPOSITE, slug="pair", tags=("arithmetic",)
    )
    version = upload_version(contributor, tags=("arithmetic",), variant=0)
    plan = plan_for(version)
    assert composite.pk not in {m.task.pk for m in plan.measures}
    assert [t.pk for t in plan.targeted] == [skill.pk]
    assert [t.pk for t in plan.general] == [general.pk]


def test_missing_composite_outcomes_are_measured_per_example_in_the_sandbox(
    db, tiny_base_model, contributor, fast_eval, no_runs
):
    task = make_task(
        suite="combo",
        purpose=Suite.Purpose.COMPOSITE,
        slug="pair",
        metric="parts",
        hidden=[{"a": 100 + i, "b": 7} for i in range(4)],
        max_new_tokens=4,
    )
    Example.objects.filter(task=task, split="hidden").update(target="107\nzebra-never-said")
    version = upload_version(contributor, variant=0)
    splits = outcomes.composite_splits()
    assert [s.task.pk for s in splits] == [task.pk]
    measure = {"base_model": tiny_base_model, "versions": [version], "splits": splits}
    assert outcomes.outcomes_measure(**measure) == {}
    for model in (version, None):
        stored = Outcome.objects.filter(version=model, example_id__in=splits[0].example_ids)
        assert stored.count() == 4
        # The tiny random model never says "zebra-never-said": at most half of each.
        assert all(o.score in (0.0, 0.5) for o in stored)
