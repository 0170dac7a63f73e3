"""One contributor's whole journey in a real browser: Debian's Chromium driven by Playwright
against pytest-django's live server, a REAL Celery worker evaluating the upload, and a real
inference server answering in the playground, all on the suite's PostgreSQL and Redis with
the tiny random Llama as the base model.

A newcomer signs up, describes an adapter and uploads a real PEFT adapter through the form.
The worker (``celery -A tessera worker``, tests/evaluation/test_worker's fixtures) runs the
evaluation with a stand-in child that scores the examples in timed steps (the real child on
a random model could never pass the admission rules), so the adapter page's progress bar is
seen moving, by polling, until the page reloads with the verdict: passed, waiting for a
maintainer. The maintainer approves it in the review queue with a reason, which publishes a
new mixture; its scoreboard is computed (routing.scoreboard, the embedding router's real
decisions over the outcomes the worker stored), and the leaderboard shows the adapter. Last,
the playground streams an answer from the inference server with the adapter credited.
Screenshots of each step go to var/screenshots/journey-*.png.
"""

from __future__ import annotations

import re
import textwrap
import time

import pytest

from contributions.models import AdapterVersion
from evaluation.models import EvaluationRun, RoutingSignature
from routing.models import MixtureVersion, Scoreboard
from routing.scoreboard.services import scoreboard_compute_now
from tests.browser.conftest import (
    BROWSER_MARKS,
    SCREENSHOTS,
    audit,
    log_in,
    log_out,
)
from tests.evaluation.test_worker import (  # noqa: F401 (fixtures used by name)
    send_through_redis,
    start_worker,
)
from tests.routing.conftest import (  # noqa: F401 (fixtures used by name)
    SECRET,
    UNITS_PROMPTS,
    api_redis_db,
    model_cache,
    start_server,
    tiny_base_model,
    tiny_model_source,
    union,
)
from tests.routing.test_inference_api import wait_until
from tests.support.crafted import real_adapter

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = [
    *BROWSER_MARKS,
    # The worker and the inference server are other processes and threads: they must see
    # what the test and the live server commit.
    pytest.mark.django_db(transaction=True),
]

STEP_SECONDS = 3.0  # each step of the stand-in child: longer than the page's 2 s poll

# The evaluation child the worker runs instead of ``python -m evaluation.worker.child``:
# it reports progress in three steps, then scores the base model 0 and the adapter 1 on
# every example (so the adapter passes the admission rules) and sketches its weights.
STEPPING_CHILD = textwrap.dedent(
    f"""
    import json, sys, time
    job = json.loads(sys.stdin.read())
    keys = [a["key"] for a in job["adapters"]]
    total = sum(len(t["examples"]) for t in job["tasks"])
    step = max(1, total // 3)
    for done in (0, step, 2 * step):
        print(json.dumps({{"progress": done, "total": total, "label": "scoring"}}), flush=True)
        time.sleep({STEP_SECONDS})
    scores = {{}}
    for task in job["tasks"]:
        n = len(task["examples"])
        wanted = keys if task["adapters"] is None else task["adapters"]
        scores[task["key"]] = {{
            "base": [0.0] * n if task["score_base"] else None,
            "adapters": {{key: [1.0] * n for key in wanted}},
        }}
    sketches = {{
        a["key"]: {{m: [float(i % 7) for i in range(256)]
                   for m in a["lora_config"]["target_modules"]}}
        for a in job["adapters"]
    }}
    print(json.dumps({{"progress": total, "total": total, "label": "scoring"}}), flush=True)
    print(json.dumps({{"result": {{"scores": scores, "sketches": sketches, "failed": {{}}}}}}))
    """
)

# The adapter page's progress bar as the browser shows it, or null once it is gone.
BAR = """() => {
  const bar = document.querySelector("progress.run-progress");
  if (!bar) return null;
  const label = document.getElementById(bar.dataset.labelId);
  const badge = bar.closest(".version").querySelector(".badge");
  return {value: bar.value, max: bar.max, label: label ? label.textContent : "",
          badge: badge ? badge.textContent : "", reloaded: window.__journeyMark !== true};
}"""

