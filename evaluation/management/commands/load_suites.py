"""Import the built-in benchmark suites, idempotently, with their secret splits.

    python manage.py load_suites [--dir DIR] [--sample] [--private FILE ...] [--replace]

The committed files (evaluation/suites/*.jsonl) hold each suite's header, tasks and public
split. Their hidden and paraphrase examples (the composite suite's hidden ones too) are
drawn here from the secret seed TESSERA_SUITE_SEED (evaluation.suites.generate, away from
every committed key), or taken from a private file given with ``--private`` (a suite's
header, then its hidden and paraphrase example lines: what ``generate.py --secret-out``
writes; a folder stands for its *.jsonl files). Every file is built and validated before
anything is imported.

Loading again with the same seed and files changes nothing. A changed committed file
becomes the suite's next version (older versions, and every run that used them, stay as
they were). Another seed, or another private file, would change the secret examples that
outcomes already measured refer to, so it is refused unless ``--replace`` is given; then the
new examples become the next versions, and what was measured on the old ones stays with
the old versions.

``--sample`` imports the suites cut to the first examples of each split, the least a suite
may hold, so that a development machine evaluates the demo adapters in minutes instead of
hours (``make run`` does this unless FULL_SUITES=1). Its figures are noisier (30 hidden
examples a task) but come from the same distribution; a later run without ``--sample``
makes the whole suites their next versions (the sample's examples are the first of the
whole's, so this is the same seed, not a replacement).
"""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from evaluation.services.suites import suite_version_import
from evaluation.suite_io import MIN_EXAMPLES, SECRET_SPLITS, parse_suite_jsonl, sampled_jsonl
from evaluation.suites import HERE, SEED_FILE, committed_files, complete_suite
from evaluation.suites_selectors import suite_secret_examples
from tessera.errors import DomainError

BUILT_IN = HERE
# What --sample keeps of each task: the fewest hidden examples a suite may have, ten
# paraphrases (the router's test on unseen wording) and twenty public examples. Public
# examples cost nothing until the learned router measures every candidate on them, and it
# learns what each candidate does from them: with the five a suite may have, a general
# task's five outcomes per candidate were too few to tell which adapter beats the base
# model there, and cross-validation too coarse to tell two routers apart.
SAMPLE = {"hidden": MIN_EXAMPLES["hidden"], "public": 20, "paraphrase": 10}


class Command(BaseCommand):
    help = (
        "Import every built-in benchmark suite, its secret splits drawn from "
        "TESSERA_SUITE_SEED or read from --private files, where it differs from the "
        "current version."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dir", type=Path, default=BUILT_IN, help=f"folder of suite files (default {BUILT_IN})"
        )
        parser.add_argument(
            "--sample",
            action="store_true",
            help="import only the first examples of each split (a development demo's suites: "
            + ", ".join(f"{n} {split}" for split, n in SAMPLE.items())
            + " per task)",
        )
        parser.add_argument(
            "--private",
            type=Path,
            action="append",
            default=[],
            metavar="FILE",
            help="a suite's secret part (hidden and paraphrase examples) instead of the "
            "seed's; a folder stands for its *.jsonl files; may be repeated",
        )
        parser.add_argument(
            "--replace",
            action="store_true",
            help="import even when the secret examples differ from the current versions' "
            "(another seed or private file)",
        )

    def handle(
        self,
        *args,
        dir: Path,
        sample: bool = False,
        private: list[Path] | None = None,
        replace: bool = False,
        **options,
    ):
        files = committed_files(Path(dir))
        if not files:
            raise CommandError(f"No *.jsonl suite files in {dir}.")
        secrets = _private_parts(private or [])
        unknown = sorted(set(secrets) - {path.stem for path in files})
        if unknown:
            raise CommandError(
                f"Private files for suites with no committed file in {dir}: {', '.join(unknown)}."
            )
        # Everything is built and checked before anything is stored.
        built: list[tuple[Path, bytes]] = []
        for path in files:
            try:
                data = complete_suite(path, private=secrets)
                if sample:
                    data = sampled_jsonl(data, keep=SAMPLE)
                parsed = parse_suite_jsonl(data)
            except DomainError as exc:
                where = f" (line {exc.details['line']})" if "line" in exc.details else ""
                origin = "private file" if exc.details.get("file") == "private" else "file"
                raise CommandError(
                    f"{path.name}: {origin}{where}: {exc.message} [{exc.code}]"
                ) from exc
            changed = _secret_changes(parsed)
            if changed and not replace:
                raise CommandError(
                    f"{parsed.slug}: the secret examples differ from the current version's "
                    f"({', '.join(changed)}): another TESSERA_SUITE_SEED or private file than "
                    "the one it was loaded with. Outcomes already measured refer to the old "
                    "examples; nothing was imported. Pass --replace to make the new examples "
                    "the next versions anyway."
                )
            built.append((path, data))
        self.stdout.write(f"Secret splits: {_source(secrets, files)}.")
        for path, data in built:
            try:
                result = suite_version_import(jsonl=data, actor=None)
            except DomainError as exc:
                raise CommandError(f"{path.name}: {exc.message} [{exc.code}]") from exc
            version = result.version
            if result.created:
                tasks = version.tasks.count()
                self.stdout.write(
                    self.style.SUCCESS(
                        f"{version.suite.slug}: imported as version {version.number} "
                        f"({tasks} tasks{', sampled' if sample else ''})."
                    )
                )
            else:
                self.stdout.write(f"{version.suite.slug}: unchanged (version {version.number}).")


