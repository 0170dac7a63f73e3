"""Benchmark suites as JSONL: parse and validate the bytes, write the public split back.

One JSON object a line, one file per suite:

    {"suite": "addition", "title": "...", "description": "...", "purpose": "skill"}
    {"task": "addition", "title": "...", "description": "...", "tags": ["addition"],
     "metric": "exact_match", "prompt_template": "{question}", "max_new_tokens": 8}
    {"task": "addition", "split": "hidden", "fields": {"question": "..."}, "target": "579"}
    {"task": "yes-no", "split": "public", "fields": {...}, "target": "Yes",
     "choices": ["Yes", "No"]}
    {"task": "addition", "split": "paraphrase", "prompt_template": "{question}",
     "fields": {"question": "I'd like to know the total of 123 and 456.", ...}, "target": "579"}
    {"task": "sum-then-convert", "split": "hidden", "fields": {...}, "target": "742\n742000"}

The first line is the header; a task line comes before its examples; examples keep their
order within each split (their ``position``). The ``paraphrase`` split is hidden like
``hidden`` (never served publicly) and optional; its examples may carry their own
``prompt_template``, because they hold the whole prompt in words of their own while the
task's template may add an answer-format line. Public and hidden examples always use the
task's template, and one task's paraphrase examples share one template, so each split
still renders with exactly one template. A task scored by the ``parts`` metric holds each
example's answer parts in its target, one a line: two or more, none blank, none repeated,
none found inside another (it would be counted whenever that one is). Every problem is a
DomainError with a stable code, the 1-based line number in ``details["line"]`` where there
is one, and nothing is stored by the caller unless the whole file is valid. Pure Python:
no database, no Django.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from evaluation.worker.scoring import (
    METRICS,
    TemplateError,
    normalize_answer,
    part_found,
    render_prompt,
    template_fields,
)
from tessera.errors import DomainError

MAX_SUITE_BYTES = 32 * 1024 * 1024
MAX_TASKS = 64
MAX_EXAMPLES = 100_000
MAX_NEW_TOKENS = 512
MAX_FIELD_BYTES = 16 * 1024  # one example's fields, target, choices and template, as JSON
MAX_TAGS = 16
EVALUATION_SPLITS = ("public", "hidden", "paraphrase")
# Per task: hidden examples decide admission, so a bootstrap CI needs a few dozen; the
# public split only has to show contributors what the task looks like. Paraphrase
# examples are optional: suites written before that split existed still load.
MIN_EXAMPLES = {"hidden": 30, "public": 5, "paraphrase": 0}
# The splits whose examples may replace the task's prompt_template with their own.
OWN_TEMPLATE_SPLITS = ("paraphrase",)

_SLUG = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")
_TAG = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
_HEADER_KEYS = {"suite", "title", "description", "purpose"}
_TASK_KEYS = {"task", "title", "description", "tags", "metric", "prompt_template", "max_new_tokens"}
_EXAMPLE_KEYS = {"task", "split", "fields", "target", "choices", "prompt_template"}
# composite: tasks needing two skills in one answer, which judge composed mixtures only.
PURPOSES = ("skill", "general", "composite")


@dataclass(frozen=True)
class ParsedExample:
    split: str
    fields: dict[str, Any]
    target: str
    choices: list[str] = field(default_factory=list)
    line: int = 0
    prompt_template: str = ""  # blank: the task's


@dataclass(frozen=True)
class ParsedTask:
    slug: str
    title: str
    description: str
    tags: list[str]
    metric: str
    prompt_template: str
    max_new_tokens: int
    examples: list[ParsedExample]
    line: int = 0

    def split(self, split: str) -> list[ParsedExample]:
        return [example for example in self.examples if example.split == split]

    def template(self, split: str) -> str:
        """The template ``split``'s examples render with (one per split; see the module
        docstring)."""
        own = next((e.prompt_template for e in self.split(split) if e.prompt_template), "")
        return own or self.prompt_template


@dataclass(frozen=True)
class ParsedSuite:
    slug: str
    title: str
    description: str
    purpose: str
    tasks: list[ParsedTask]
    source_sha256: str

    def task(self, slug: str) -> ParsedTask | None:
        return next((task for task in self.tasks if task.slug == slug), None)


def parse_suite_jsonl(
    data: bytes,
    *,
    splits: Collection[str] = EVALUATION_SPLITS,
    min_examples: Mapping[str, int] | None = None,
) -> ParsedSuite:
    """Parse and validate a suite file; raise DomainError naming the first problem.

    ``splits`` are the split names allowed (training files use ``("train",)``);
    ``min_examples`` the least number of examples each task needs in each split (default
    MIN_EXAMPLES; ``{}`` for none).
    """
    minimum = MIN_EXAMPLES if min_examples is None else dict(min_examples)
    if len(data) > MAX_SUITE_BYTES:
        raise DomainError(
            "suite_too_large",
            f"The suite file is {len(data)} bytes; the limit is {MAX_SUITE_BYTES}.",
            kind="too_large",
            details={"size_bytes": len(data), "max_bytes": MAX_SUITE_BYTES},
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DomainError("suite_not_utf8", "The suite file is not UTF-8 text.") from exc
    if text.startswith("\ufeff"):
        text = text[1:]

    header: dict[str, Any] | None = None
    tasks: dict[str, dict[str, Any]] = {}
    example_count = 0
    # Split on "\n" only: str.splitlines would also split inside strings holding U+2028
    # and friends, which JSON allows unescaped.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        obj = _load_line(raw, number)
        if header is None:
            header = _header(obj, number)
            continue
        # Examples may carry a prompt_template too; only they have a split.
        if "split" not in obj and ("metric" in obj or "prompt_template" in obj):
            task = _task(obj, number)
            if task["slug"] in tasks:
                raise _error(
                    "suite_task_duplicate", f"Task {task['slug']!r} is declared twice.", number
                )
            if len(tasks) >= MAX_TASKS:
                raise _error(
                    "suite_too_many_tasks", f"A suite holds at most {MAX_TASKS} tasks.", number
                )
            tasks[task["slug"]] = task
            continue
        example_count += 1
        if example_count > MAX_EXAMPLES:
            raise _error(
                "suite_too_many_examples", f"A suite holds at most {MAX_EXAMPLES} examples.", number
            )
        slug, example = _example(obj, number, splits)
        task = tasks.get(slug)
        if task is None:
            raise _error(
                "suite_task_unknown",
                f"The example is for task {slug!r}, which no earlier line declares.",
                number,
            )
        _check_example(task, example)
        _check_one_template_per_split(task, example)
        task["examples"].append(example)

    if header is None:
        raise DomainError("suite_empty", "The suite file holds no lines.")
    if not tasks:
        raise DomainError("suite_no_tasks", "The suite declares no tasks.")
    for task in tasks.values():
        for split, least in minimum.items():
            have = sum(1 for example in task["examples"] if example.split == split)
            if have < least:
                raise DomainError(
                    "suite_too_few_examples",
                    f"Task {task['slug']!r} has {have} {split} examples; at least {least} "
                    "are needed.",
                    details={"task": task["slug"], "split": split, "count": have, "min": least},
                )
    return ParsedSuite(
        slug=header["suite"],
        title=header["title"],
        description=header["description"],
        purpose=header["purpose"],
        tasks=[
            ParsedTask(**{k: v for k, v in task.items() if k != "_fields"})
            for task in tasks.values()
        ],
        source_sha256=hashlib.sha256(data).hexdigest(),
    )


def public_jsonl(
    *,
    suite: Mapping[str, Any],
    tasks: list[Mapping[str, Any]],
    examples: Mapping[str, list[Mapping[str, Any]]],
) -> bytes:
    """A suite file holding only what is given: the caller passes PUBLIC examples only.

    ``suite``: header fields; ``tasks``: task lines' fields; ``examples``: by task slug,
    dicts with fields/target/choices. The result parses with parse_suite_jsonl(...,
    min_examples={}).
    """
    lines = [
        {
            "suite": suite["suite"],
            "title": suite["title"],
            "description": suite["description"],
            "purpose": suite["purpose"],
        }
    ]
    for task in tasks:
        lines.append({key: task[key] for key in sorted(_TASK_KEYS, key=_task_key_order)})
        for example in examples.get(task["task"], []):
            line = {
                "task": task["task"],
                "split": "public",
                "fields": example["fields"],
                "target": example["target"],
            }
            if example.get("choices"):
                line["choices"] = example["choices"]
            lines.append(line)
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


# --- Secret splits ----------------------------------------------------------------------------

# What a private file holds and a committed built-in file must not: the splits admission
# and the scoreboard judge on.
SECRET_SPLITS = ("hidden", "paraphrase")


def merged_jsonl(*, public: bytes, secret: bytes) -> bytes:
    """A complete suite file: ``public`` (a committed file: header, tasks, public examples,
    no secret split) followed by the examples of ``secret`` (a private file: a header naming
    the same suite, then hidden and paraphrase example lines only, for tasks the committed
    file declares). The result is validated whole, as an upload would be; a problem in the
    private part names its line in that file (``details["line"]``, ``details["file"]`` is
    ``"private"``)."""
    committed = parse_suite_jsonl(public, min_examples={})
    held = sorted(
        {example.split for task in committed.tasks for example in task.examples}
        & set(SECRET_SPLITS)
    )
    if held:
        raise DomainError(
            "suite_public_holds_secret",
            f"The committed file of suite {committed.slug!r} holds {' and '.join(held)} "
            "examples; they belong in the private part only.",
            details={"suite": committed.slug, "splits": held},
        )
    if len(secret) > MAX_SUITE_BYTES:
        raise DomainError(
            "suite_too_large",
            f"The private file is {len(secret)} bytes; the limit is {MAX_SUITE_BYTES}.",
            kind="too_large",
            details={"size_bytes": len(secret), "max_bytes": MAX_SUITE_BYTES, "file": "private"},
        )
    try:
        text = secret.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise DomainError("suite_not_utf8", "The private file is not UTF-8 text.") from exc
    tasks = {task.slug for task in committed.tasks}
    header_seen = False
    kept: list[tuple[int, str]] = []  # (line number in the private file, raw line)
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        obj = _load_line(raw, number)
        if not header_seen:
            _private_header(obj, committed, number)
            header_seen = True
            continue
        if obj.get("split") not in SECRET_SPLITS:
            raise _private_error(
                "suite_private_line_invalid",
                f"Line {number} of the private file is not a hidden or paraphrase example; "
                "task lines and public examples live in the committed file.",
                number,
            )
        if obj.get("task") not in tasks:
            raise _private_error(
                "suite_task_unknown",
                f"The example is for task {obj.get('task')!r}, which the committed file of "
                f"suite {committed.slug!r} does not declare.",
                number,
            )
        kept.append((number, raw))
    if not header_seen:
        raise DomainError("suite_empty", "The private file holds no lines.")
    body = public.decode("utf-8").removeprefix("\ufeff")
    if body and not body.endswith("\n"):
        body += "\n"
    offset = body.count("\n")
    merged = (body + "".join(raw + "\n" for _, raw in kept)).encode()
    try:
        parse_suite_jsonl(merged)
    except DomainError as exc:
        line = exc.details.get("line")
        if isinstance(line, int) and line > offset:
            exc.details["line"] = kept[line - offset - 1][0]
            exc.details["file"] = "private"
        raise
    return merged


def _private_header(obj: dict[str, Any], committed: ParsedSuite, number: int) -> None:
    if obj.get("suite") != committed.slug:
        raise _private_error(
            "suite_private_header_invalid",
            f"The private file's first line must be the header of suite {committed.slug!r} "
            f'({{"suite": "{committed.slug}"}}), not {str(obj.get("suite"))[:64]!r}.',
            number,
        )
    _no_unknown_keys(obj, _HEADER_KEYS, number, "suite_private_header_invalid")
    given = {"title": committed.title, "description": committed.description}
    given["purpose"] = committed.purpose
    for key, value in given.items():
        if key in obj and obj[key] != value:
            raise _private_error(
                "suite_private_header_invalid",
                f"The private file's header gives another {key} than the committed file's.",
                number,
            )


def _private_error(code: str, message: str, line: int) -> DomainError:
    return DomainError(code, message, details={"line": line, "file": "private"})


# --- Lines ------------------------------------------------------------------------------------


def sampled_jsonl(data: bytes, *, keep: Mapping[str, int]) -> bytes:
    """A suite file with only the first ``keep[split]`` examples of each task's splits (a
    split not named is kept whole): the same suite, smaller, for a development demo or a
    test that must run the real model in minutes. Lines are kept as they are, so the
    result parses exactly as the original would, less the examples cut."""
    counts: dict[tuple[str, str], int] = {}
    kept = []
    for line in data.decode().splitlines():
        row = json.loads(line) if line.strip() else {}
        split = row.get("split")
        if split is not None and split in keep:
            key = (row.get("task"), split)
            counts[key] = counts.get(key, 0) + 1
            if counts[key] > keep[split]:
                continue
        kept.append(line)
    return ("\n".join(kept) + "\n").encode()


def _task_key_order(key: str) -> int:
    return [
        "task",
        "title",
        "description",
        "tags",
        "metric",
        "prompt_template",
        "max_new_tokens",
    ].index(key)


def _load_line(raw: str, number: int) -> dict[str, Any]:
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _error(
            "suite_invalid_json", f"Line {number} is not valid JSON: {exc}", number
        ) from exc
    if not isinstance(obj, dict):
        raise _error("suite_invalid_json", f"Line {number} is not a JSON object.", number)
    return obj


def _header(obj: dict[str, Any], number: int) -> dict[str, Any]:
    if "suite" not in obj:
        raise _error(
            "suite_header_invalid",
            'The first line must be the suite header {"suite": slug, "title", '
            '"description", "purpose"}.',
            number,
        )
    _no_unknown_keys(obj, _HEADER_KEYS, number, "suite_header_invalid")
    slug = obj["suite"]
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise _error(
            "suite_header_invalid", "The suite slug must be letters, digits, - or _.", number
        )
    title = _text(obj, "title", number, "suite_header_invalid", required=True, limit=200)
    description = _text(obj, "description", number, "suite_header_invalid", limit=10_000)
    purpose = obj.get("purpose", "skill")
    if purpose not in PURPOSES:
        raise _error(
            "suite_header_invalid",
            f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}.",
            number,
        )
    return {"suite": slug, "title": title, "description": description, "purpose": purpose}


def _task(obj: dict[str, Any], number: int) -> dict[str, Any]:
    _no_unknown_keys(obj, _TASK_KEYS, number, "suite_task_invalid")
    slug = obj.get("task")
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise _error("suite_task_invalid", "A task's slug must be letters, digits, - or _.", number)
    metric = obj.get("metric")
    if metric not in METRICS:
        raise _error(
            "suite_unknown_metric",
            f"Task {slug!r} names metric {metric!r}; known: {', '.join(METRICS)}.",
            number,
        )
    template = obj.get("prompt_template")
    if not isinstance(template, str) or not template.strip():
        raise _error("suite_template_invalid", f"Task {slug!r} has no prompt_template.", number)
    try:
        names = template_fields(template)
    except TemplateError as exc:
        raise _error(
            "suite_template_invalid", f"Task {slug!r}'s prompt_template: {exc}.", number
        ) from exc
    tags = obj.get("tags", [])
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(tag, str) and _TAG.match(tag) for tag in tags)
    ):
        raise _error(
            "suite_task_invalid",
            f"Task {slug!r}: tags must be a list of at most {MAX_TAGS} lowercase slugs.",
            number,
        )
    max_new_tokens = obj.get("max_new_tokens", 16)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not 1 <= max_new_tokens <= MAX_NEW_TOKENS
    ):
        raise _error(
            "suite_task_invalid",
            f"Task {slug!r}: max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}.",
            number,
        )
    return {
        "slug": slug,
        "title": _text(obj, "title", number, "suite_task_invalid", limit=200) or slug,
        "description": _text(obj, "description", number, "suite_task_invalid", limit=10_000),
        "tags": list(dict.fromkeys(tags)),
        "metric": metric,
        "prompt_template": template,
        "max_new_tokens": max_new_tokens,
        "examples": [],
        "line": number,
        "_fields": names,
    }


def _example(
    obj: dict[str, Any], number: int, splits: Collection[str]
) -> tuple[str, ParsedExample]:
    if "task" not in obj:
        raise _error(
            "suite_line_invalid", f"Line {number} is neither a task nor an example.", number
        )
    _no_unknown_keys(obj, _EXAMPLE_KEYS, number, "suite_example_invalid")
    slug = obj["task"]
    if not isinstance(slug, str):
        raise _error("suite_example_invalid", "An example's task must be a slug.", number)
    split = obj.get("split")
    if split not in splits:
        raise _error(
            "suite_split_invalid",
            f"split must be one of {', '.join(sorted(splits))}, not {split!r}.",
            number,
        )
    fields = obj.get("fields", {})
    if not isinstance(fields, dict) or not all(
        isinstance(key, str) and _is_field_value(value) for key, value in fields.items()
    ):
        raise _error(
            "suite_example_invalid",
            "fields must be an object of strings, numbers or booleans.",
            number,
        )
    target = obj.get("target")
    if not isinstance(target, str) or not target.strip():
        raise _error("suite_example_invalid", "target must be a non-empty string.", number)
    choices = obj.get("choices", [])
    if not isinstance(choices, list) or not all(
        isinstance(choice, str) and choice for choice in choices
    ):
        raise _error(
            "suite_example_invalid", "choices must be a list of non-empty strings.", number
        )
    template = obj.get("prompt_template", "")
    if template != "":
        if split not in OWN_TEMPLATE_SPLITS:
            raise _error(
                "suite_example_invalid",
                f"Only {', '.join(OWN_TEMPLATE_SPLITS)} examples carry their own "
                f"prompt_template; {split} examples use the task's.",
                number,
            )
        if not isinstance(template, str) or not template.strip():
            raise _error(
                "suite_template_invalid", "An example's prompt_template must be text.", number
            )
        try:
            template_fields(template)
        except TemplateError as exc:
            raise _error(
                "suite_template_invalid", f"The example's prompt_template: {exc}.", number
            ) from exc
    size = len(json.dumps([fields, target, choices, template], ensure_ascii=False).encode())
    if size > MAX_FIELD_BYTES:
        raise _error(
            "suite_example_too_large",
            f"The example is {size} bytes; the limit is {MAX_FIELD_BYTES}.",
            number,
        )
    return slug, ParsedExample(
        split=split,
        fields=fields,
        target=target,
        choices=choices,
        line=number,
        prompt_template=template,
    )


def _check_example(task: dict[str, Any], example: ParsedExample) -> None:
    number = example.line
    template = example.prompt_template or task["prompt_template"]
    whose = "its own" if example.prompt_template else f"task {task['slug']!r}'s"
    names = template_fields(template) if example.prompt_template else task["_fields"]
    missing = names - set(example.fields)
    if missing:
        raise _error(
            "suite_template_field_missing",
            f"The example lacks {', '.join(sorted(missing))}, which {whose} prompt_template uses.",
            number,
            missing=sorted(missing),
        )
    try:
        render_prompt(template, example.fields)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise _error(
            "suite_template_invalid",
            f"The example cannot fill {whose} prompt_template: {exc}.",
            number,
        ) from exc
    if task["metric"] == "multiple_choice":
        if len(example.choices) < 2:
            raise _error(
                "suite_choices_required",
                f"Task {task['slug']!r} is multiple_choice: each example needs two or more "
                "choices.",
                number,
            )
        if len(set(example.choices)) != len(example.choices):
            raise _error("suite_choices_invalid", "The choices repeat themselves.", number)
        if example.target not in example.choices:
            raise _error(
                "suite_target_not_in_choices", "The target must be one of the choices.", number
            )
    elif example.choices:
        raise _error(
            "suite_choices_invalid",
            f"Task {task['slug']!r} is {task['metric']}; only multiple_choice examples have "
            "choices.",
            number,
        )
    if task["metric"] == "parts":
        _check_parts(task["slug"], example.target, number)


def _check_parts(slug: str, target: str, number: int) -> None:
    # The metric reads the same lines (scoring.target_parts drops blank ones); refusing
    # what it would silently skip keeps a target's parts exactly what its author wrote.
    lines = [line.strip() for line in target.split("\n")]
    if len(lines) < 2:
        raise _error(
            "suite_parts_invalid",
            f"Task {slug!r} is scored by parts: the target must hold two or more parts, "
            "one a line.",
            number,
        )
    normalised = [normalize_answer(line) for line in lines]
    for index, (line, norm) in enumerate(zip(lines, normalised, strict=True), start=1):
        if not norm:
            raise _error(
                "suite_parts_invalid",
                f"Part {index} of the target is blank (or only punctuation).",
                number,
                part=index,
            )
        if norm in normalised[: index - 1]:
            raise _error(
                "suite_parts_invalid",
                f"Part {index} of the target ({line!r}) repeats an earlier part.",
                number,
                part=index,
            )
    for index, line in enumerate(lines, start=1):
        for other, holder in enumerate(lines, start=1):
            if other != index and part_found(line, holder):
                raise _error(
                    "suite_parts_invalid",
                    f"Part {index} of the target ({line!r}) is inside part {other} "
                    f"({holder!r}), so it would be found whenever that one is.",
                    number,
                    part=index,
                )


def _check_one_template_per_split(task: dict[str, Any], example: ParsedExample) -> None:
    # A split is scored as one unit, one TaskSpec with one template.
    template = example.prompt_template or task["prompt_template"]
    for earlier in task["examples"]:
        if earlier.split == example.split:
            if (earlier.prompt_template or task["prompt_template"]) != template:
                raise _error(
                    "suite_template_invalid",
                    f"Task {task['slug']!r}'s {example.split} examples must share one "
                    f"prompt_template; line {earlier.line} uses another.",
                    example.line,
                )
            return


# --- Small helpers ----------------------------------------------------------------------------


def _is_field_value(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and not (
        isinstance(value, float) and value != value
    )


def _text(
    obj: dict[str, Any], key: str, number: int, code: str, *, required: bool = False, limit: int
) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > limit or (required and not value.strip()):
        need = "a non-empty string" if required else "a string"
        raise _error(code, f"{key} must be {need} of at most {limit} characters.", number)
    return value.strip()


def _no_unknown_keys(obj: dict[str, Any], allowed: set[str], number: int, code: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _error(code, f"Unknown keys on line {number}: {', '.join(unknown)}.", number)


def _error(code: str, message: str, line: int, **details: Any) -> DomainError:
    return DomainError(code, message, details={"line": line, **details})