PASSPHRASE = "a long enough passphrase 42"


@pytest.fixture
def no_evaluation():
    """The inference server's fixtures stop uploads' evaluation from being sent; in this
    journey the real worker evaluates them (send_through_redis), so nothing is stopped."""


@pytest.fixture
def sent_from_the_live_server(send_through_redis, monkeypatch):  # noqa: F811
    """send_through_redis's stand-in, for uploads the live server takes in its own threads.
    That fixture patches the task as this thread's current Celery app holds it (the client
    app it makes becomes this thread's current app); a request thread finds tessera's app,
    whose task gets the same stand-in here. What was sent, as (args, queue)."""
    from evaluation import tasks as evaluation_tasks
    from tessera.celery import app

    task = app.tasks["evaluation.evaluate_run"]
    monkeypatch.setattr(task, "apply_async", evaluation_tasks.evaluate_run.apply_async)
    return send_through_redis


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"journey-{name}.png"), full_page=True)


def watch_the_bar(page, timeout: float = 90) -> list[tuple[float, float]]:
    """(value, max) of the progress bar each time it changed, from the page as it was first
    loaded, until the page reloads itself with the verdict."""
    page.evaluate("window.__journeyMark = true")
    seen: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            bar = page.evaluate(BAR)
        except playwright_sync.Error:  # the page is reloading
            break
        if bar is None or bar["reloaded"]:
            break
        if not seen or seen[-1] != (bar["value"], bar["max"]):
            seen.append((bar["value"], bar["max"]))
            if 0 < bar["value"] < bar["max"]:
                assert re.fullmatch(r"\d+ of \d+ · scoring", bar["label"]), bar["label"]
                # The version's badge follows its run without a reload.
                assert bar["badge"] == "evaluating", bar["badge"]
                shot(page, "progress")
        time.sleep(0.25)
    return seen


