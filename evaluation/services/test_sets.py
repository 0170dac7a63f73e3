"""Contributors' own public test sets: JSONL the owner attaches to an adapter.

Each run scores them (evaluation.services.execution) and the adapter page shows the scores; they
never decide admission. Everything is checked before anything is written, so a refused
upload leaves nothing behind, and each refusal has a code naming what was wrong.

A line reads ``{"prompt": "...", "target": "...", "choices": ["...", ...]}`` (``choices``
optional, required for multiple_choice).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from contributions.models import Adapter, AuditEvent
from evaluation.models import ContributorTestSet, Task
from tessera.errors import DomainError

MAX_TEST_SET_BYTES = 1024 * 1024
MAX_TEST_SET_LINES = 500
MAX_NAME_CHARS = 100
MAX_CHOICES = 26
LINE_FIELDS = frozenset({"prompt", "target", "choices"})
METRICS = tuple(Task.Metric.values)


def contributor_test_set_create(
    *, adapter: Adapter, actor: AbstractBaseUser, name: str, metric: str, jsonl: bytes
) -> ContributorTestSet:
    if adapter.owner_id != actor.pk:
        raise DomainError(
            "not_owner", "Only the adapter's owner can attach test sets.", kind="forbidden"
        )
    name = _clean_name(name)
    if metric not in METRICS:
        raise DomainError(
            "test_set_metric_unknown",
            f"The metric must be one of {', '.join(METRICS)}.",
            details={"field": "metric", "allowed": list(METRICS)},
        )
    examples = jsonl_examples_parse(jsonl, metric=metric)
    if ContributorTestSet.objects.filter(adapter=adapter, name=name).exists():
        raise _name_taken(name)
    try:
        with transaction.atomic():
            test_set = ContributorTestSet.objects.create(
                adapter=adapter,
                name=name,
                metric=metric,
                examples=examples,
                source_sha256=hashlib.sha256(jsonl).hexdigest(),
            )
            AuditEvent.objects.create(
                actor=actor,
                adapter=adapter,
                action="test_set.created",
                reason=f"{name} ({metric}, {len(examples)} examples)",
            )
    except IntegrityError as exc:  # the same name, attached concurrently
        raise _name_taken(name) from exc
    return test_set


def _clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise DomainError(
            "test_set_name_required", "Give the test set a name.", details={"field": "name"}
        )
    if len(name) > MAX_NAME_CHARS:
        raise DomainError(
            "test_set_name_too_long",
            f"A test set's name is at most {MAX_NAME_CHARS} characters.",
            details={"field": "name"},
        )
    return name


def _name_taken(name: str) -> DomainError:
    return DomainError(
        "test_set_name_taken",
        f"This adapter already has a test set named '{name}'.",
        kind="conflict",
        details={"field": "name"},
    )


def jsonl_examples_parse(jsonl: bytes, *, metric: str) -> list[dict[str, Any]]:
    """JSONL bytes -> ``[{"fields": {"prompt": …}, "target": …, "choices": […]}]``, in the
    shape of a benchmark Example, or a DomainError naming the first bad line."""
    if len(jsonl) > MAX_TEST_SET_BYTES:
        raise DomainError(
            "test_set_too_large",
            f"A test set is at most {MAX_TEST_SET_BYTES // 1024} KiB.",
            kind="too_large",
            details={"field": "file", "max_bytes": MAX_TEST_SET_BYTES},
        )
    try:
        text = jsonl.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DomainError(
            "test_set_not_utf8",
            "The file is not UTF-8 text.",
            details={"field": "file", "offset": exc.start},
        ) from exc
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DomainError("test_set_empty", "The file has no examples.", details={"field": "file"})
    if len(lines) > MAX_TEST_SET_LINES:
        raise DomainError(
            "test_set_too_many_lines",
            f"A test set has at most {MAX_TEST_SET_LINES} examples (this one has {len(lines)}).",
            details={"field": "file", "max_lines": MAX_TEST_SET_LINES, "lines": len(lines)},
        )
    return [_example(number, line, metric) for number, line in lines]


def _example(number: int, line: str, metric: str) -> dict[str, Any]:
    def refuse(code: str, message: str) -> DomainError:
        return DomainError(
            code, f"Line {number}: {message}", details={"field": "file", "line": number}
        )

    try:
        row = json.loads(line)
    except ValueError as exc:
        raise refuse("test_set_line_not_json", "not valid JSON.") from exc
    if not isinstance(row, dict):
        raise refuse("test_set_line_not_object", 'each line must be a JSON object {"prompt": …}.')
    unknown = sorted(set(row) - LINE_FIELDS)
    if unknown:
        raise refuse(
            "test_set_line_unknown_field",
            f"unknown field(s) {', '.join(unknown)}; only prompt, target and choices.",
        )
    prompt, target = row.get("prompt"), row.get("target")
    if not isinstance(prompt, str) or not prompt.strip():
        raise refuse("test_set_prompt_missing", '"prompt" must be a non-empty string.')
    if not isinstance(target, str) or not target.strip():
        raise refuse("test_set_target_missing", '"target" must be a non-empty string.')
    choices = row.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise refuse("test_set_choices_invalid", '"choices" must be a list of non-empty strings.')
    if len(choices) > MAX_CHOICES:
        raise refuse("test_set_choices_invalid", f"at most {MAX_CHOICES} choices.")
    if metric == Task.Metric.MULTIPLE_CHOICE:
        if len(choices) < 2:
            raise refuse("test_set_choices_required", "multiple_choice needs at least two choices.")
        if target not in choices:
            raise refuse("test_set_target_not_in_choices", "the target must be one of the choices.")
    return {"fields": {"prompt": prompt}, "target": target, "choices": choices}
