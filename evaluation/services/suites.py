"""Writes for benchmark suites: import a JSONL file as a new immutable version; lock one.

A suite's versions are immutable once locked (the first run that uses one locks it): an
upload never edits a version, it always creates the next one and makes it current. Only
the ``is_current`` flag of an older version changes, never its tasks or examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from evaluation.models import Example, Suite, SuiteVersion, Task
from evaluation.suite_io import ParsedSuite, parse_suite_jsonl
from tessera.errors import DomainError


@dataclass(frozen=True)
class SuiteImport:
    version: SuiteVersion
    created: bool  # False: the file is the current version's, byte for byte


def suite_version_create(*, jsonl: bytes, actor: AbstractBaseUser | None) -> SuiteVersion:
    """Import ``jsonl`` as the suite's next version and make it current; return it.

    The same bytes as the current version are a no-op that returns the current version.
    Validation happens before anything is written, and the write is one transaction, so a
    bad file stores nothing.
    """
    return suite_version_import(jsonl=jsonl, actor=actor).version


def suite_version_import(*, jsonl: bytes, actor: AbstractBaseUser | None) -> SuiteImport:
    """suite_version_create, also saying whether a version was created."""
    parsed = parse_suite_jsonl(jsonl)
    if actor is not None and not actor.is_authenticated:
        actor = None
    with transaction.atomic():
        suite, _ = Suite.objects.get_or_create(
            slug=parsed.slug,
            defaults={
                "title": parsed.title,
                "description": parsed.description,
                "purpose": parsed.purpose,
            },
        )
        # Serialises uploads to one suite: version numbers and the current flag are
        # decided while holding this row lock.
        suite = Suite.objects.select_for_update().get(pk=suite.pk)
        if suite.purpose != parsed.purpose:
            raise DomainError(
                "suite_purpose_changed",
                f"Suite {suite.slug!r} is a {suite.purpose} suite; a new version cannot make "
                f"it {parsed.purpose} (that would change what admission means). Use a new "
                "suite slug.",
                kind="conflict",
            )
        current = SuiteVersion.objects.filter(suite=suite, is_current=True).first()
        if current is not None and current.source_sha256 == parsed.source_sha256:
            return SuiteImport(version=current, created=False)
        if (suite.title, suite.description) != (parsed.title, parsed.description):
            suite.title, suite.description = parsed.title, parsed.description
            suite.save(update_fields=["title", "description"])
        number = (suite.versions.aggregate(top=Max("number"))["top"] or 0) + 1
        # The partial unique constraint allows one current version: unset the old first.
        SuiteVersion.objects.filter(suite=suite, is_current=True).update(is_current=False)
        version = SuiteVersion.objects.create(
            suite=suite,
            number=number,
            source_sha256=parsed.source_sha256,
            created_by=actor,
            is_current=True,
        )
        _store_tasks(version, parsed)
    return SuiteImport(version=version, created=True)


def suite_version_lock(*, suite_version: SuiteVersion) -> SuiteVersion:
    """Mark the version as used (idempotent: the first lock's time is kept)."""
    SuiteVersion.objects.filter(pk=suite_version.pk, locked_at__isnull=True).update(
        locked_at=timezone.now()
    )
    suite_version.refresh_from_db(fields=["locked_at"])
    return suite_version


def _store_tasks(version: SuiteVersion, parsed: ParsedSuite) -> None:
    tasks = Task.objects.bulk_create(
        [
            Task(
                suite_version=version,
                slug=task.slug,
                title=task.title,
                description=task.description,
                tags=task.tags,
                metric=task.metric,
                prompt_template=task.prompt_template,
                max_new_tokens=task.max_new_tokens,
            )
            for task in parsed.tasks
        ]
    )
    examples = []
    for row, task in zip(tasks, parsed.tasks, strict=True):
        positions: Counter[str] = Counter()
        for example in task.examples:
            examples.append(
                Example(
                    task=row,
                    split=example.split,
                    position=positions[example.split],
                    fields=example.fields,
                    prompt_template=example.prompt_template,
                    target=example.target,
                    choices=example.choices,
                )
            )
            positions[example.split] += 1
    Example.objects.bulk_create(examples, batch_size=2000)
