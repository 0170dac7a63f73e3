"""Benchmark suites: the built-in files and their generator, JSONL validation, versioned
import (services.suites), `load_suites`, the suites API and the admin upload form. The
built-in files hold public splits only; their secret splits come from the fixed test seed
(tests/conftest.py; tests/evaluation/test_secret_splits.py checks how they are drawn).

Hidden examples decide admission, so every read path is checked for leaks with suites whose
hidden content is unmistakable; the paraphrase split is hidden in the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse
from rest_framework.test import APIClient

from evaluation.management.commands.load_suites import SAMPLE
from evaluation.models import Example, Suite, SuiteVersion, Task
from evaluation.services.suites import (
    suite_version_create,
    suite_version_import,
    suite_version_lock,
)
from evaluation.suite_io import MIN_EXAMPLES, ParsedExample, ParsedTask, parse_suite_jsonl
from evaluation.suites import complete_suite
from evaluation.suites_selectors import task_examples, task_split_template
from tessera.errors import DomainError
from tests.factories import UserFactory

SUITES_DIR = Path(settings.BASE_DIR) / "evaluation" / "suites"
SKILL_TAGS = {
    "addition",
    "word-reversal",
    "unit-conversion",
    "date-formatting",
    "number-words",
    "sorting",
}


# --- Building suite files -----------------------------------------------------------------------


def quiz_lines(
    *,
    slug: str = "quiz",
    hidden: int = MIN_EXAMPLES["hidden"],
    public: int = MIN_EXAMPLES["public"],
    purpose: str = "skill",
    title: str = "A quiz",
    paraphrase: int = 0,
) -> list[dict]:
    lines: list[dict] = [
        {"suite": slug, "title": title, "description": "Test suite.", "purpose": purpose},
        {
            "task": "echo",
            "title": "Echo",
            "tags": ["echo", "testing"],
            "metric": "exact_match",
            "prompt_template": "Say {word}.",
            "max_new_tokens": 4,
        },
        {
            "task": "pick",
            "title": "Pick",
            "tags": ["picking"],
            "metric": "multiple_choice",
            "prompt_template": "Pick {word}: {options}",
            "max_new_tokens": 2,
        },
    ]
    for task in ("echo", "pick"):
        for i in range(hidden):
            secret = f"HIDDEN-{task}-{i:03d}-zebra"
            example = {
                "task": task,
                "split": "hidden",
                "fields": {"word": f"secret-prompt-{task}-{i}", "options": "a or b"},
                "target": secret,
            }
            if task == "pick":
                example["choices"] = [secret, "decoy"]
            lines.append(example)
        for i in range(public):
            answer = f"public-{task}-{i}"
            example = {
                "task": task,
                "split": "public",
                "fields": {"word": f"open-{task}-{i}", "options": "a or b"},
                "target": answer,
            }
            if task == "pick":
                example["choices"] = [answer, "decoy"]
            lines.append(example)
        for i in range(paraphrase):
            secret = f"PARAPHRASE-{task}-{i:03d}-okapi"
            example = {
                "task": task,
                "split": "paraphrase",
                "prompt_template": "{question}",
                "fields": {"question": f"Would you kindly repeat unicorn-{task}-{i}?"},
                "target": secret,
            }
            if task == "pick":
                example["choices"] = [secret, "decoy"]
            lines.append(example)
    return lines


def jsonl(lines: list) -> bytes:
    return "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()


def hidden_strings(lines: list[dict]) -> list[str]:
    """What no public read may show: hidden and paraphrase targets and field values."""
    out = []
    for line in lines:
        if line.get("split") in {"hidden", "paraphrase"}:
            out += [line["target"], *line["fields"].values()]
    return [s for s in out if isinstance(s, str) and s not in {"a or b"}]


def stored_counts() -> tuple[int, int, int, int]:
    return (
        Suite.objects.count(),
        SuiteVersion.objects.count(),
        Task.objects.count(),
        Example.objects.count(),
    )


def built_in(name: str) -> bytes:
    """A built-in suite whole: its committed file and the test seed's secret splits."""
    return complete_suite(SUITES_DIR / f"{name}.jsonl")


def snapshot(version: SuiteVersion) -> list:
    return [
        (
            t.slug,
            t.metric,
            t.prompt_template,
            t.tags,
            [
                (e.split, e.position, e.fields, e.target, e.choices)
                for e in t.examples.order_by("split", "position")
            ],
        )
        for t in version.tasks.order_by("slug")
    ]


# --- The built-in suites ------------------------------------------------------------------------


