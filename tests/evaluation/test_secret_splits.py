"""The built-in suites' secret splits: the hidden, paraphrase and composite examples that
decide admission and the scoreboard never live in the repository. The committed files hold
headers, tasks and public splits; load_suites draws the rest from the secret seed (or reads
a maintainer's private file), apart from every committed key, and no page, API response,
log line or error message shows them afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from evaluation.models import Example, Outcome, Suite, SuiteVersion
from evaluation.suite_io import SECRET_SPLITS, merged_jsonl, parse_suite_jsonl
from evaluation.suites import (
    _development_seed,
    committed_files,
    complete_suite,
    generate,
    suite_seed,
)
from tessera.errors import DomainError
from tests.conftest import TEST_SUITE_SEED
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    api_client,
    child,
    execute,
    fake_child,
    fast_eval,
    model_cache,
    queued_version,
    tiny_base_model,
    tiny_model_source,
)
from tests.evaluation.test_suites import stored_counts
from tests.factories import UserFactory

ROOT = Path(settings.BASE_DIR)
SUITES_DIR = ROOT / "evaluation" / "suites"
OTHER_SEED = "another-secret-seed-0123456789"
SKILLS = [skill.slug for skill in generate.SKILLS]


def suite(name: str, seed: str = TEST_SUITE_SEED):
    return parse_suite_jsonl(complete_suite(SUITES_DIR / f"{name}.jsonl", seed=seed))


def key(example) -> str:
    """What an example asks, its wording aside (the question field is the wording)."""
    return json.dumps({k: v for k, v in example.fields.items() if k != "question"}, sort_keys=True)


def problem(name: str, example) -> object:
    # Sums and sorted lists do not depend on the order they are given in.
    if name == "addition":
        return tuple(sorted((example.fields["a"], example.fields["b"])))
    if name == "sorting":
        return tuple(sorted(int(n) for n in example.fields["numbers"].split(", ")))
    if name == "general":
        # Each phrasing of a general item is an example of its own.
        return json.dumps([example.fields, example.target], sort_keys=True)
    return key(example)


def train(name: str):
    data = (SUITES_DIR / "train" / f"{name}.jsonl").read_bytes()
    return parse_suite_jsonl(data, splits=("train",), min_examples={}).tasks[0]


def secret_texts(seed: str = TEST_SUITE_SEED) -> set[str]:
    """Every secret example's prompt as asked (its question, or its whole rendered prompt)."""
    out: set[str] = set()
    for path in committed_files():
        for task in suite(path.stem, seed).tasks:
            for split in SECRET_SPLITS:
                template = task.template(split)
                for example in task.split(split):
                    out.add(template.format_map(example.fields))
                    if "question" in example.fields:
                        out.add(example.fields["question"])
    return out


def holds(text: str, part: str) -> bool:
    """Whether ``part`` is in ``text`` as a whole, not inside a longer number or word ("48
    kilograms" is inside "148 kilograms")."""
    index = text.find(part)
    while index != -1:
        end = index + len(part)
        before = text[index - 1] if index else " "
        after = text[end] if end < len(text) else " "
        if not (before.isalnum() or after.isalnum()):
            return True
        index = text.find(part, index + 1)
    return False


# --- What is committed --------------------------------------------------------------------------


def git_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_the_committed_suite_files_hold_only_headers_tasks_and_public_examples():
    committed = [name for name in git_files() if name.startswith("evaluation/suites/")]
    suites = [n for n in committed if n.endswith(".jsonl") and "/train/" not in n]
    trains = [n for n in committed if n.endswith(".jsonl") and "/train/" in n]
    assert len(suites) == 8 and len(trains) == 7
    for name in suites:
        lines = [json.loads(line) for line in (ROOT / name).read_text().splitlines()]
        assert set(lines[0]) == {"suite", "title", "description", "purpose"}, name
        for line in lines[1:]:
            if "split" in line:
                assert line["split"] == "public", (name, line)
            else:
                assert "metric" in line and "prompt_template" in line, (name, line)
        assert sum(1 for line in lines if "split" in line) >= 50, name
    for name in trains:
        for line in (ROOT / name).read_text().splitlines():
            row = json.loads(line)
            assert row.get("split", "train") == "train", (name, row)