def test_a_newcomer_uploads_is_evaluated_approved_ranked_and_answers_in_the_playground(
    page,
    live_server,
    tiny_base_model,  # noqa: F811
    union,  # noqa: F811
    maintainer,
    start_worker,  # noqa: F811
    sent_from_the_live_server,
    start_server,  # noqa: F811
    settings,
    tmp_path,
):
    expect = playwright_sync.expect
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    worker = start_worker(TESSERA_TEST_FAKE_CHILD=STEPPING_CHILD)

    # Sign up through the form; it signs the newcomer in.
    page.goto(f"{live_server.url}/")
    page.get_by_role("link", name="Sign up to contribute").click()
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Email").fill("ada@example.org")
    page.get_by_label("Display name").fill("Ada L.")
    page.get_by_label("Password", exact=True).fill(PASSPHRASE)
    page.get_by_label("Password again").fill(PASSPHRASE)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="My adapters", level=1)).to_be_visible()
    expect(page.get_by_text("You have no adapters yet.")).to_be_visible()

    # Describe the adapter: its task tag is the union's "units" skill.
    page.get_by_role("link", name="New adapter").first.click()
    page.get_by_label("Slug").fill("metric")
    page.get_by_label("Title").fill("Metric units")
    page.get_by_label("Description").fill("Converts between metric units.")
    page.get_by_label("Task tags").fill("units")
    page.get_by_label("Languages").fill("en")
    page.get_by_label("License").select_option("Apache-2.0")
    page.get_by_label("Intended use").fill("Answer unit conversion questions.")
    page.get_by_label("Training data summary").fill("Synthetic conversions, generated.")
    page.get_by_label("Example prompts").fill("\n".join(UNITS_PROMPTS))
    page.get_by_role("button", name="Create adapter").click()
    expect(page.get_by_role("heading", name=re.compile("Upload a version"))).to_be_visible()

    # Upload the two files of a real PEFT adapter; intake accepts them and queues the run.
    paths = []
    for name, data in real_adapter(seed=7).files().items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    page.get_by_label("Adapter files").set_input_files(paths)
    page.get_by_role("button", name="Upload and check").click()
    expect(page.get_by_role("status")).to_contain_text("Version 1 uploaded: status queued")
    run = EvaluationRun.objects.get(version__adapter__slug="metric")
    assert sent_from_the_live_server == [([run.pk], "eval-cpu")]

    # The worker takes the run; the bar moves by polling, without reloading the page, until
    # the run is done and the page reloads with the verdict.
    expect(page.locator("progress.run-progress")).to_be_visible()
    seen = watch_the_bar(page)
    moving = [value for value, top in seen if top > 1 and 0 < value < top]
    assert moving, f"the bar never showed the run part-way: {seen}"
    values = [value for value, top in seen if top > 1]
    assert values == sorted(values), f"the bar went back: {seen}"
    panel = page.locator("#evaluation-v1")
    expect(panel.locator(".outcome")).to_contain_text(
        "Passed every rule; waiting for a maintainer's review.", timeout=60_000
    )
    run.refresh_from_db()
    assert (run.status, run.passed, run.needs_review) == ("succeeded", True, True), run.log
    assert RoutingSignature.objects.filter(version=run.version).exists()
    expect(panel.get_by_role("table", name="Scores against the base model")).to_contain_text(
        "Units"
    )
    shot(page, "evaluated")
    assert audit(page) == []
    log_out(page)

    # The maintainer approves it from the review queue, with a reason.
    log_in(page, live_server, maintainer.username)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Review queue").click()
    expect(page.locator("section.queue-item h2")).to_contain_text("ada/metric v1")
    page.get_by_role("link", name="Review v1").click()
    page.get_by_label("Reason to approve").fill("A clear gain on unit conversion, no harm.")
    shot(page, "review")
    page.get_by_role("button", name="Approve v1").click()
    expect(page.get_by_role("status")).to_contain_text("ada/metric v1 approved and admitted")
    expect(page.get_by_text("Nothing is waiting for review.")).to_be_visible()
    version = AdapterVersion.objects.get(pk=run.version_id)
    assert version.status == AdapterVersion.Status.ADMITTED
    log_out(page)

    # The approval published a mixture with the adapter in it; its scoreboard is computed.
    mixture = MixtureVersion.objects.get(is_active=True)
    assert list(mixture.entries.values_list("version_id", flat=True)) == [version.pk]
    board = scoreboard_compute_now(mixture=mixture)
    assert board.status == Scoreboard.Status.DONE, board.failure_reason

    # The leaderboard shows it: on the scoreboard, ranked on its task, credited to Ada.
    log_in(page, live_server, "ada", PASSPHRASE)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Leaderboard").click()
    expect(page.locator(".lb-facts")).to_contain_text(f"{mixture.number} (live)")
    hidden = page.locator("#split-hidden")
    expect(hidden.get_by_text("Best single adapter")).to_be_visible()
    expect(hidden).to_contain_text("ada/metric v1")
    units = page.get_by_role("table", name="Units (Skills)")
    expect(units.get_by_role("row").nth(1)).to_contain_text("ada/metric v1")
    contributors = page.get_by_role("table", name=re.compile("^Admitted adapters"))
    expect(contributors).to_contain_text("Ada L.")
    assert SECRET not in page.content()
    shot(page, "leaderboard")
    assert audit(page) == []

    # The playground: the inference server serves the new mixture, and the answer streams
    # in with the adapter credited.
    server = start_server()
    settings.TESSERA_INFERENCE_URL = f"{server.url}/v1"
    wait_until(lambda: len(server.runtime.catalog) == 1, timeout=60)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Playground").click()
    page.get_by_label("Prompt").fill("Convert 7 km to metres.")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_role("status").filter(has_text="Done")).to_be_visible()
    assert page.locator("#playground-answer").inner_text().strip()
    answered = page.get_by_role("table", name="Adapters that answered")
    expect(answered).to_contain_text("ada/metric")
    expect(answered).to_contain_text("Ada L.")
    expect(page.get_by_role("table", name="Routing scores")).to_be_visible()
    assert SECRET not in page.content()
    shot(page, "playground")
    assert audit(page, fresh=False) == []

    assert worker.poll() is None, "the worker stopped"
    assert time.monotonic() - started < 120