def test_the_generator_rewrites_the_committed_files_byte_for_byte(tmp_path: Path):
    subprocess.run(
        [sys.executable, str(SUITES_DIR / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )

    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    committed = sorted(p.relative_to(SUITES_DIR) for p in SUITES_DIR.rglob("*.jsonl"))
    assert generated == committed
    # Six skills (suite + training file each), general, composite, and the replay prompts.
    assert len(generated) == 15
    for relative in generated:
        assert (tmp_path / relative).read_bytes() == (SUITES_DIR / relative).read_bytes(), relative


def test_training_files_are_disjoint_from_the_evaluation_splits():
    for skill in SKILL_TAGS:
        suite = parse_suite_jsonl(built_in(skill))
        train = parse_suite_jsonl(
            (SUITES_DIR / "train" / f"{skill}.jsonl").read_bytes(),
            splits=("train",),
            min_examples={},
        )

        def key(example) -> str:
            return json.dumps({k: v for k, v in example.fields.items() if k != "question"})

        evaluated = {key(e) for t in suite.tasks for e in t.examples}
        trained = {key(e) for t in train.tasks for e in t.examples}
        assert len(trained) >= 2000
        assert not evaluated & trained, skill
        hidden = {key(e) for e in suite.tasks[0].split("hidden")}
        public = {key(e) for e in suite.tasks[0].split("public")}
        assert not hidden & public, skill


def _load_generator():
    spec = importlib.util.spec_from_file_location("suites_generate", SUITES_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()


def skill_suite(skill: str) -> ParsedTask:
    return parse_suite_jsonl(built_in(skill)).tasks[0]


def skill_train(skill: str) -> ParsedTask:
    data = (SUITES_DIR / "train" / f"{skill}.jsonl").read_bytes()
    return parse_suite_jsonl(data, splits=("train",), min_examples={}).tasks[0]


def rendered(task: ParsedTask, example: ParsedExample) -> str:
    return (example.prompt_template or task.prompt_template).format_map(example.fields)


def phrasing_skeleton(text: str, values: set[str]) -> str:
    """A prompt's words with its numbers and field values masked, runs of masks made one:
    two prompts with one skeleton use one phrasing. Masking every word any example uses
    as a value (not only this prompt's) can only make two skeletons more alike."""
    out: list[str] = []
    for token in re.findall(r"[a-z]+|\d+", text.lower()):
        word = "_" if token.isdigit() or token in values else token
        if not (word == "_" and out and out[-1] == "_"):
            out.append(word)
    return " ".join(out)


def value_words(*tasks: ParsedTask) -> set[str]:
    return {
        word
        for task in tasks
        for example in task.examples
        for name, value in example.fields.items()
        if name != "question" and isinstance(value, str)
        for word in re.findall(r"[a-z]+", value.lower())
    }


def demo_example_prompts() -> list[str]:
    paths = sorted((Path(settings.BASE_DIR) / "demo" / "adapters").glob("*/metadata.json"))
    return [p for path in paths for p in json.loads(path.read_text())["example_prompts"]]


def answer_shape(target: str) -> str:
    return re.sub(r"[A-Za-z]+", "w", re.sub(r"\d+", "9", target))


def expected_target(skill: str, fields: dict) -> str:
    """The answer worked out from the fields alone, as the task states it."""
    if skill == "addition":
        return str(fields["a"] + fields["b"])
    if skill == "sorting":
        return ", ".join(str(n) for n in sorted(int(n) for n in fields["numbers"].split(", ")))
    if skill == "word-reversal":
        return " ".join(fields["words"].split()[::-1])
    if skill == "unit-conversion":
        factor = {(f, t): k for f, t, k in GENERATOR._UNITS}[(fields["from"], fields["to"])]
        return str(fields["value"] * factor)
    if skill == "date-formatting":
        year, month, day = (int(part) for part in fields["date"].split("-"))
        return f"{GENERATOR._MONTHS[month - 1]} {day}, {year}"
    if skill == "number-words":
        by_words = {GENERATOR.number_to_words(n): n for n in range(10, 10_000)}
        return str(by_words[fields["words"]])
    raise AssertionError(skill)


def test_every_skill_has_a_paraphrase_split_of_fifty_examples_in_ten_phrasings_or_more():
    for skill in SKILL_TAGS:
        task = skill_suite(skill)
        paraphrase = task.split("paraphrase")
        values = value_words(task, skill_train(skill))
        skeletons = {phrasing_skeleton(rendered(task, e), values) for e in paraphrase}

        assert len(paraphrase) >= 50, skill
        assert len(skeletons) >= 10, (skill, sorted(skeletons))
        assert task.metric == "exact_match"
        # Each prompt is the example's own text, whole; the other splits keep the task's
        # template with its answer-format line.
        assert task.template("paraphrase") == "{question}", skill
        assert all(rendered(task, e) == e.fields["question"] for e in paraphrase), skill
        assert task.template("public") == task.prompt_template != "{question}"
        assert all(
            rendered(task, e).startswith(e.fields["question"] + "\nAnswer with only")
            for e in task.split("public") + task.split("hidden")
        ), skill
        # The same answers, in the same format, as the task's other splits.
        shapes = {answer_shape(e.target) for e in task.split("hidden") + task.split("public")}
        for example in paraphrase:
            assert example.target == expected_target(skill, example.fields), example
            assert answer_shape(example.target) in shapes, example
            assert example.target not in example.fields["question"], example


def test_no_paraphrase_shares_its_phrasing_with_a_training_public_hidden_or_demo_prompt():
    demo = demo_example_prompts()
    assert len(demo) >= 9
    for skill in SKILL_TAGS:
        task, train = skill_suite(skill), skill_train(skill)
        values = value_words(task, train)
        others = [rendered(task, e) for e in task.split("public") + task.split("hidden")]
        others += [rendered(train, e) for e in train.examples]
        others += demo
        # Whole prompts and each of their lines: a question shared with a templated prompt
        # sits on that prompt's first line, above the answer-format line.
        seen = {
            phrasing_skeleton(part, values)
            for prompt in others
            for part in [prompt, *prompt.split("\n")]
        }
        # The check bites: every template phrasing, asked of a paraphrase example's own
        # numbers and words, is recognised.
        fields = task.split("paraphrase")[0].fields
        values_of = {**fields, "source": fields.get("from"), "dest": fields.get("to")}
        phrasings = next(s for s in GENERATOR.SKILLS if s.slug == skill).phrasings
        assert len(phrasings) >= 5
        for phrasing in phrasings:
            assert phrasing_skeleton(phrasing.format(**values_of), values) in seen, phrasing
        suffix = task.prompt_template.replace("{question}", "").strip()
        for example in task.split("paraphrase"):
            prompt = rendered(task, example)
            for part in [prompt, *prompt.split("\n")]:
                assert phrasing_skeleton(part, values) not in seen, (skill, prompt)
            assert "answer with only" not in prompt.lower(), prompt
            assert suffix not in prompt, prompt


def test_paraphrase_keys_are_disjoint_from_the_train_public_and_hidden_keys():
    def key(example: ParsedExample) -> str:
        return json.dumps({k: v for k, v in example.fields.items() if k != "question"})

    def problem(skill: str, example: ParsedExample) -> object:
        # Sums and sorted lists do not depend on the order they are given in.
        if skill == "addition":
            return tuple(sorted((example.fields["a"], example.fields["b"])))
        if skill == "sorting":
            return tuple(sorted(example.fields["numbers"].split(", "), key=int))
        return key(example)

    for skill in SKILL_TAGS:
        task, train = skill_suite(skill), skill_train(skill)
        paraphrase = task.split("paraphrase")
        others = task.split("hidden") + task.split("public") + train.examples

        assert len({key(e) for e in paraphrase}) == len(paraphrase), skill
        assert not {key(e) for e in paraphrase} & {key(e) for e in others}, skill
        assert not {problem(skill, e) for e in paraphrase} & {problem(skill, e) for e in others}


def test_the_general_suite_has_no_paraphrase_split():
    general = parse_suite_jsonl(built_in("general"))

    assert general.tasks
    assert all(not task.split("paraphrase") for task in general.tasks)


@pytest.mark.django_db
def test_load_suites_imports_every_skills_paraphrase_split():
    call_command("load_suites", stdout=io.StringIO())

    for skill in SKILL_TAGS:
        task = Task.objects.get(suite_version__suite__slug=skill, suite_version__is_current=True)
        committed = skill_suite(skill).split("paraphrase")
        stored = list(task.examples.filter(split="paraphrase").order_by("position"))
        specs = task_examples(task=task, split="paraphrase")

        assert [e.position for e in stored] == list(range(len(committed)))
        assert [(e.fields, e.target) for e in stored] == [(e.fields, e.target) for e in committed]
        assert [(s.fields, s.target) for s in specs] == [(e.fields, e.target) for e in committed]
        assert {e.template for e in stored} == {"{question}"}
        assert task_split_template(task=task, split="paraphrase") == "{question}"
        # Hidden and public examples still render with the task's own template.
        assert task_split_template(task=task, split="hidden") == task.prompt_template
        assert not task.examples.filter(split__in=["hidden", "public"]).exclude(prompt_template="")
        prompt = specs[0].fields["question"]
        assert (
            task_split_template(task=task, split="paraphrase").format_map(specs[0].fields) == prompt
        )


@pytest.mark.django_db
def test_every_built_in_suite_imports_with_enough_examples_per_skill():
    out = io.StringIO()
    call_command("load_suites", stdout=out)

    versions = {v.suite.slug: v for v in SuiteVersion.objects.select_related("suite")}
    assert set(versions) == SKILL_TAGS | {"general", "composite"}
    assert all(v.is_current and v.number == 1 for v in versions.values())
    skill_tags = set()
    for slug in SKILL_TAGS:
        assert versions[slug].suite.purpose == "skill"
        for task in versions[slug].tasks.all():
            assert task.metric == "exact_match"
            assert task.examples.filter(split="hidden").count() >= 200
            assert task.examples.filter(split="public").count() >= 50
            skill_tags.update(task.tags)
            # Several phrasings per skill.
            questions = {e.fields["question"].split()[0] for e in task.examples.all()}
            assert len(questions) >= 3, slug
    assert skill_tags >= SKILL_TAGS
    general = versions["general"]
    assert general.suite.purpose == "general"
    metrics = {t.slug: t.metric for t in general.tasks.all()}
    # Accuracies only: the policy averages general deltas, so they must share a 0-1 scale.
    assert set(metrics.values()) == {"contains", "multiple_choice"}
    assert set(metrics) == {"capitals", "colors", "common-sense-choice", "plain-sentences"}


@pytest.mark.django_db
def test_load_suites_sample_keeps_each_splits_first_examples_and_a_full_load_follows():
    out = io.StringIO()
    call_command("load_suites", "--sample", stdout=out)
    assert "sampled" in out.getvalue()
    committed: dict[str, int] = {}  # each task's public examples in the committed files
    for path in Path(settings.BASE_DIR, "evaluation", "suites").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("split") == "public":
                committed[row["task"]] = committed.get(row["task"], 0) + 1
    for task in Task.objects.filter(suite_version__is_current=True):
        counts = {
            split: task.examples.filter(split=split).count()
            for split in ("hidden", "public", "paraphrase")
        }
        assert counts["hidden"] == 30, task.slug
        assert counts["public"] == min(SAMPLE["public"], committed[task.slug]), task.slug
        assert counts["paraphrase"] in (0, 10), task.slug
        first = task.examples.filter(split="hidden").order_by("position").first()
        assert first.position == 0
    # The whole files then become every suite's next version, the sampled one kept.
    call_command("load_suites", stdout=io.StringIO())
    current = SuiteVersion.objects.filter(is_current=True)
    assert {v.number for v in current} == {2}
    assert SuiteVersion.objects.filter(number=1).count() == current.count()
    addition = Task.objects.get(suite_version__is_current=True, slug="addition")
    assert addition.examples.filter(split="hidden").count() == 200


@pytest.mark.django_db
def test_load_suites_is_idempotent():
    call_command("load_suites", stdout=io.StringIO())
    before = stored_counts()
    out = io.StringIO()

    call_command("load_suites", stdout=out)

    assert stored_counts() == before
    assert out.getvalue().count("unchanged") == 8


# --- Validation ---------------------------------------------------------------------------------


def _replace(index: int, **changes):
    def mutate(lines):
        lines[index] = {**lines[index], **changes}
        return lines

    return mutate


def _drop_key(index: int, key: str):
    def mutate(lines):
        lines[index] = {k: v for k, v in lines[index].items() if k != key}
        return lines

    return mutate


def _first_example(task: str, split: str):
    def find(lines):
        return next(
            i
            for i, line in enumerate(lines)
            if line.get("task") == task and line.get("split") == split
        )

    return find


def _on_example(task: str, split: str, change):
    def mutate(lines):
        index = _first_example(task, split)(lines)
        lines[index] = change(dict(lines[index]))
        return lines

    return mutate


def _paraphrase(template: str) -> dict:
    return {
        "task": "pick",
        "split": "paraphrase",
        "prompt_template": template,
        "fields": {"question": "Which one?"},
        "target": "yes",
        "choices": ["yes", "no"],
    }


BAD_FILES = {
    "invalid JSON": (
        lambda lines: [*lines[:2], '{"task": "echo", oops', *lines[2:]],
        "suite_invalid_json",
    ),
    "not an object": (lambda lines: [*lines[:2], "[1, 2]", *lines[2:]], "suite_invalid_json"),
    "NaN": (
        lambda lines: [*lines[:2], '{"task": "echo", "x": NaN}', *lines[2:]],
        "suite_invalid_json",
    ),
    "no header": (lambda lines: lines[1:], "suite_header_invalid"),
    "bad purpose": (_replace(0, purpose="fun"), "suite_header_invalid"),
    "bad slug": (_replace(0, suite="no spaces allowed"), "suite_header_invalid"),
    "unknown metric": (_replace(1, metric="bleu"), "suite_unknown_metric"),
    "no template": (_drop_key(1, "prompt_template"), "suite_template_invalid"),
    "attribute access": (_replace(1, prompt_template="{word.__class__}"), "suite_template_invalid"),
    "positional field": (_replace(1, prompt_template="Say {}."), "suite_template_invalid"),
    "field missing": (
        _on_example("echo", "hidden", lambda e: {**e, "fields": {"other": "x"}}),
        "suite_template_field_missing",
    ),
    "too few hidden": (
        lambda lines: [
            lines[0],
            *lines[1:3],
            *[
                line
                for line in lines[3:]
                if not (
                    line.get("task") == "echo"
                    and line.get("split") == "hidden"
                    and line["fields"]["word"].endswith("-0")
                )
            ],
        ],
        "suite_too_few_examples",
    ),
    "no public": (
        lambda lines: [line for line in lines if line.get("split") != "public"],
        "suite_too_few_examples",
    ),
    "choices missing": (
        _on_example("pick", "public", lambda e: {k: v for k, v in e.items() if k != "choices"}),
        "suite_choices_required",
    ),
    "one choice": (
        _on_example("pick", "hidden", lambda e: {**e, "choices": [e["target"]]}),
        "suite_choices_required",
    ),
    "target not a choice": (
        _on_example("pick", "hidden", lambda e: {**e, "choices": ["x", "y"]}),
        "suite_target_not_in_choices",
    ),
    "choices on a generative task": (
        _on_example("echo", "hidden", lambda e: {**e, "choices": ["x", "y"]}),
        "suite_choices_invalid",
    ),
    "undeclared task": (
        _on_example("echo", "hidden", lambda e: {**e, "task": "nope"}),
        "suite_task_unknown",
    ),
    "unknown split": (
        _on_example("echo", "hidden", lambda e: {**e, "split": "train"}),
        "suite_split_invalid",
    ),
    "empty target": (
        _on_example("echo", "hidden", lambda e: {**e, "target": "  "}),
        "suite_example_invalid",
    ),
    "unknown key": (
        _on_example("echo", "hidden", lambda e: {**e, "weight": 2}),
        "suite_example_invalid",
    ),
    "duplicate task": (lambda lines: [*lines[:3], lines[1], *lines[3:]], "suite_task_duplicate"),
    "own template on a hidden example": (
        _on_example("echo", "hidden", lambda e: {**e, "prompt_template": "{word}"}),
        "suite_example_invalid",
    ),
    "own template on a public example": (
        _on_example("echo", "public", lambda e: {**e, "prompt_template": "{word}"}),
        "suite_example_invalid",
    ),
    "paraphrase template lacks a field": (
        lambda lines: [*quiz_lines(paraphrase=1)[:-1], _paraphrase("{question} {missing}")],
        "suite_template_field_missing",
    ),
    "paraphrase template not plain": (
        lambda lines: [*quiz_lines(paraphrase=1)[:-1], _paraphrase("{question.upper}")],
        "suite_template_invalid",
    ),
    "two templates in one paraphrase split": (
        lambda lines: [*quiz_lines(paraphrase=2)[:-1], _paraphrase("Please: {question}")],
        "suite_template_invalid",
    ),
    "bad max_new_tokens": (_replace(1, max_new_tokens=0), "suite_task_invalid"),
    "bad tags": (_replace(1, tags="echo"), "suite_task_invalid"),
    "no tasks": (lambda lines: lines[:1], "suite_no_tasks"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_suite_file_is_refused_with_its_code_and_nothing_is_stored(case):
    mutate, code = BAD_FILES[case]
    data = jsonl(mutate(quiz_lines()))

    with pytest.raises(DomainError) as caught:
        suite_version_create(jsonl=data, actor=None)

    assert caught.value.code == code, caught.value.message
    assert stored_counts() == (0, 0, 0, 0)


@pytest.mark.django_db
def test_a_suite_file_without_a_paraphrase_split_still_loads():
    version = suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)

    assert MIN_EXAMPLES["paraphrase"] == 0
    assert version.tasks.count() == 2
    assert not Example.objects.filter(split="paraphrase").exists()
    echo = version.tasks.get(slug="echo")
    assert task_examples(task=echo, split="paraphrase") == []
    assert task_split_template(task=echo, split="paraphrase") == "Say {word}."


@pytest.mark.django_db
def test_a_paraphrase_split_is_stored_with_its_own_template_and_positions():
    version = suite_version_create(jsonl=jsonl(quiz_lines(paraphrase=3)), actor=None)

    pick = version.tasks.get(slug="pick")
    stored = list(pick.examples.filter(split="paraphrase").order_by("position"))
    assert [e.position for e in stored] == [0, 1, 2]
    assert [e.target for e in stored] == [f"PARAPHRASE-pick-{i:03d}-okapi" for i in range(3)]
    assert stored[0].choices == ["PARAPHRASE-pick-000-okapi", "decoy"]
    assert {e.template for e in stored} == {"{question}"}
    assert pick.examples.filter(split="hidden").first().template == "Pick {word}: {options}"
    assert task_split_template(task=pick, split="paraphrase") == "{question}"
    specs = task_examples(task=pick, split="paraphrase")
    assert [s.fields["question"] for s in specs] == [
        f"Would you kindly repeat unicorn-pick-{i}?" for i in range(3)
    ]


def test_a_json_error_names_its_line():
    lines = quiz_lines()
    data = jsonl([*lines[:4], "{broken", *lines[4:]])

    with pytest.raises(DomainError) as caught:
        parse_suite_jsonl(data)

    assert caught.value.code == "suite_invalid_json"
    assert caught.value.details["line"] == 5
    assert "Line 5" in caught.value.message


def test_line_separators_inside_json_strings_do_not_split_lines():
    lines = quiz_lines()
    lines[1]["title"] = "Echo\u2028with a line separator\x85and NEL"
    data = "".join(json.dumps(line, ensure_ascii=False) + "\r\n" for line in lines).encode()

    parsed = parse_suite_jsonl(data)

    assert parsed.task("echo").title == "Echo\u2028with a line separator\x85and NEL"


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"", "suite_empty"), (b"\n \n", "suite_empty"), (b"\xff\xfe{}", "suite_not_utf8")],
)
def test_empty_or_undecodable_files_are_refused(data, code):
    with pytest.raises(DomainError) as caught:
        parse_suite_jsonl(data)
    assert caught.value.code == code


@pytest.mark.django_db
def test_a_bad_file_for_an_existing_suite_leaves_its_current_version_alone():
    first = suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)
    before = stored_counts()
    lines = quiz_lines(title="Changed")
    lines[1]["metric"] = "bleu"

    with pytest.raises(DomainError):
        suite_version_create(jsonl=jsonl(lines), actor=None)

    assert stored_counts() == before
    first.refresh_from_db()
    assert first.is_current
    assert first.suite.title == "A quiz"