def test_no_committed_file_holds_a_secret_example_of_the_test_seed():
    secrets = secret_texts()
    # The general suite's items come from short lists in generate.py itself (its docstring
    # says so); what must not be anywhere is a skill's or a composite's secret prompt.
    distinctive = {s for s in secrets if re.search(r"\d", s) and len(s) >= 12}
    assert len(distinctive) > 2000
    checked = 0
    for name in git_files():
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 8 * 2**20:
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue
        text = data.decode("utf-8", errors="replace")
        checked += 1
        found = [s for s in distinctive if holds(text, s)]
        assert not found, (name, found[:3])
    assert checked > 100


def test_another_seed_draws_other_secret_examples_of_the_same_shape():
    for path in committed_files():
        mine, other = suite(path.stem), suite(path.stem, OTHER_SEED)
        assert (mine.slug, mine.purpose) == (other.slug, other.purpose)
        assert [t.slug for t in mine.tasks] == [t.slug for t in other.tasks]
        for a, b in zip(mine.tasks, other.tasks, strict=True):
            assert (a.metric, a.prompt_template, a.tags) == (b.metric, b.prompt_template, b.tags)
            for split in ("public", *SECRET_SPLITS):
                assert len(a.split(split)) == len(b.split(split)), (a.slug, split)
                assert a.template(split) == b.template(split), (a.slug, split)
            # The public split is the committed one for both; the secret ones differ.
            assert a.split("public") == b.split("public")
            for split in SECRET_SPLITS:
                if not a.split(split):
                    continue
                # A general task whose short list the split exhausts asks the same items
                # with other distractors, choice order and scrambles.
                ours = {json.dumps([e.fields, e.target, e.choices]) for e in a.split(split)}
                theirs = {json.dumps([e.fields, e.target, e.choices]) for e in b.split(split)}
                assert ours != theirs, (a.slug, split)
                if path.stem != "general":
                    assert len(ours & theirs) < len(ours) // 4, (a.slug, split)
                # The same answer format and answer-format line as the public split.
                shapes = {_shape(e.target) for e in a.split("public")}
                assert {_shape(e.target) for e in b.split(split)} <= shapes | {
                    _shape(e.target) for e in a.split(split)
                }


def _shape(target: str) -> str:
    return re.sub(r"[A-Za-z]+", "w", re.sub(r"\d+", "9", target))


@pytest.mark.parametrize("seed", [TEST_SUITE_SEED, OTHER_SEED])
def test_secret_examples_are_disjoint_from_the_committed_public_and_training_keys(seed):
    for path in committed_files():
        name = path.stem
        whole = suite(name, seed)
        for task in whole.tasks:
            committed = task.split("public") + (train(name).examples if name in SKILLS else [])
            hidden = task.split("hidden")
            assert len(hidden) >= 30, (name, task.slug)
            for split in SECRET_SPLITS:
                examples = task.split(split)
                keys = {problem(name, e) for e in examples}
                assert len(keys) == len(examples), (name, task.slug, split)
                assert not keys & {problem(name, e) for e in committed}, (name, task.slug, split)
            paraphrase = {problem(name, e) for e in task.split("paraphrase")}
            assert not paraphrase & {problem(name, e) for e in hidden}, (name, task.slug)


def test_the_secret_hidden_splits_keep_the_skills_phrasings():
    for skill in generate.SKILLS:
        task = suite(skill.slug).tasks[0]
        for example in task.split("hidden"):
            values = {k: v for k, v in example.fields.items() if k != "question"}
            values |= {"source": values.get("from"), "dest": values.get("to")}
            asked = {phrasing.format(**values) for phrasing in skill.phrasings}
            assert example.fields["question"] in asked, example


