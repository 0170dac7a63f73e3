"""Following a version's evaluation to its outcome.

The REST API lists a version's runs (``/adapters/{id}/versions/{n}/runs/``, newest first);
``/runs/{id}/progress/`` is the light view made for polling (status, done/total and the
worker's label); ``/runs/{id}/`` has the results once the run is over: the rule verdicts with
their details in words, and the failure of a run that could not finish.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

from tessera_cli.api import Platform

RUN_OVER = {"succeeded", "failed"}
# Version statuses after evaluation. "passed" may still turn "admitted" a moment after the
# run finishes (automatic admission runs once the results are recorded), or wait for a
# maintainer's review.
OUTCOMES_PASSED = {"passed", "admitted"}
VERSION_SETTLED = {"admitted", "failed", "rejected", "withdrawn", "suspended"}
# How long to wait for the version to take the run's outcome once the run is over.
SETTLE_POLLS = 20


@dataclass
class Outcome:
    status: str  # the version's status
    run: dict | None  # the run's detail, with rule_results and failure

    @property
    def passed(self) -> bool:
        return self.status in OUTCOMES_PASSED


def latest_run(platform: Platform, adapter_id: int, number: int) -> dict | None:
    runs = platform.get(f"adapters/{adapter_id}/versions/{number}/runs/")
    return runs[0] if runs else None


def follow(
    platform: Platform,
    adapter_id: int,
    number: int,
    *,
    interval: float = 2.0,
    timeout: float | None = None,
    stream: TextIO | None = None,
) -> Outcome:
    """Poll until the version's latest run is over, drawing its progress as a bar on
    ``stream`` (stderr), then wait for the version to take its outcome."""
    stream = stream or sys.stderr
    version_path = f"adapters/{adapter_id}/versions/{number}/"
    started = time.monotonic()

    def waited_too_long() -> bool:
        return timeout is not None and time.monotonic() - started > timeout

    run = None
    while run is None:
        run = latest_run(platform, adapter_id, number)
        if run is not None:
            break
        status = platform.get(version_path)["status"]
        if status not in {"uploaded", "validated", "queued", "evaluating"}:
            return Outcome(status=status, run=None)  # withdrawn before any run was made
        if waited_too_long():
            raise TimeoutError("No evaluation run was created for this version.")
        time.sleep(interval)

    bar: tqdm | None = None
    said_queued = False
    try:
        while True:
            progress = platform.get(f"runs/{run['id']}/progress/")
            status = progress["status"]
            done, total = progress["progress"]["done"], progress["progress"]["total"]
            label = progress["progress"]["label"] or status
            if status == "queued" and not total and not said_queued:
                print("Queued: waiting for an evaluation worker…", file=stream, flush=True)
                said_queued = True
            if total:
                if bar is None:
                    bar = tqdm(
                        total=total,
                        file=stream,
                        dynamic_ncols=True,
                        # No rate: the bar moves by polls, not by the worker's own steps.
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                        "examples [{elapsed}]",
                    )
                if bar.total != total:
                    bar.total = total
                bar.n = done
                bar.set_description_str(label[:40], refresh=False)
                bar.refresh()
            if status in RUN_OVER:
                break
            if waited_too_long():
                raise TimeoutError(f"The evaluation is still {status} ({done}/{total}).")
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()

    detail = platform.get(f"runs/{run['id']}/")
    version = platform.get(version_path)
    for _ in range(SETTLE_POLLS):
        waiting_review = version["status"] == "passed" and detail.get("needs_review")
        if version["status"] in VERSION_SETTLED or waiting_review:
            break
        time.sleep(min(interval, 0.5))
        version = platform.get(version_path)
    return Outcome(status=version["status"], run=detail)


def describe(outcome: Outcome, out: TextIO) -> None:
    """The outcome in words: the verdict, each failed rule with its detail, and the scores
    of the tasks the adapter was measured on."""
    run = outcome.run or {}
    words = {
        "admitted": "passed and was admitted: it now serves in the mixture",
        "passed": "passed evaluation"
        + (" and waits for a maintainer's review" if run.get("needs_review") else ""),
        "failed": "failed evaluation",
        "rejected": "was rejected",
        "withdrawn": "was withdrawn",
        "suspended": "was suspended",
    }
    print(
        f"Outcome: {outcome.status} — the version {words.get(outcome.status, outcome.status)}.",
        file=out,
    )
    failure = run.get("failure")
    if failure:
        print(f"The evaluation could not finish: {failure['reason']} ({failure['code']})", file=out)
    rules = run.get("rule_results") or []
    failed = [rule for rule in rules if not rule["passed"]]
    if failed:
        print("Failed rules:", file=out)
        for rule in failed:
            print(f"  - {rule['rule']}: {rule['detail']}", file=out)
    elif rules:
        print(f"All {len(rules)} admission rules passed.", file=out)
    for task in run.get("task_results") or []:
        if not task.get("is_target"):
            continue
        print(
            f"  {task['title']} ({task['split']}, n={task['n']}): base {task['base_score']:.3f}, "
            f"adapter {task['adapter_score']:.3f}, change {task['delta']:+.3f} "
            f"(95% CI {task['ci_low']:+.3f} to {task['ci_high']:+.3f})",
            file=out,
        )
