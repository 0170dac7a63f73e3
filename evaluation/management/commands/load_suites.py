"""Import the built-in benchmark suites (evaluation/suites/*.jsonl), idempotently.

    python manage.py load_suites [--dir DIR]

A file identical to its suite's current version changes nothing; a changed file becomes
the suite's next version (older versions, and every run that used them, stay as they were).
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from evaluation.services.suites import suite_version_import
from tessera.errors import DomainError

BUILT_IN = Path(__file__).resolve().parents[2] / "suites"


class Command(BaseCommand):
    help = "Import every built-in benchmark suite (JSONL) that differs from its current version."

    def add_arguments(self, parser):
        parser.add_argument(
            "--dir", type=Path, default=BUILT_IN, help=f"folder of suite files (default {BUILT_IN})"
        )

    def handle(self, *args, dir: Path, **options):
        files = sorted(Path(dir).glob("*.jsonl"))
        if not files:
            raise CommandError(f"No *.jsonl suite files in {dir}.")
        for path in files:
            try:
                result = suite_version_import(jsonl=path.read_bytes(), actor=None)
            except DomainError as exc:
                raise CommandError(f"{path.name}: {exc.message} [{exc.code}]") from exc
            version = result.version
            if result.created:
                tasks = version.tasks.count()
                self.stdout.write(
                    self.style.SUCCESS(
                        f"{version.suite.slug}: imported as version {version.number} "
                        f"({tasks} tasks)."
                    )
                )
            else:
                self.stdout.write(f"{version.suite.slug}: unchanged (version {version.number}).")