def test_the_generator_writes_private_files_that_load_suites_reads_and_never_here(tmp_path):
    env = {"TESSERA_SUITE_SEED": TEST_SUITE_SEED, "PATH": "/usr/bin:/bin"}
    script = str(SUITES_DIR / "generate.py")
    subprocess.run(
        [sys.executable, script, "--secret-out", str(tmp_path)], env=env, check=True, timeout=120
    )
    assert sorted(p.stem for p in tmp_path.glob("*.jsonl")) == sorted(
        p.stem for p in committed_files()
    )
    for path in committed_files():
        merged = merged_jsonl(public=path.read_bytes(), secret=(tmp_path / path.name).read_bytes())
        assert merged == complete_suite(path)
    refused = subprocess.run(
        [sys.executable, script, "--secret-out", str(SUITES_DIR / "private")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "committed" in refused.stderr
    assert not (SUITES_DIR / "private").exists()


# --- The private file's validation -------------------------------------------------------------


def _private(lines: list) -> bytes:
    return "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()


def _secret_lines(name: str = "addition") -> list:
    return [json.loads(line) for line in generate.secret_suites(TEST_SUITE_SEED)[name].splitlines()]


PRIVATE_CASES = {
    "another suite's header": (
        lambda lines: [{"suite": "sorting"}, *lines[1:]],
        "suite_private_header_invalid",
        1,
    ),
    "another title": (
        lambda lines: [{**lines[0], "title": "Other"}, *lines[1:]],
        "suite_private_header_invalid",
        1,
    ),
    "a public example": (
        lambda lines: [*lines[:3], {**lines[3], "split": "public"}, *lines[4:]],
        "suite_private_line_invalid",
        4,
    ),
    "a task line": (
        lambda lines: [
            lines[0],
            {"task": "addition", "metric": "exact_match", "prompt_template": "{q}"},
            *lines[1:],
        ],
        "suite_private_line_invalid",
        2,
    ),
    "an unknown task": (
        lambda lines: [*lines[:5], {**lines[5], "task": "nope"}, *lines[6:]],
        "suite_task_unknown",
        6,
    ),
    "invalid JSON": (lambda lines: [*lines[:7], "{oops", *lines[7:]], "suite_invalid_json", 8),
    "a field the template needs is missing": (
        lambda lines: [*lines[:9], {**lines[9], "fields": {"a": 1}}, *lines[10:]],
        "suite_template_field_missing",
        10,
    ),
    "too few hidden examples": (
        lambda lines: [lines[0], *lines[1:20]],
        "suite_too_few_examples",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(PRIVATE_CASES))
def test_a_bad_private_file_is_refused_with_its_code_and_line(case):
    mutate, code, line = PRIVATE_CASES[case]
    public = (SUITES_DIR / "addition.jsonl").read_bytes()

    with pytest.raises(DomainError) as caught:
        merged_jsonl(public=public, secret=_private(mutate(_secret_lines())))

    assert caught.value.code == code, caught.value.message
    assert caught.value.details.get("line") == line


def test_a_committed_file_holding_secret_examples_is_refused():
    whole = complete_suite(SUITES_DIR / "addition.jsonl")

    with pytest.raises(DomainError) as caught:
        merged_jsonl(public=whole, secret=_private(_secret_lines()))

    assert caught.value.code == "suite_public_holds_secret"


@pytest.mark.django_db
def test_load_suites_refuses_a_bad_private_file_naming_its_line_and_stores_nothing(tmp_path):
    lines = _secret_lines("sorting")
    lines[4] = {**lines[4], "split": "public"}
    (tmp_path / "sorting.jsonl").write_bytes(_private(lines))

    with pytest.raises(CommandError) as caught:
        call_command(
            "load_suites", "--private", str(tmp_path / "sorting.jsonl"), stdout=io.StringIO()
        )

    assert "private file (line 5)" in str(caught.value)
    assert "suite_private_line_invalid" in str(caught.value)
    assert stored_counts() == (0, 0, 0, 0)


# --- Loading ------------------------------------------------------------------------------------


def secret_rows() -> list[tuple]:
    return sorted(
        (e.task.suite_version.suite.slug, e.task.slug, e.split, e.position, e.target)
        for e in Example.objects.filter(
            split__in=SECRET_SPLITS, task__suite_version__is_current=True
        ).select_related("task__suite_version__suite")
    )


@pytest.mark.django_db
def test_load_suites_stores_the_seeds_secret_examples_and_reloading_with_it_changes_nothing(
    settings,
):
    call_command("load_suites", stdout=io.StringIO())
    stored = {
        (e.task.slug, e.split, e.position): (e.fields, e.target)
        for e in Example.objects.filter(split__in=SECRET_SPLITS).select_related("task")
    }
    expected = {
        (task.slug, split, position): (example.fields, example.target)
        for path in committed_files()
        for task in suite(path.stem).tasks
        for split in SECRET_SPLITS
        for position, example in enumerate(task.split(split))
    }
    assert stored == expected
    before = stored_counts()

    out = io.StringIO()
    call_command("load_suites", stdout=out)

    assert stored_counts() == before
    assert out.getvalue().count("unchanged") == 8


@pytest.mark.django_db
def test_another_seed_is_refused_unless_replace_and_then_becomes_the_next_versions(settings):
    call_command("load_suites", stdout=io.StringIO())
    before, rows = stored_counts(), secret_rows()
    settings.TESSERA_SUITE_SEED = OTHER_SEED

    with pytest.raises(CommandError) as caught:
        call_command("load_suites", stdout=io.StringIO())

    message = str(caught.value)
    assert "--replace" in message and "nothing was imported" in message
    assert stored_counts() == before and secret_rows() == rows
    # The refusal shows no example, only where they differ.
    assert not any(text in message for text in secret_texts())

    out = io.StringIO()
    call_command("load_suites", "--replace", stdout=out)

    assert out.getvalue().count("imported as version 2") == 8
    assert secret_rows() != rows
    assert SuiteVersion.objects.filter(number=1, is_current=False).count() == 8
    # The other seed is now the one loaded: loading it again changes nothing.
    again = io.StringIO()
    call_command("load_suites", stdout=again)
    assert again.getvalue().count("unchanged") == 8


@pytest.mark.django_db
def test_a_sample_and_the_whole_of_one_seed_follow_each_other_without_replace():
    call_command("load_suites", "--sample", stdout=io.StringIO())
    call_command("load_suites", stdout=io.StringIO())
    call_command("load_suites", "--sample", stdout=io.StringIO())

    assert set(SuiteVersion.objects.filter(is_current=True).values_list("number", flat=True)) == {3}
    hidden = Example.objects.filter(
        task__suite_version__is_current=True, task__slug="addition", split="hidden"
    )
    assert hidden.count() == 30


@pytest.mark.django_db
def test_private_files_of_the_seed_load_as_the_seed_does_and_others_need_replace(tmp_path):
    generate.write_secret(tmp_path / "same", secret_seed=TEST_SUITE_SEED)
    generate.write_secret(tmp_path / "other", secret_seed=OTHER_SEED)
    call_command("load_suites", stdout=io.StringIO())

    out = io.StringIO()
    call_command("load_suites", "--private", str(tmp_path / "same"), stdout=out)
    assert out.getvalue().count("unchanged") == 8

    with pytest.raises(CommandError, match="--replace"):
        call_command(
            "load_suites", "--private", str(tmp_path / "other" / "addition.jsonl"), stdout=out
        )
    out = io.StringIO()
    call_command(
        "load_suites",
        "--private",
        str(tmp_path / "other" / "addition.jsonl"),
        "--replace",
        stdout=out,
    )
    assert "addition: imported as version 2" in out.getvalue()
    assert out.getvalue().count("unchanged") == 7


@pytest.mark.django_db
def test_a_private_file_for_a_suite_with_no_committed_file_is_refused(tmp_path):
    (tmp_path / "quiz.jsonl").write_text('{"suite": "quiz", "title": "Q"}\n')

    with pytest.raises(CommandError, match="quiz"):
        call_command("load_suites", "--private", str(tmp_path), stdout=io.StringIO())

    assert stored_counts() == (0, 0, 0, 0)


# --- The seed -----------------------------------------------------------------------------------


def _settings_with(**env: str) -> subprocess.CompletedProcess:
    import os

    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "CELERY_", "TESSERA_SUITE"))
    }
    environment["DJANGO_DEBUG"] = "true"  # development, unless a test says otherwise
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", "import tessera.settings"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_production_without_a_suite_seed_refuses_to_start():
    result = _settings_with(DJANGO_DEBUG="false", DJANGO_SECRET_KEY="x" * 50)

    assert result.returncode != 0
    assert "TESSERA_SUITE_SEED must be set" in result.stderr


