"""Follow the demo adapters from upload to a live, scored mixture (what ``make run`` shows).

    python manage.py follow_demo [--api-url http://127.0.0.1:8001] [--site-url ...]
                                 [--timeout 3600] [--started EPOCH] [--no-approve]

Prints each demo version's evaluation progress, approves every version that passed as the
demo maintainer (through the review service, with a reason; ``--no-approve`` leaves that to
a person in the review queue), waits for the mixture's scoreboard and for the inference
server to serve that mixture, then prints the board and the URLs. Exits 0 when the mixture
serves, 1 on the timeout (the servers keep running either way).
"""

from __future__ import annotations

import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.test.utils import override_settings

from routing.demo import DemoState, VersionLine, board_summary, demo_step, serving_mixture

# How often a running evaluation's progress is printed again when nothing else changed.
PROGRESS_EVERY = 15.0
CONSOLE_MAIL = "django.core.mail.backends.console.EmailBackend"
FILE_MAIL = "django.core.mail.backends.filebased.EmailBackend"


class Command(BaseCommand):
    help = (
        "Follow the demo adapters' evaluation to a live mixture, approving as the demo maintainer."
    )

    def add_arguments(self, parser):
        parser.add_argument("--api-url", default="http://127.0.0.1:8001")
        parser.add_argument("--site-url", default="http://127.0.0.1:8000")
        parser.add_argument("--interval", type=float, default=2.0)
        parser.add_argument("--timeout", type=float, default=3600.0)
        parser.add_argument(
            "--started",
            type=float,
            default=None,
            help="when `make run` started (seconds since the epoch), to say how long it took",
        )
        parser.add_argument(
            "--no-approve",
            action="store_true",
            help="leave the review decisions to a maintainer in the review queue",
        )

    def handle(self, *args, **options):
        # The review e-mails to the demo contributors would be printed in the middle of the
        # progress by the development console backend: they go to var/mail/ instead.
        if settings.EMAIL_BACKEND == CONSOLE_MAIL:
            mail = Path(settings.VAR_DIR) / "mail"
            with override_settings(EMAIL_BACKEND=FILE_MAIL, EMAIL_FILE_PATH=str(mail)):
                return self._follow(options)
        return self._follow(options)

    def _follow(self, options) -> None:
        started = options["started"] or time.time()
        deadline = time.monotonic() + options["timeout"]
        printed: dict[str, str] = {}
        last_progress = 0.0
        said_board = said_serving = ""
        while True:
            state = demo_step(approve=not options["no_approve"])
            if not state.versions:
                self.stdout.write("No demo adapters were uploaded (seed_demo --adapters does).")
                return
            for line in state.versions:
                words = _status_words(line)
                if printed.get(line.model_id) != words:
                    printed[line.model_id] = words
                    self.stdout.write(f"  {line.model_id} v{line.number}: {words}")
                    for rule in line.failed_rules:
                        self.stdout.write(f"      failed: {rule}")
            for model_id in state.approved:
                self.stdout.write(f"  {model_id}: approved by the demo maintainer")
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY and _progress(state):
                last_progress = now
                self.stdout.write(f"  {_progress(state)} ({_minutes(time.time() - started)})")
            if state.settled:
                if not state.admitted:
                    self.stdout.write(self.style.WARNING("No demo adapter was admitted."))
                    return
                board = _board_words(state)
                if board != said_board:
                    said_board = board
                    self.stdout.write(f"  {board}")
                if state.scored:
                    serving = serving_mixture(options["api_url"])
                    if serving == state.mixture:
                        self._ready(state, options, started)
                        return
                    words = f"waiting for the inference server to load mixture {state.mixture}"
                    if words != said_serving:
                        said_serving = words
                        self.stdout.write(f"  {words}")
            if time.monotonic() > deadline:
                self.stdout.write(
                    self.style.WARNING(
                        "The demo mixture is not serving yet; the servers keep running "
                        "(follow it on the leaderboard, or run `python manage.py follow_demo`)."
                    )
                )
                raise SystemExit(1)
            time.sleep(options["interval"])

    def _ready(self, state: DemoState, options, started: float) -> None:
        site = options["site_url"].rstrip("/")
        self.stdout.write("")
        self.stdout.write(
            self.style.SUCCESS(
                f"The demo mixture (version {state.mixture}, {_adapters(len(state.members))}) "
                f"serves, {_minutes(time.time() - started)} after `make run` started."
            )
        )
        self.stdout.write(
            "Scoreboard (routed: the mixture; each split scored on its held-out examples):"
        )
        for line in board_summary(state.figures):
            self.stdout.write(line)
        if state.figures.get("methods_pending"):
            self.stdout.write(
                "  The learned router, the composite split and the composition methods are being "
                "measured; the leaderboard shows them "
                "when they are done."
            )
        self.stdout.write("")
        self.stdout.write(f"  Leaderboard: {site}/leaderboard/")
        self.stdout.write(f"  Playground:  {site}/playground/")
        self.stdout.write(f"  Review:      {site}/review/")
        self.stdout.write(f"  API:         {options['api_url'].rstrip('/')}/v1")
        if settings.EMAIL_BACKEND == FILE_MAIL:
            self.stdout.write(
                f"  The review e-mails to the demo contributors: {settings.EMAIL_FILE_PATH}/"
            )


def _status_words(line: VersionLine) -> str:
    if line.failure:
        return f"{line.status} ({line.failure})"
    return line.status


def _progress(state: DemoState) -> str:
    """One line for the runs still evaluating (a group shares one child and one count)."""
    running = [line for line in state.versions if line.run_status == "running" and line.total]
    if not running:
        return ""
    done = min(line.done for line in running)
    total = max(line.total for line in running)
    label = running[0].label
    return (
        f"evaluating {len(running)} adapter(s): {done}/{total} examples "
        f"({100 * done // total}%), {label}"
    )


def _board_words(state: DemoState) -> str:
    if state.mixture is None:
        return "waiting for the mixture to be published"
    if not state.admitted <= state.members:
        return f"mixture {state.mixture} published; waiting for the one with every approval"
    if state.board_status == "done":
        return f"mixture {state.mixture} scored"
    return f"scoring mixture {state.mixture} ({state.board_status or 'queued'})"


def _adapters(count: int) -> str:
    return f"{count} adapter" if count == 1 else f"{count} adapters"


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"
