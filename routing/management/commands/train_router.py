"""Train a mixture version's learned router now, in this process, and print what it chose.

    python manage.py train_router            # the active mixture
    python manage.py train_router --mixture 3 --json

The same computation as the job queued when a mixture is published: outcomes missing on
the public splits are measured first (one sandboxed child), then both kinds are tuned and
compared by cross-validation (routing.learned.fit says how). A serving process picks the
new router up at its next poll. Prints counts and accuracies only (no example leaves the database).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from routing.learned.services import learned_router_train_now
from routing.selectors import mixture_by_number_or_active


class Command(BaseCommand):
    help = "Train a mixture version's learned router and print how it routed held-out examples."

    def add_arguments(self, parser):
        parser.add_argument("--mixture", type=int, help="mixture version number (default: active)")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")

    def handle(self, *args, mixture: int | None = None, json: bool = False, **options):
        found = mixture_by_number_or_active(mixture)
        if found is None:
            raise CommandError("No such mixture version (none is published yet?).")
        router = learned_router_train_now(mixture=found)
        if router.status != router.Status.DONE:
            raise CommandError(f"Training failed: {router.failure_reason}")
        result = {
            "mixture": found.number,
            "kind": router.kind,
            "params": router.params,
            "cv_accuracy": {
                kind: {
                    "right": entry.get("right"),
                    "accuracy": entry["accuracy"],
                    "base_kept": entry.get("base_kept"),
                    "params": entry["params"],
                    "n": entry["n"],
                }
                for kind, entry in router.cv_accuracy.items()
            },
            "training": router.training,
        }
        if json:
            self.stdout.write(_dumps(result))
            return
        training = router.training
        self.stdout.write(
            f"Mixture v{found.number}: learned router {router.kind} {_params(router.params)}, "
            f"trained on {training.get('public_examples', 0)} public examples and "
            f"{training.get('example_prompts', 0)} example prompts, "
            f"{training.get('candidates', 0)} candidates"
        )
        self.stdout.write(
            "| kind | cross-validated: routed right | routing accuracy "
            "| unsolved kept on the base model | best params | n |"
        )
        self.stdout.write("|---|---:|---:|---:|---|---:|")
        for kind, entry in result["cv_accuracy"].items():
            self.stdout.write(
                f"| {kind}{' (chosen)' if kind == router.kind else ''} | "
                f"{_share(entry['right'])} | {_share(entry['accuracy'])} | "
                f"{_share(entry['base_kept'])} | "
                f"{_params(entry['params'])} | {entry['n']} |"
            )


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _params(params: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


def _dumps(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True)