def test_a_short_suite_seed_is_refused():
    result = _settings_with(TESSERA_SUITE_SEED="1234")

    assert result.returncode != 0
    assert "TESSERA_SUITE_SEED must be at least 16 characters" in result.stderr


def test_in_development_a_seed_is_made_once_and_kept(tmp_path, settings):
    path = tmp_path / "var" / "suite-seed"

    first = _development_seed(path)

    assert len(first) == 32 and path.read_text().strip() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert _development_seed(path) == first
    settings.TESSERA_SUITE_SEED = ""
    settings.VAR_DIR = tmp_path / "var"
    assert suite_seed() == first
    settings.TESSERA_SUITE_SEED = OTHER_SEED
    assert suite_seed() == OTHER_SEED


def test_tests_draw_from_the_fixed_test_seed():
    assert settings.TESSERA_SUITE_SEED == TEST_SUITE_SEED == suite_seed()


# --- Nothing shows a secret example ------------------------------------------------------------


def _distinctive_secrets() -> set[str]:
    """The secret prompts, and the targets no public text could hold by chance."""
    public = {e.target for e in Example.objects.filter(split=Example.Split.PUBLIC)}
    out: set[str] = set()
    for example in Example.objects.filter(
        split__in=SECRET_SPLITS, task__suite_version__is_current=True
    ).select_related("task"):
        out.add(example.template.format_map(example.fields))
        out |= {
            value
            for value in example.fields.values()
            if isinstance(value, str) and len(value) >= 12
        }
        if len(example.target) >= 10 and example.target not in public:
            out.add(example.target)
    # What the committed files say anyway (a task description quoting "three hundred
    # forty-two") is no leak.
    committed = "".join(path.read_text() for path in committed_files())
    return {text for text in out if text not in committed}


