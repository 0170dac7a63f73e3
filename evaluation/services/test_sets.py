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

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from contributions.models import Adapter, AuditEvent
from contributions.services import contributor_lock
from evaluation.models import ContributorTestSet, Task
from tessera.errors import DomainError

MAX_TEST_SET_BYTES = 1024 * 1024
# The default of TESSERA_TEST_SET_MAX_EXAMPLES, which is what is enforced.
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
    _check_test_set_count(adapter=adapter)
    examples = jsonl_examples_parse(jsonl, metric=metric)
    if ContributorTestSet.objects.filter(adapter=adapter, name=name).exists():
        raise _name_taken(name)
    try:
        with transaction.atomic():
            contributor_lock(user_id=adapter.owner_id)  # so the count below stays exact
            _check_test_set_count(adapter=adapter)
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


def _check_test_set_count(*, adapter: Adapter) -> None:
    """At most TESSERA_TEST_SETS_PER_ADAPTER test sets on an adapter (every run of it
    scores them all, so this bounds what one upload costs the workers) and
    TESSERA_TEST_SETS_PER_CONTRIBUTOR across a contributor's adapters (what they store)."""
    per_adapter = settings.TESSERA_TEST_SETS_PER_ADAPTER
    on_adapter = ContributorTestSet.objects.filter(adapter=adapter).count()
    if on_adapter >= per_adapter:
        raise DomainError(
            "test_set_limit_reached",
            f"This adapter has {on_adapter} test sets, the most allowed is {per_adapter}.",
            kind="conflict",
            details={"scope": "adapter", "limit": per_adapter, "count": on_adapter},
        )
    per_owner = settings.TESSERA_TEST_SETS_PER_CONTRIBUTOR
    owned = ContributorTestSet.objects.filter(adapter__owner_id=adapter.owner_id).count()
    if owned >= per_owner:
        raise DomainError(
            "test_set_limit_reached",
            f"Your adapters have {owned} test sets together, the most allowed is {per_owner}.",
            kind="conflict",
            details={"scope": "contributor", "limit": per_owner, "count": owned},
        )


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
    max_lines = settings.TESSERA_TEST_SET_MAX_EXAMPLES
    if len(lines) > max_lines:
        raise DomainError(
            "test_set_too_many_lines",
            f"A test set has at most {max_lines} examples (this one has {len(lines)}).",
            details={"field": "file", "max_lines": max_lines, "lines": len(lines)},
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
    # Each example becomes a prompt the workers run through the model twice (base and
    # adapter); a bound per example keeps one line from being most of the file's budget.
    size = len(prompt) + len(target) + sum(len(choice) for choice in choices)
    max_chars = settings.TESSERA_TEST_SET_EXAMPLE_MAX_CHARS
    if size > max_chars:
        raise refuse(
            "test_set_example_too_long",
            f"the prompt, target and choices come to {size} characters; at most {max_chars}.",
        )
    if metric == Task.Metric.MULTIPLE_CHOICE:
        if len(choices) < 2:
            raise refuse("test_set_choices_required", "multiple_choice needs at least two choices.")
        if target not in choices:
            raise refuse("test_set_target_not_in_choices", "the target must be one of the choices.")
    return {"fields": {"prompt": prompt}, "target": target, "choices": choices}