# --- Versions -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_import_stores_tasks_and_examples_in_order_as_the_current_version(maintainer):
    lines = quiz_lines()
    version = suite_version_create(jsonl=jsonl(lines), actor=maintainer)

    assert (version.suite.slug, version.number, version.is_current) == ("quiz", 1, True)
    assert version.created_by == maintainer
    assert version.locked_at is None
    assert version.source_sha256 == hashlib.sha256(jsonl(lines)).hexdigest()
    echo = version.tasks.get(slug="echo")
    assert (echo.metric, echo.tags, echo.max_new_tokens) == ("exact_match", ["echo", "testing"], 4)
    hidden = list(echo.examples.filter(split="hidden").order_by("position"))
    assert [e.position for e in hidden] == list(range(MIN_EXAMPLES["hidden"]))
    assert hidden[2].target == "HIDDEN-echo-002-zebra"
    pick = version.tasks.get(slug="pick").examples.filter(split="public").first()
    assert pick.choices == ["public-pick-0", "decoy"]


@pytest.mark.django_db
def test_re_importing_identical_bytes_is_a_no_op():
    first = suite_version_import(jsonl=jsonl(quiz_lines()), actor=None)
    before = stored_counts()

    again = suite_version_import(jsonl=jsonl(quiz_lines()), actor=None)

    assert first.created and not again.created
    assert again.version.pk == first.version.pk
    assert stored_counts() == before


