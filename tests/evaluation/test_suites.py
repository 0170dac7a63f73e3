"""Benchmark suites: the built-in files and their generator, JSONL validation, versioned
import (services.suites), `load_suites`, the suites API and the admin upload form.

Hidden examples decide admission, so every read path is checked for leaks with suites whose
hidden content is unmistakable.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse
from rest_framework.test import APIClient

from evaluation.models import Example, Suite, SuiteVersion, Task
from evaluation.services.suites import (
    suite_version_create,
    suite_version_import,
    suite_version_lock,
)
from evaluation.suite_io import MIN_EXAMPLES, parse_suite_jsonl
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
    return lines


def jsonl(lines: list) -> bytes:
    return "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()


def hidden_strings(lines: list[dict]) -> list[str]:
    out = []
    for line in lines:
        if line.get("split") == "hidden":
            out += [line["target"], *line["fields"].values()]
    return [s for s in out if isinstance(s, str) and s not in {"a or b"}]


def stored_counts() -> tuple[int, int, int, int]:
    return (
        Suite.objects.count(),
        SuiteVersion.objects.count(),
        Task.objects.count(),
        Example.objects.count(),
    )


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
    # Six skills (suite + training file each), general, and the replay prompts.
    assert len(generated) == 14
    for relative in generated:
        assert (tmp_path / relative).read_bytes() == (SUITES_DIR / relative).read_bytes(), relative


def test_training_files_are_disjoint_from_the_evaluation_splits():
    for skill in SKILL_TAGS:
        suite = parse_suite_jsonl((SUITES_DIR / f"{skill}.jsonl").read_bytes())
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


@pytest.mark.django_db
def test_every_built_in_suite_imports_with_enough_examples_per_skill():
    out = io.StringIO()
    call_command("load_suites", stdout=out)

    versions = {v.suite.slug: v for v in SuiteVersion.objects.select_related("suite")}
    assert set(versions) == SKILL_TAGS | {"general"}
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
def test_load_suites_is_idempotent():
    call_command("load_suites", stdout=io.StringIO())
    before = stored_counts()
    out = io.StringIO()

    call_command("load_suites", stdout=out)

    assert stored_counts() == before
    assert out.getvalue().count("unchanged") == 7


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
    assert counts["echo"] == {"public": 5, "hidden": 30}
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
    lines = quiz_lines()
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
        assert body[0]["public_jsonl_url"].endswith("/api/v1/suites/quiz/public.jsonl")
        for secret in hidden_strings(lines):
            assert secret not in text
        assert "zebra" not in text and "secret-prompt" not in text


@pytest.mark.django_db
def test_the_public_jsonl_holds_the_public_split_only(contributor):
    lines = quiz_lines()
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
        assert hidden and len(served) == len(public)
        assert set(served) == public, version.suite.slug
        assert not set(served) & hidden, version.suite.slug


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
def test_staff_who_are_not_maintainers_cannot_upload_through_the_admin(client):
    staff = UserFactory(username="staff", is_staff=True)
    client.force_login(staff)

    response = client.get(reverse("admin:evaluation_suite_upload"))

    assert response.status_code == 403