@pytest.mark.django_db
def test_no_page_api_response_or_log_line_shows_a_secret_example(
    contributor,
    maintainer,
    tiny_base_model,  # noqa: F811 (fixture imported above)
    child,  # noqa: F811 (fixture imported above)
    fast_eval,  # noqa: F811 (fixture imported above)
    settings,
    caplog,
    client,
):
    caplog.set_level(logging.DEBUG)
    settings.TESSERA_ADMISSION_REVIEW = "always"
    call_command("load_suites", "--sample", stdout=io.StringIO())
    child(fake_child(default=(0.0, 1.0)))
    version, run = queued_version(contributor, tags=("addition",))
    execute(run)
    run.refresh_from_db()
    assert run.status == "succeeded", run.failure_code
    # The run measured the built-in union and recorded per-example outcomes.
    assert Outcome.objects.filter(version=version, example__split="hidden").count() >= 30
    assert Outcome.objects.filter(version=version, example__split="paraphrase").exists()
    secrets = _distinctive_secrets()
    assert len(secrets) > 500

    adapter = version.adapter
    staff = UserFactory(username="staffer", is_staff=True)
    pages = {
        contributor: [
            reverse("portal:home"),
            reverse("portal:dashboard"),
            reverse("portal:adapter-detail", args=[adapter.pk]),
            reverse("evaluation:policy"),
            reverse("leaderboard:index"),
            reverse("public:contributor", args=[contributor.username]),
            reverse("evaluation:test-sets", args=[adapter.pk]),
        ],
        maintainer: [
            reverse("evaluation:review-queue"),
            reverse("evaluation:review-detail", args=[version.pk]),
            reverse("portal:adapter-detail", args=[adapter.pk]),
        ],
        None: [reverse("leaderboard:index"), reverse("portal:rules")],
        staff: [reverse("admin:index")],
    }
    apis = {
        contributor: [
            reverse("evaluation-api:suite-list"),
            *[
                reverse("evaluation-api:suite-public-jsonl", args=[slug])
                for slug in Suite.objects.values_list("slug", flat=True)
            ],
            reverse("evaluation-api:run-detail", kwargs={"run_id": run.pk}),
            reverse("evaluation-api:run-progress", kwargs={"run_id": run.pk}),
            reverse(
                "evaluation-api:version-runs",
                kwargs={"adapter_id": adapter.pk, "number": version.number},
            ),
            reverse("api:adapter-detail", args=[adapter.pk]),
            reverse("api:version-detail", args=[adapter.pk, version.number]),
            reverse("routing-api:leaderboard"),
            reverse("routing-api:scoreboard-history"),
            reverse("api:intake-rules"),
        ],
        maintainer: [
            reverse("evaluation-api:review-queue"),
            reverse("evaluation-api:review-version", args=[version.pk]),
            reverse("evaluation-api:run-detail", kwargs={"run_id": run.pk}),
        ],
    }
    seen = 0
    for user, urls in pages.items():
        client.logout()
        if user is not None:
            client.force_login(user)
        for url in urls:
            response = client.get(url)
            assert response.status_code == 200, (url, response.status_code)
            text = response.content.decode()
            assert not [s for s in secrets if holds(text, s)], url
            seen += 1
    clients = {user: api_client(user) for user in apis}
    for user, urls in apis.items():
        for url in urls:
            response = clients[user].get(url)
            assert response.status_code == 200, (url, response.status_code)
            text = response.content.decode()
            assert not [s for s in secrets if holds(text, s)], url
            seen += 1
    # An error about a secret-holding object shows no example either.
    for url in (
        reverse("evaluation-api:run-detail", kwargs={"run_id": run.pk + 999}),
        reverse("evaluation-api:review-version", args=[version.pk]),
    ):
        text = clients[contributor].get(url).content.decode()
        assert not [s for s in secrets if holds(text, s)], url
    assert seen >= 20
    logged = caplog.text + run.log
    assert not [s for s in secrets if holds(logged, s)]
    _the_admin_shows_secret_examples_to_maintainers_only(client, secrets)