@pytest.mark.django_db
def test_a_changed_file_becomes_the_next_current_version_and_the_old_one_is_untouched():
    first = suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)
    old = snapshot(first)
    lines = quiz_lines(hidden=MIN_EXAMPLES["hidden"] + 3, title="A better quiz")

    second = suite_version_create(jsonl=jsonl(lines), actor=None)

    first.refresh_from_db()
    assert second.number == 2 and second.is_current
    assert not first.is_current
    assert snapshot(first) == old
    assert second.tasks.get(slug="echo").examples.filter(split="hidden").count() == 33
    assert Suite.objects.get().title == "A better quiz"
    assert list(SuiteVersion.objects.filter(is_current=True)) == [second]

    # Going back to the first file's bytes makes a third version, not a reused one.
    third = suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)
    assert third.number == 3 and third.source_sha256 == first.source_sha256


@pytest.mark.django_db
def test_a_locked_version_is_never_changed_by_later_uploads():
    first = suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)
    suite_version_lock(suite_version=first)
    locked_at = first.locked_at
    old = snapshot(first)

    assert suite_version_lock(suite_version=first).locked_at == locked_at  # idempotent
    second = suite_version_create(jsonl=jsonl(quiz_lines(title="v2")), actor=None)

    first.refresh_from_db()
    assert first.locked_at == locked_at
    assert snapshot(first) == old
    assert second.pk != first.pk and second.locked_at is None


