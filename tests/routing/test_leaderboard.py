"""The public leaderboard page and its JSON API: stored boards, admitted versions' stored
evaluation results, the stored admission rule that measured each one's effect on the
mixture, and the daily usage tables. Boards are written here as the scoreboard job writes
them (routing.scoreboard.figures.split_figures), so no model runs."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re

import pytest
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from contributions.models import AdapterVersion
from evaluation.models import (
    EvaluationRun,
    Example,
    RuleResult,
    Suite,
    SuiteVersion,
    Task,
    TaskResult,
)
from routing.limits import utc_today
from routing.models import AdapterUsageDaily, MixtureMember, MixtureVersion, Scoreboard
from routing.scoreboard.figures import BASE, Candidate, TaskSlice, split_figures
from tests.factories import AdapterFactory, UserFactory

SECRET = "zq-hidden-marker"  # in every hidden, paraphrase and composite example: never shown
_sha = itertools.count()


# --- Stored data, as the jobs leave it --------------------------------------------------------


def _task(suite: SuiteVersion, slug: str, title: str, splits: tuple[str, ...]) -> Task:
    task = Task.objects.create(
        suite_version=suite,
        slug=slug,
        title=title,
        tags=[slug],
        metric="exact_match",
        prompt_template="{question}",
    )
    for split in splits:
        for position in range(2):
            Example.objects.create(
                task=task,
                split=split,
                position=position,
                fields={"question": f"{slug} question {position} {SECRET}"},
                target=f"answer {SECRET}",
            )
    return task


@pytest.fixture
def tasks(db):
    skills = Suite.objects.create(slug="skills", title="Skills", purpose=Suite.Purpose.SKILL)
    version = SuiteVersion.objects.create(suite=skills, number=1, source_sha256="0" * 64)
    hidden = (Example.Split.HIDDEN, Example.Split.PARAPHRASE)
    composite = Suite.objects.create(
        slug="composite", title="Composite", purpose=Suite.Purpose.COMPOSITE
    )
    composite_version = SuiteVersion.objects.create(
        suite=composite, number=1, source_sha256="1" * 64
    )
    return {
        "units": _task(version, "units", "Unit conversion", hidden),
        "dates": _task(version, "dates", "Date formatting", hidden),
        "both": _task(
            composite_version, "units-dates", "Units then dates", (Example.Split.HIDDEN,)
        ),
    }


def admitted(owner, slug: str, *, license="Apache-2.0", languages=("en",), private=False):
    adapter = AdapterFactory(
        owner=owner,
        slug=slug,
        title=slug.title(),
        license=license,
        languages=list(languages),
        visibility="private" if private else "public",
    )
    return AdapterVersion.objects.create(
        adapter=adapter,
        number=1,
        base_model_id=_base_model_id(),
        status=AdapterVersion.Status.ADMITTED,
        status_changed_at=timezone.make_aware(dt.datetime(2025, 3, 4, 12, 0)),
        config_file=f"adapters/{adapter.pk}/v1/adapter_config.json",
        weights_file=f"adapters/{adapter.pk}/v1/adapter_model.safetensors",
        config_sha256="c" * 64,
        weights_sha256=hashlib.sha256(str(next(_sha)).encode()).hexdigest(),
        size_bytes=1234,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        dtype="float32",
        tensor_count=8,
        parameter_count=4096,
        adapter_config={"r": 4},
    )


def _base_model_id() -> int:
    from contributions.selectors import base_model_active

    return base_model_active().pk


def evaluated(version, results: dict[Task, float], *, base=0.2, contribution=None):
    """A finished run of ``version`` with its hidden-split results (adapter score per task,
    a ±0.05 interval) and, when given, the mixture-contribution rule's (without, with)."""
    run = EvaluationRun.objects.create(
        version=version,
        status=EvaluationRun.Status.SUCCEEDED,
        queue="eval-cpu",
        finished_at=timezone.now(),
        passed=True,
        log=f"scored {SECRET}",  # logs are the owner's and maintainers': never on the board
    )
    for task, score in results.items():
        TaskResult.objects.create(
            run=run,
            task=task,
            split=TaskResult.Split.HIDDEN,
            is_target=True,
            n=40,
            base_score=base,
            adapter_score=score,
            delta=score - base,
            ci_low=score - base - 0.05,
            ci_high=score - base + 0.05,
        )
    values = {"measured": False}
    if contribution is not None:
        without, with_it = contribution
        values = {"measured": True, "with": with_it, "without": without, "delta": with_it - without}
    RuleResult.objects.create(
        run=run,
        rule="mixture_contribution",
        passed=True,
        detail=f"measured on {SECRET}",
        values=values,
    )
    return run


