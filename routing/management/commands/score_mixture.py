"""Score a mixture version now, in this process, and print its scoreboard.

    python manage.py score_mixture            # the active mixture
    python manage.py score_mixture --mixture 3

The same computation as the job queued when a mixture is published: outcomes missing on
the union are measured first (one sandboxed child), then routing decisions are joined with
them. Prints aggregates only (no example leaves the database).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from routing.scoreboard.services import scoreboard_compute_now
from routing.selectors import mixture_by_number_or_active


class Command(BaseCommand):
    help = "Score a mixture version on the union of the built-in suites and print it."

    def add_arguments(self, parser):
        parser.add_argument("--mixture", type=int, help="mixture version number (default: active)")
        parser.add_argument("--json", action="store_true", help="print the figures as JSON")

    def handle(self, *args, mixture: int | None = None, json: bool = False, **options):
        found = mixture_by_number_or_active(mixture)
        if found is None:
            raise CommandError("No such mixture version (none is published yet?).")
        board = scoreboard_compute_now(mixture=found)
        if board.status != board.Status.DONE:
            raise CommandError(f"Scoring failed: {board.failure_reason}")
        if json:
            self.stdout.write(_dumps(board.figures))
            return
        for line in table_lines(board.figures):
            self.stdout.write(line)


def _dumps(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def table_lines(figures: dict) -> list[str]:
    """The scoreboard as Markdown tables, one per split (as the docs quote it)."""
    lines = [
        f"Mixture v{figures['mixture']} ({len(figures['members'])} adapters), "
        f"scored in {figures['seconds']} s"
    ]
    for name, split in figures["splits"].items():
        lines += ["", f"### {name} (n={split['n']})", "", "| system | score |", "|---|---:|"]
        lines.append(f"| base model | {_fmt(split['base'])} |")
        for adapter in split["adapters"]:
            lines.append(f"| {adapter['model_id']} alone | {_fmt(adapter['score'])} |")
        best = split["best_single"]
        if best:
            lines.append(f"| best single ({best['model_id']}) | {_fmt(best['score'])} |")
        for router, routed in split["routers"].items():
            lines.append(f"| routed ({router}) | **{_fmt(routed['score'])}** |")
        lines.append(f"| oracle routing | {_fmt(split['oracle'])} |")
        for router, routed in split["routers"].items():
            lines.append(
                f"| {router}: routed ÷ oracle {_fmt(routed['routed_over_oracle'])}, "
                f"routed − best single {_fmt(routed['routed_minus_best_single'])}, "
                f"router accuracy {_fmt(routed['accuracy'])} (n={routed['accuracy_n']}) | |"
            )
    lines += method_lines(figures)
    if figures.get("unmeasured"):
        lines += ["", f"Not measured: {figures['unmeasured']}"]
    return lines


def method_lines(figures: dict) -> list[str]:
    """Every router and composition method side by side, one table per split."""
    lines: list[str] = []
    for name, split in figures["splits"].items():
        rows = [
            (f"{router}/top1", routed["score"], routed["routed_over_oracle"], None, None)
            for router, routed in split["routers"].items()
        ] + [
            (label, m["score"], m["over_oracle"], m["solved"], m["emergent"])
            for label, m in (split.get("methods") or {}).items()
        ]
        lines += [
            "",
            f"### {name} by method (n={split['n']}; solved by a single model: "
            f"{_fmt(split.get('single_solved'))})",
            "",
            "| router/method | score | ÷ oracle | solved | solved by no single model |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, score, over, solved, emergent in rows:
            lines.append(
                f"| {label} | {_fmt(score)} | {_fmt(over)} | {_fmt(solved)} | {_fmt(emergent)} |"
            )
    if figures.get("methods_failed"):
        lines += ["", f"Compositions not measured: {figures['methods_failed']}"]
    return lines