@pytest.mark.django_db
def test_a_new_version_cannot_change_a_suites_purpose():
    suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)

    with pytest.raises(DomainError) as caught:
        suite_version_create(jsonl=jsonl(quiz_lines(purpose="general")), actor=None)

    assert caught.value.code == "suite_purpose_changed"
    assert SuiteVersion.objects.count() == 1


# --- The API ------------------------------------------------------------------------------------


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def post_suite(client: APIClient, data: bytes):
    upload = SimpleUploadedFile("suite.jsonl", data, content_type="application/jsonl")
    return client.post(reverse("evaluation-api:suite-list"), {"file": upload}, format="multipart")


@pytest.mark.django_db
def test_a_maintainer_uploads_a_suite_version(maintainer):
    response = post_suite(client_for(maintainer), jsonl(quiz_lines()))

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["suite"], body["version"], body["is_current"]) == ("quiz", 1, True)
    counts = {task["slug"]: task["counts"] for task in body["tasks"]}
    assert counts["echo"] == {"public": 5, "hidden": 30, "paraphrase": 0}
    assert SuiteVersion.objects.get().created_by == maintainer

    again = post_suite(client_for(maintainer), jsonl(quiz_lines()))
    assert again.status_code == 200
    assert again.json()["version"] == 1


@pytest.mark.django_db
def test_a_superuser_counts_as_a_maintainer():
    admin_user = UserFactory(username="root", is_superuser=True, is_staff=True)
    assert post_suite(client_for(admin_user), jsonl(quiz_lines())).status_code == 201


