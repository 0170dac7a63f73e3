"""Import the built-in benchmark suites (evaluation/suites/*.jsonl), idempotently.

    python manage.py load_suites [--dir DIR] [--sample]

A file identical to its suite's current version changes nothing; a changed file becomes
the suite's next version (older versions, and every run that used them, stay as they were).

``--sample`` imports the suites cut to the first examples of each split, the least a suite
may hold, so that a development machine evaluates the demo adapters in minutes instead of
hours (``make run`` does this unless FULL_SUITES=1). Its figures are noisier (30 hidden
examples a task) but come from the same distribution; a later run without ``--sample``
makes the whole files the suites' next versions.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from evaluation.services.suites import suite_version_import
from evaluation.suite_io import MIN_EXAMPLES, sampled_jsonl
from tessera.errors import DomainError

BUILT_IN = Path(__file__).resolve().parents[2] / "suites"
# What --sample keeps of each task: the fewest hidden and public examples a suite may have,
# and ten paraphrases (the router's test on unseen wording).
SAMPLE = {"hidden": MIN_EXAMPLES["hidden"], "public": MIN_EXAMPLES["public"], "paraphrase": 10}


class Command(BaseCommand):
    help = "Import every built-in benchmark suite (JSONL) that differs from its current version."

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

    def handle(self, *args, dir: Path, sample: bool = False, **options):
        files = sorted(Path(dir).glob("*.jsonl"))
        if not files:
            raise CommandError(f"No *.jsonl suite files in {dir}.")
        for path in files:
            try:
                data = path.read_bytes()
                if sample:
                    data = sampled_jsonl(data, keep=SAMPLE)
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