def _source(secrets: dict[str, bytes], files: list[Path]) -> str:
    """Where the secret examples came from, in words (never the seed itself)."""
    from django.conf import settings

    drawn = [path.stem for path in files if path.stem not in secrets]
    origin = (
        "TESSERA_SUITE_SEED"
        if settings.TESSERA_SUITE_SEED
        else f"the development seed in {Path(settings.VAR_DIR) / SEED_FILE}"
    )
    parts = []
    if secrets:
        parts.append(f"private files for {', '.join(sorted(secrets))}")
    if drawn:
        parts.append(f"drawn from {origin} for the rest" if secrets else f"drawn from {origin}")
    return "; ".join(parts)


def _private_parts(paths: list[Path]) -> dict[str, bytes]:
    """Private files by the suite their header names."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            found.append(path)
        else:
            raise CommandError(f"No private file {path}.")
    parts: dict[str, bytes] = {}
    for path in found:
        data = path.read_bytes()
        slug = _header_slug(data)
        if slug is None:
            raise CommandError(f"{path}: the first line is not a suite header naming its suite.")
        if slug in parts:
            raise CommandError(f"{path}: a second private file for suite {slug!r}.")
        parts[slug] = data
    return parts


def _header_slug(data: bytes) -> str | None:
    for raw in data.decode("utf-8", errors="replace").removeprefix("\ufeff").split("\n"):
        if raw.strip():
            try:
                obj = json.loads(raw)
            except ValueError:
                return None
            slug = obj.get("suite") if isinstance(obj, dict) else None
            return slug if isinstance(slug, str) else None
    return None


def _secret_changes(parsed) -> list[str]:
    """The task splits whose secret examples would change: neither the current version's
    nor the new ones are the first examples of the other (a sample of the same seed's are)."""
    current = suite_secret_examples(slug=parsed.slug)
    if current is None:
        return []
    new = {
        (task.slug, split): [
            (e.fields, e.target, list(e.choices), e.prompt_template) for e in task.split(split)
        ]
        for task in parsed.tasks
        for split in SECRET_SPLITS
    }
    changed = []
    for key in sorted(set(current) | set(new)):
        old, fresh = current.get(key, []), new.get(key, [])
        shorter = min(len(old), len(fresh))
        if old[:shorter] != fresh[:shorter]:
            changed.append(f"{key[0]} {key[1]}")
    return changed