@pytest.mark.django_db
def test_a_contributor_cannot_upload_a_suite(contributor):
    response = post_suite(client_for(contributor), jsonl(quiz_lines()))

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "maintainers_only"
    assert stored_counts() == (0, 0, 0, 0)


@pytest.mark.django_db
def test_an_anonymous_upload_is_refused_with_401():
    response = post_suite(client_for(), jsonl(quiz_lines()))

    assert response.status_code == 401
    assert stored_counts() == (0, 0, 0, 0)


@pytest.mark.django_db
def test_an_invalid_upload_answers_400_with_the_code(maintainer):
    lines = quiz_lines()
    lines[1]["metric"] = "bleu"

    response = post_suite(client_for(maintainer), jsonl(lines))

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "suite_unknown_metric"
    assert response.json()["error"]["details"]["line"] == 2
    missing = client_for(maintainer).post(
        reverse("evaluation-api:suite-list"), {}, format="multipart"
    )
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "suite_file_missing"


@pytest.mark.django_db
def test_everyone_lists_suites_with_counts_but_never_hidden_examples(contributor):
    lines = quiz_lines(paraphrase=4)
    suite_version_create(jsonl=jsonl(lines), actor=None)

    for client in (client_for(), client_for(contributor)):
        response = client.get(reverse("evaluation-api:suite-list"))
        assert response.status_code == 200
        text = response.content.decode()
        body = response.json()
        assert [s["suite"] for s in body] == ["quiz"]
        assert {t["slug"]: t["counts"]["hidden"] for t in body[0]["tasks"]} == {
            "echo": 30,
            "pick": 30,
        }
        assert {t["slug"]: t["counts"]["paraphrase"] for t in body[0]["tasks"]} == {
            "echo": 4,
            "pick": 4,
        }
        assert body[0]["public_jsonl_url"].endswith("/api/v1/suites/quiz/public.jsonl")
        for secret in hidden_strings(lines):
            assert secret not in text
        assert "zebra" not in text and "secret-prompt" not in text
        assert "okapi" not in text and "unicorn" not in text