def mixture_of(number: int, versions, *, active=True) -> MixtureVersion:
    if active:
        MixtureVersion.objects.filter(is_active=True).update(is_active=False)
    mixture = MixtureVersion.objects.create(
        number=number, reason="test", is_active=active, activated_at=timezone.now()
    )
    for version in versions:
        MixtureMember.objects.create(mixture=mixture, version=version)
    return mixture


def board_for(mixture, versions, *, routed_units=1.0, status=Scoreboard.Status.DONE):
    """A finished board: hidden (4 examples: 2 units, 2 dates), paraphrase and composite
    splits, the embedding and learned routers and two composition methods."""
    candidates = [Candidate(None, BASE)] + [
        Candidate(v.pk, f"{v.adapter.owner.username}/{v.adapter.slug}", v.number) for v in versions
    ]
    units_v, dates_v = versions[0].pk, versions[1].pk
    hidden = split_figures(
        candidates=candidates,
        scores={None: [0, 0, 0, 1], units_v: [1, 1, 0, 0], dates_v: [0, 0, 1, 1]},
        picks={
            "embedding": [units_v, units_v if routed_units else None, dates_v, dates_v],
            "learned": [units_v, None, dates_v, None],
        },
        tasks=[TaskSlice("units", "skills", "Unit conversion", [0, 1]), _dates([2, 3])],
        methods={"embedding/topk": [1, 1, 1, 0.5], "merged": [0.5, 0.5, 0.5, 0.5]},
    )
    paraphrase = split_figures(
        candidates=candidates,
        scores={None: [0, 0], units_v: [1, 0], dates_v: [0, 1]},
        picks={"embedding": [units_v, units_v], "learned": [units_v, dates_v]},
        tasks=[TaskSlice("units", "skills", "Unit conversion", [0]), _dates([1])],
    )
    composite = split_figures(
        candidates=candidates,
        scores={None: [0, 0], units_v: [0.5, 0.5], dates_v: [0.5, 0]},
        picks={"embedding": [units_v, dates_v], "learned": [units_v, units_v]},
        tasks=[TaskSlice("units-dates", "composite", "Units then dates", [0, 1])],
        methods={"embedding/topk": [1, 0.5]},
    )
    figures = {
        "mixture": mixture.number,
        "router": "embedding",
        "routers": ["embedding", "learned"],
        "composition": {"default": "topk", "k": 2},
        "members": [{"model_id": c.label, "version": c.version_number} for c in candidates[1:]],
        "splits": {"hidden": hidden, "paraphrase": paraphrase, "composite": composite},
        "methods_failed": None,
    }
    return Scoreboard.objects.create(
        mixture=mixture,
        status=status,
        finished_at=timezone.now() if status == Scoreboard.Status.DONE else None,
        figures=figures if status == Scoreboard.Status.DONE else {},
    )


def _dates(positions):
    return TaskSlice("dates", "skills", "Date formatting", positions)


@pytest.fixture
def world(tasks, base_model):
    """Two contributors, three public admitted adapters (one measured by the contribution
    rule), a private one, two scored mixture versions and a month of usage."""
    ann = UserFactory(username="ann")
    bob = UserFactory(username="bob")
    bob.contributor.is_public = False  # then the username stands in for the display name
    bob.contributor.save()
    units = admitted(ann, "units")
    dates = admitted(bob, "dates", license="MIT", languages=("en", "de"))
    dates_fr = admitted(ann, "dates-fr", license="CC-BY-4.0", languages=("fr",))
    private = admitted(bob, "secret-units", private=True)
    evaluated(units, {tasks["units"]: 0.9}, contribution=(0.50, 0.75))
    evaluated(dates, {tasks["dates"]: 0.7, tasks["units"]: 0.4})
    evaluated(dates_fr, {tasks["dates"]: 0.8}, contribution=(0.75, 0.70))
    evaluated(private, {tasks["units"]: 0.99})
    first = mixture_of(1, [units, dates], active=False)
    board_for(first, [units, dates], routed_units=0)
    second = mixture_of(2, [units, dates, dates_fr, private])
    board = board_for(second, [units, dates])
    today = utc_today()
    for version, requests in ((units, 60), (dates, 20), (dates_fr, 10), (None, 10)):
        AdapterUsageDaily.objects.create(adapter_version=version, day=today, requests=requests)
    # Outside the 30-day window: not counted.
    AdapterUsageDaily.objects.create(
        adapter_version=dates, day=today - dt.timedelta(days=40), requests=1000
    )
    return {
        "units": units,
        "dates": dates,
        "dates_fr": dates_fr,
        "private": private,
        "board": board,
        "mixture": second,
    }