def _the_admin_shows_secret_examples_to_maintainers_only(client, secrets: set[str]) -> None:
    """Staff with every view permission but not the maintainer role (the Maintainers group,
    or a superuser) walk every admin list and the first object's page of each model."""
    from django.contrib import admin
    from django.contrib.auth.models import Permission

    staff = UserFactory(username="all-views", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    client.force_login(staff)
    walked = 0
    for model in admin.site._registry:
        meta = model._meta
        urls = [reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")]
        first = model.objects.order_by("pk").first()
        if first is not None:
            urls.append(
                reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[first.pk])
            )
        for url in urls:
            response = client.get(url)
            assert response.status_code in (200, 403), (url, response.status_code)
            text = response.content.decode()
            assert not [s for s in secrets if holds(text, s)], url
            walked += 1
    assert walked >= 30
    hidden = Example.objects.filter(split=Example.Split.HIDDEN).order_by("pk").first()
    page = reverse("admin:evaluation_example_change", args=[hidden.pk])
    assert client.get(page).status_code == 403
    task_page = reverse("admin:evaluation_task_change", args=[hidden.task_id])
    assert client.get(task_page).status_code == 200

    # The check bites: a maintainer sees the same example on the same pages.
    root = UserFactory(username="root", is_staff=True, is_superuser=True)
    client.force_login(root)
    question = hidden.fields["question"]
    assert holds(client.get(page).content.decode(), question)
    assert question in client.get(task_page).content.decode()


def test_the_evaluation_child_is_given_no_suite_seed(monkeypatch, tmp_path):
    from evaluation.worker.sandbox import minimal_env

    monkeypatch.setenv("TESSERA_SUITE_SEED", OTHER_SEED)

    env = minimal_env(workdir=str(tmp_path))

    assert OTHER_SEED not in env.values() and "TESSERA_SUITE_SEED" not in env


def test_secret_examples_never_ask_what_the_once_committed_hidden_splits_asked():
    """The committed seed's first draws were the hidden splits while those were committed
    (they are in the history); they are retired, never drawn again."""
    from types import SimpleNamespace

    for skill in generate.SKILLS:
        retired = generate._committed_keys(skill, generate.PUBLIC_SEED)[: generate.HIDDEN_PER_TASK]
        asked = {
            problem(skill.slug, SimpleNamespace(**skill.fill(key, skill.phrasings[0])))
            for key in retired
        }
        task = suite(skill.slug).tasks[0]
        for split in SECRET_SPLITS:
            drawn = {problem(skill.slug, e) for e in task.split(split)}
            assert not drawn & asked, (skill.slug, split)
    for composite in generate.COMPOSITES:
        retired = generate._composite_committed(composite, generate.PUBLIC_SEED)
        asked = {generate._composite_identity(e) for e in retired}
        task = suite("composite").task(composite.slug)
        drawn = {key(e) for e in task.split("hidden")}
        assert len(drawn) == generate.COMPOSITE_HIDDEN_PER_TASK
        assert not drawn & asked, composite.slug