@pytest.mark.django_db
def test_the_public_jsonl_holds_the_public_split_only(contributor):
    lines = quiz_lines(paraphrase=4)
    suite_version_create(jsonl=jsonl(lines), actor=None)

    response = client_for().get(reverse("evaluation-api:suite-public-jsonl", args=["quiz"]))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/jsonl")
    assert 'filename="quiz-v1-public.jsonl"' in response["Content-Disposition"]
    body = response.content
    text = body.decode()
    for secret in hidden_strings(lines):
        assert secret not in text
    assert "zebra" not in text and "hidden" not in text
    assert "okapi" not in text and "unicorn" not in text and "paraphrase" not in text
    parsed = parse_suite_jsonl(body, min_examples={"public": 5})
    assert [t.slug for t in parsed.tasks] == ["echo", "pick"]
    assert [e.target for e in parsed.task("echo").examples] == [
        f"public-echo-{i}" for i in range(5)
    ]
    assert parsed.task("pick").examples[0].choices == ["public-pick-0", "decoy"]
    assert parsed.task("pick").prompt_template == "Pick {word}: {options}"


@pytest.mark.django_db
def test_the_built_in_public_files_hold_exactly_the_public_examples():
    call_command("load_suites", stdout=io.StringIO())

    def key(task: str, fields: dict, target: str) -> str:
        return json.dumps([task, fields, target], sort_keys=True)

    for version in SuiteVersion.objects.select_related("suite"):
        response = client_for().get(
            reverse("evaluation-api:suite-public-jsonl", args=[version.suite.slug])
        )
        parsed = parse_suite_jsonl(response.content, min_examples={})
        served = [key(t.slug, e.fields, e.target) for t in parsed.tasks for e in t.examples]
        examples = Example.objects.filter(task__suite_version=version).select_related("task")
        public = {key(e.task.slug, e.fields, e.target) for e in examples if e.split == "public"}
        hidden = {key(e.task.slug, e.fields, e.target) for e in examples if e.split == "hidden"}
        paraphrase = {
            key(e.task.slug, e.fields, e.target) for e in examples if e.split == "paraphrase"
        }
        assert hidden and len(served) == len(public)
        assert set(served) == public, version.suite.slug
        assert not set(served) & hidden, version.suite.slug
        assert not set(served) & paraphrase, version.suite.slug
        # Only the skills have paraphrase splits (not general, not composite).
        assert bool(paraphrase) == (version.suite.purpose == "skill")
        text = response.content.decode()
        assert "paraphrase" not in text and '"{question}"' not in text.replace(
            '"prompt_template": "{question}"', ""
        )
        for example in examples:
            if example.split == "paraphrase":
                assert example.fields["question"] not in text