def page(params=None) -> str:
    from django.test import Client

    response = Client().get(reverse("leaderboard:index"), params or {})
    assert response.status_code == 200
    return response.content.decode()


def text(html: str) -> str:
    """The page's words, tags dropped and whitespace folded (what a reader sees)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def table(html: str, caption_start: str) -> list[list[str]]:
    """The body rows (cells' text) of the table whose caption starts with ``caption_start``."""
    for match in re.finditer(r"<table>(.*?)</table>", html, re.S):
        body = match.group(1)
        caption = re.search(r"<caption>(.*?)</caption>", body, re.S)
        if caption and text(caption.group(1)).strip().startswith(caption_start):
            rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.split("<tbody>")[1], re.S)
            return [
                [text(cell).strip() for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
                for row in rows
            ]
    raise AssertionError(f"no table captioned {caption_start!r}")


# --- Empty states -----------------------------------------------------------------------------


def test_before_any_mixture_the_page_says_so_in_words(db):
    html = page()
    assert "No adapter has been admitted yet, so there is no mixture to score." in text(html)
    assert "No mixture version has been scored yet" in html
    assert "No admitted adapter has evaluation results yet." in html
    assert "No contributor has an admitted adapter yet." in html
    assert "uPlot" not in html  # no chart without a history
    assert 'aria-current="page">Leaderboard</a>' in html


def test_a_live_mixture_without_a_board_yet_says_it_is_being_scored(tasks, base_model):
    units = admitted(UserFactory(username="ann"), "units")
    evaluated(units, {tasks["units"]: 0.9})
    mixture = mixture_of(1, [units])
    Scoreboard.objects.create(mixture=mixture, status=Scoreboard.Status.QUEUED)
    words = text(page())
    assert "Mixture version 1 is live, but it has not been scored yet" in words
    assert "its scoreboard is being computed" in words
    # The per-task table reads the evaluation's results all the same.
    assert "ann/units v1" in words


def test_the_newest_scored_board_stands_in_while_the_live_one_is_scored(world, tasks):
    third = mixture_of(3, [world["units"]])
    Scoreboard.objects.create(mixture=third, status=Scoreboard.Status.RUNNING)
    words = text(page())
    assert "Mixture version 3 is live and is still being scored" in words
    assert "these are the figures of version 2, the newest one scored" in words


# --- What the page shows ---------------------------------------------------------------------


def test_the_board_on_the_page_is_the_stored_one(world):
    html = page()
    figures = world["board"].figures
    hidden = figures["splits"]["hidden"]
    words = text(html)
    assert "Mixture version 2 (live)" in words
    for split in ("hidden", "paraphrase", "composite"):
        assert f'id="split-{split}"' in html
    headline = re.search(r'id="split-hidden".*?</dl>', html, re.S).group(0)
    assert [text(dd).strip() for dd in re.findall(r"<dd>(.*?)</dd>", headline, re.S)] == [
        f"{hidden['base']:.3f}",
        f"{hidden['best_single']['score']:.3f} ann/units v1",
        f"{hidden['routers']['embedding']['score']:.3f}",
        f"{hidden['oracle']:.3f}",
    ]
    routers = table(html, "Routers, each sending every example to one adapter (hidden")
    embedding = hidden["routers"]["embedding"]
    assert routers[0] == [
        "embedding",
        f"{embedding['score']:.3f}",
        f"+{embedding['routed_minus_base']:.3f}",
        f"+{embedding['routed_minus_best_single']:.3f}",
        f"{embedding['routed_over_oracle']:.3f}",
        f"{embedding['accuracy']:.3f}",
    ]
    assert routers[1][0] == "learned"
    methods = table(html, "Composition methods, mixing several adapters per answer (hidden")
    topk = hidden["methods"]["embedding/topk"]
    # topk with the mixture's router is what it serves: marked so.
    assert methods[0][:3] == ["topk served", "embedding", f"{topk['score']:.3f}"]
    assert methods[1][:2] == ["merged", "no router"]
    composite = table(html, "Routers, each sending every example to one adapter (composite")
    assert (
        composite[0][1] == f"{figures['splits']['composite']['routers']['embedding']['score']:.3f}"
    )


def test_a_deployment_serving_what_scored_best_shows_the_router_and_method_it_resolves_to(world):
    board = world["board"]
    figures = {**board.figures, "router": "best", "composition": {"default": "best", "k": 2}}
    Scoreboard.objects.filter(pk=board.pk).update(figures=figures)
    html = page()
    facts = text(re.search(r'class="facts lb-facts">.*?</dl>', html, re.S).group(0))
    # The embedding router's top-1 (1.0) beats its topk (0.875) and the learned router (0.5).
    facts = " ".join(facts.split()).replace(" ,", ",")
    assert "Router it serves with embedding, composition top1 (what scored best on this board)" in (
        facts
    )
    routers = table(html, "Routers, each sending every example to one adapter (hidden")
    assert [row[0] for row in routers] == ["embedding served", "learned"]
    methods = table(html, "Composition methods, mixing several adapters per answer (hidden")
    assert not any("served" in row[0] for row in methods)


def test_the_history_chart_has_its_figures_in_a_table_too(world):
    html = page()
    rows = table(html, "Scores by mixture version (hidden")
    # Mixture 1 routed the second units example to the base model: 0.75, mixture 2 all: 1.
    assert rows == [
        ["v1", "0.750", "0.250", "0.500", "1.000"],
        ["v2", "1.000", "0.250", "0.500", "1.000"],
    ]
    data = re.search(
        r'<script id="leaderboard-history" type="application/json">(.*?)</script>', html, re.S
    )
    assert data is not None and '"mixtures": [1, 2]' in data.group(1)
    assert "vendor/uplot/uPlot.iife.min.js" in html and "leaderboard/leaderboard.js" in html


def test_adapters_are_ranked_per_task_with_their_gain_and_interval(world):
    html = page()
    units = table(html, "Unit conversion")
    # The private adapter (0.99) is not on the public board.
    assert units == [
        ["1", "ann/units v1 Units", "0.900", "0.200", "+0.700", "+0.650 to +0.750", "Ann",
         "Apache-2.0", "4 Mar 2025"],
        ["2", "bob/dates v1 Dates", "0.400", "0.200", "+0.200", "+0.150 to +0.250", "bob",
         "MIT", "4 Mar 2025"],
    ]  # fmt: skip
    dates = table(html, "Date formatting")
    assert [row[1] for row in dates] == ["ann/dates-fr v1 Dates-Fr", "bob/dates v1 Dates"]
    assert "secret-units" not in html


def test_contributors_show_what_each_adapter_added_and_their_share_of_answers(world):
    rows = table(page(), "Admitted adapters, the mixture score each added")
    assert rows == [
        [
            "Ann",
            "ann/dates-fr v1 CC-BY-4.0 ann/units v1 Apache-2.0",
            "−0.050 (0.750 without, 0.700 with) +0.250 (0.500 without, 0.750 with)",
            "70.0% (70)",  # 70 of the 100 answers in the window (the base model's 10 count)
        ],
        ["bob", "bob/dates v1 MIT", "not measured", "20.0% (20)"],
    ]


# --- Filters ------------------------------------------------------------------------------------


def test_the_task_filter_narrows_the_board_and_the_tables(world):
    html = page({"task": "dates"})
    words = text(html)
    assert "Narrowed to the task Date formatting" in words
    assert 'id="split-composite"' not in html  # the composite split has no dates examples
    dates = world["board"].figures["splits"]["hidden"]["tasks"][1]
    headline = re.search(r'id="split-hidden".*?</dl>', html, re.S).group(0)
    assert f"{dates['routers']['embedding']['score']:.3f}" in text(headline)
    assert "Unit conversion" not in re.search(r'id="tasks-heading".*', html, re.S).group(0)
    rows = table(html, "Admitted adapters, the mixture score each added")
    assert [row[0] for row in rows] == ["bob", "Ann"]  # by traffic: 20 answers, then 10
    assert rows[1][1] == "ann/dates-fr v1 CC-BY-4.0"  # ann/units has no result on dates
    assert '<option value="dates" selected>' in html


def test_language_and_license_filters_narrow_the_adapters(world):
    html = page({"language": "de"})
    assert [row[1] for row in table(html, "Date formatting")] == ["bob/dates v1 Dates"]
    html = page({"license": "CC-BY-4.0"})
    assert [row[1] for row in table(html, "Date formatting")] == ["ann/dates-fr v1 Dates-Fr"]
    assert "Unit conversion" not in html.split('id="tasks-heading"')[1]
    assert '<option value="CC-BY-4.0" selected>' in html
    html = page({"license": "MIT", "language": "fr"})
    assert "No admitted adapter matches these filters." in html


def test_an_unknown_filter_value_is_not_applied_and_the_page_says_so(world):
    html = page({"language": "xx-<b>"})
    assert "No admitted adapter has the language “xx-&lt;b&gt;”" in html
    assert len(table(html, "Date formatting")) == 2


# --- Nothing hidden leaks ----------------------------------------------------------------------


def test_no_hidden_paraphrase_or_composite_example_text_is_ever_shown(world):
    client = APIClient()
    for params in ({}, {"task": "units"}, {"task": "units-dates"}, {"language": "de"}):
        assert SECRET not in page(params)
        response = client.get(reverse("routing-api:leaderboard"), params)
        assert response.status_code == 200
        assert SECRET not in response.content.decode()
    assert "question 0" not in page()


# --- The API -------------------------------------------------------------------------------------


def test_the_api_answers_the_same_data(world):
    body = APIClient().get(reverse("routing-api:leaderboard")).json()
    figures = world["board"].figures
    assert (body["active_mixture"], body["board"]["mixture"]) == (2, 2)
    hidden = next(s for s in body["board"]["splits"] if s["name"] == "hidden")
    assert hidden["routed"] == figures["splits"]["hidden"]["routers"]["embedding"]["score"]
    assert hidden["best_single_model"] == "ann/units"
    assert [s["name"] for s in body["board"]["splits"]] == ["hidden", "paraphrase", "composite"]
    assert [p["split"] for p in body["history"]] == ["hidden", "paraphrase", "composite"]
    assert body["history"][0]["routed"] == [0.75, 1.0]
    units = next(t for t in body["tasks"] if t["slug"] == "units")
    assert [(e["model_id"], e["delta"]) for e in units["entries"]] == [
        ("ann/units", pytest.approx(0.7)),
        ("bob/dates", pytest.approx(0.2)),
    ]
    assert units["entries"][0]["ci_low"] == pytest.approx(0.65)
    ann = body["contributors"][0]
    assert (ann["name"], ann["share"], body["total_requests"]) == ("Ann", 0.7, 100)
    assert [a["delta"] for a in ann["adapters"]] == [pytest.approx(-0.05), pytest.approx(0.25)]
    assert body["contributors"][1]["adapters"][0]["measured"] is False


def test_methods_still_being_measured_are_said_so_and_a_lost_measuring_is_a_failure(
    world, settings
):
    board = world["board"]
    board.figures = {**board.figures, "methods_pending": True}
    board.save(update_fields=["figures"])

    def summary():
        return APIClient().get(reverse("routing-api:leaderboard")).json()["board"]

    assert (summary()["methods_pending"], summary()["methods_failed"]) == (True, False)
    assert "are being measured" in page()
    # Pending for longer than any job may run: its worker died; the page says not measured.
    stale = timezone.now() - dt.timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 1)
    Scoreboard.objects.filter(pk=board.pk).update(finished_at=stale)
    assert (summary()["methods_pending"], summary()["methods_failed"]) == (False, True)


def test_the_api_filters_and_reports_what_it_ignored(world):
    client = APIClient()
    body = client.get(reverse("routing-api:leaderboard"), {"license": "MIT", "task": "nope"}).json()
    assert body["filters"] == {"task": "", "language": "", "license": "MIT"}
    assert body["ignored"] == {"task": "nope"}
    assert [c["name"] for c in body["contributors"]] == ["bob"]
    too_long = client.get(reverse("routing-api:leaderboard"), {"task": "x" * 65})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "invalid_input"


def test_the_api_before_any_board(db):
    body = APIClient().get(reverse("routing-api:leaderboard")).json()
    assert body["board"] is None and body["active_mixture"] is None
    assert body["history"] == [] and body["tasks"] == [] and body["contributors"] == []


def test_the_leaderboard_is_in_the_openapi_schema(db):
    schema = APIClient().get(reverse("schema"), {"format": "json"}).json()
    operation = schema["paths"]["/api/v1/leaderboard/"]["get"]
    assert operation["operationId"] == "leaderboard"
    assert {p["name"] for p in operation["parameters"]} == {"task", "language", "license"}
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/LeaderboardOut")
    assert "TaskEntryOut" in schema["components"]["schemas"]


# --- Cost ----------------------------------------------------------------------------------


def test_the_page_reads_a_fixed_number_of_queries(world, tasks, django_assert_max_num_queries):
    from django.test import Client

    client = Client()
    for n in range(6):  # more adapters and results must not mean more queries
        version = admitted(UserFactory(username=f"extra{n}"), f"extra-{n}")
        evaluated(version, {tasks["units"]: 0.5, tasks["dates"]: 0.5}, contribution=(0.5, 0.6))
    with django_assert_max_num_queries(12):
        assert client.get(reverse("leaderboard:index")).status_code == 200
    with django_assert_max_num_queries(12):
        assert client.get(reverse("routing-api:leaderboard")).status_code == 200