@pytest.mark.django_db
def test_an_unknown_suite_is_404():
    response = client_for().get(reverse("evaluation-api:suite-public-jsonl", args=["nope"]))
    assert response.status_code == 404


# --- The admin ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_maintainer_uploads_a_suite_through_the_admin(client):
    admin_user = UserFactory(username="root", is_superuser=True, is_staff=True)
    client.force_login(admin_user)
    url = reverse("admin:evaluation_suite_upload")

    assert client.get(url).status_code == 200
    response = client.post(url, {"file": SimpleUploadedFile("quiz.jsonl", jsonl(quiz_lines()))})

    version = SuiteVersion.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:evaluation_suiteversion_change", args=[version.pk]
    )
    for name in ["suite", "suiteversion", "task", "example", "evaluationrun", "taskresult"]:
        page = client.get(reverse(f"admin:evaluation_{name}_changelist"))
        assert page.status_code == 200, name
    assert (
        client.get(reverse("admin:evaluation_suiteversion_change", args=[version.pk])).status_code
        == 200
    )

    bad = quiz_lines()
    bad[1]["metric"] = "bleu"
    response = client.post(url, {"file": SimpleUploadedFile("quiz.jsonl", jsonl(bad))})
    assert response.status_code == 200
    assert "suite_unknown_metric" in response.content.decode()
    assert SuiteVersion.objects.count() == 1


@pytest.mark.django_db
def test_the_admin_shows_hidden_and_paraphrase_examples_to_maintainers_only(client):
    from django.contrib.auth.models import Permission

    version = suite_version_create(jsonl=jsonl(quiz_lines(paraphrase=2)), actor=None)
    echo = version.tasks.get(slug="echo")
    staff = UserFactory(username="staff", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_task", "view_example"])
    )
    root = UserFactory(username="root", is_superuser=True, is_staff=True)
    task_page = reverse("admin:evaluation_task_change", args=[echo.pk])
    paraphrase = echo.examples.filter(split="paraphrase").first()
    example_page = reverse("admin:evaluation_example_change", args=[paraphrase.pk])

    client.force_login(staff)
    page = client.get(task_page)
    assert page.status_code == 200
    assert "okapi" not in page.content.decode() and "zebra" not in page.content.decode()
    assert client.get(example_page).status_code == 403

    client.force_login(root)
    page = client.get(task_page).content.decode()
    assert "PARAPHRASE-echo-000-okapi" in page and "HIDDEN-echo-000-zebra" in page
    assert client.get(example_page).status_code == 200


@pytest.mark.django_db
def test_staff_who_are_not_maintainers_cannot_upload_through_the_admin(client):
    staff = UserFactory(username="staff", is_staff=True)
    client.force_login(staff)

    response = client.get(reverse("admin:evaluation_suite_upload"))

    assert response.status_code == 403
