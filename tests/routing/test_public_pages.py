"""Public model cards (/models/<owner>/<slug>/) and contributor profiles
(/contributors/<username>/): no login, stored figures and contributor-written text only,
over the world tests/routing/test_leaderboard.py writes (stored runs, results, boards and
usage; no model runs)."""

from __future__ import annotations

import re

import pytest
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse

from contributions.models import AdapterVersion
from tests.factories import UserFactory
from tests.routing import test_leaderboard as leaderboard_data
from tests.routing.test_leaderboard import SECRET, admitted, evaluated, table, text

# The leaderboard tests' stored world, used by name: two contributors (bob's profile is
# private), three public admitted adapters, a private one, boards and a month of usage.
tasks = leaderboard_data.tasks
world = leaderboard_data.world

README = """# Units, converted

Converts between **metric** units. See [the docs](https://example.org/units).

<script>alert("card")</script>
<img src="https://tracker.example/pixel.png" onerror="alert('img')">
<p onclick="alert('click')">Clicked text</p>
[Click me](javascript:alert('link'))
<a href="JaVaScRiPt:alert('mixed')">mixed case</a>
![a diagram](https://tracker.example/diagram.png)

| from | to |
|------|----|
| km   | m  |
"""


def card_url(model_id: str) -> str:
    return reverse("public:model-card", args=[model_id])


def profile_url(username: str) -> str:
    return reverse("public:contributor", args=[username])


def get(url: str, status: int = 200) -> str:
    response = Client().get(url)
    assert response.status_code == status
    return response.content.decode()


def with_readme(version: AdapterVersion, card: str = README) -> AdapterVersion:
    version.card_file.save("README.md", ContentFile(card.encode()), save=True)
    return version


# --- Model cards ----------------------------------------------------------------------------


def test_the_card_renders_the_readme_sanitised(world):
    with_readme(world["units"])
    html = get(card_url("ann/units"))
    card = re.search(r'class="card pub-card-body">(.*?)</section>', html, re.S).group(1)
    # The Markdown is rendered, its headings under the page's own.
    assert "<h3>Units, converted</h3>" in card
    assert "<strong>metric</strong>" in card
    assert "<th>from</th>" in card
    link = re.search(r'<a href="https://example.org/units"[^>]*>the docs</a>', card).group(0)
    assert 'rel="nofollow noopener' in link
    # What would run, track or restyle is gone; the words stay.
    for gone in ("<script", "alert(", "onerror", "onclick", "javascript:", "JaVaScRiPt", "<img"):
        assert gone not in card, gone
    assert "tracker.example" not in card  # no remote image is fetched by a visitor
    assert "a diagram" in card  # an image's alt text stays, as text
    assert "Clicked text" in card and "Click me" in card


def test_the_card_shows_the_adapter_facts_and_links_back(world):
    html = get(card_url("ann/units"))
    words = text(html)
    assert "<h1>Units</h1>" in html
    assert "LoRA rank 4" in words
    assert "q_proj" in words and "v_proj" in words
    assert "Apache" in words
    assert f'href="{reverse("leaderboard:index")}"' in html
    # ann's profile is public: her name links to it.
    assert f'href="{profile_url("ann")}"' in html


def test_without_a_readme_the_description_stands_in(world):
    adapter = world["dates"].adapter
    adapter.description = "Writes dates the long way."
    adapter.save()
    html = get(card_url("bob/dates"))
    assert "Writes dates the long way." in html
    assert "has no README.md" in html
    # bob's profile is private: his name is shown, not linked.
    assert profile_url("bob") not in html


def test_the_scores_are_the_stored_results(world, tasks):
    html = get(card_url("bob/dates"))
    rows = table(html, "Score on each target task")
    assert rows == [
        ["v1", "Date formatting (Skills)", "40", "0.700", "0.200", "+0.500", "+0.450 to +0.550"],
        ["v1", "Unit conversion (Skills)", "40", "0.400", "0.200", "+0.200", "+0.150 to +0.250"],
    ]


def test_a_re_evaluated_version_shows_its_newest_run(world, tasks):
    evaluated(world["units"], {tasks["units"]: 0.6})
    rows = table(get(card_url("ann/units")), "Score on each target task")
    assert [row[3] for row in rows] == ["0.600"]


def test_versions_in_review_are_left_off(world, tasks):
    units = world["units"]
    AdapterVersion.objects.create(
        **{
            f.name: getattr(units, f.name)
            for f in AdapterVersion._meta.concrete_fields
            if f.name not in ("id", "number", "status", "weights_sha256", "created_at")
        },
        number=2,
        status=AdapterVersion.Status.EVALUATING,
        weights_sha256="e" * 64,
    )
    rows = table(get(card_url("ann/units")), "Versions that have been served")
    assert [row[:2] for row in rows] == [["v1", "Admitted"]]


def test_the_traffic_is_the_last_30_days(world):
    html = get(card_url("bob/dates"))
    rows = table(html, "Answers per day")
    assert len(rows) == 30
    assert rows[0][1] == "20"  # today; the 1000 of 40 days ago are outside the window
    assert sum(int(row[1]) for row in rows) == 20
    assert "20 answers in the last 30 days" in text(html)
    assert 'class="pub-bars"' in html


@pytest.mark.parametrize(
    "model_id",
    ["bob/secret-units", "ann/not-there", "nobody/units", "ann/unadmitted", "bob/units"],
)
def test_what_a_visitor_may_not_see_is_the_same_404(world, tasks, model_id):
    pending = admitted(world["units"].adapter.owner, "unadmitted")
    pending.status = AdapterVersion.Status.PASSED
    pending.save()
    evaluated(pending, {tasks["units"]: 0.95})
    html = get(card_url(model_id), status=404)
    assert html == get(card_url("nobody/nothing"), status=404)
    assert "Not found" in html


def test_a_withdrawn_adapter_has_no_card(world):
    world["dates_fr"].status = AdapterVersion.Status.WITHDRAWN
    world["dates_fr"].save()
    get(card_url("ann/dates-fr"), status=404)


# --- Contributor profiles -------------------------------------------------------------------


def test_a_public_profile_lists_admitted_adapters_and_credit(world):
    html = get(profile_url("ann"))
    words = text(html)
    assert "<h1>Ann</h1>" in html  # the display name she chose
    assert "Example Lab" in words
    # Her two public admitted adapters link to their cards; bob's and private ones do not.
    assert f'href="{card_url("ann/units")}"' in html
    assert f'href="{card_url("ann/dates-fr")}"' in html
    assert "secret-units" not in html and "bob/dates" not in html
    # The credit is the leaderboard's: 70 of 100 answers, and the stored contribution rule.
    assert "70.0%" in words and "70 of 100" in words
    rows = table(html, "The mixture score each adapter added")
    assert rows == [
        ["ann/dates-fr v1", "−0.050", "0.750", "0.700", "10"],
        ["ann/units v1", "+0.250", "0.500", "0.750", "60"],
    ]


def test_the_profile_matches_the_leaderboard_row(world):
    from routing.leaderboard.selectors import leaderboard

    row = next(r for r in leaderboard().contributors if r.adapters[0].model_id.startswith("ann/"))
    html = get(profile_url("ann"))
    assert f"{row.share_percent:.1f}%" in html
    for adapter in row.adapters:
        assert adapter.model_id in html


def test_a_private_profile_is_the_same_404_as_none(world):
    private = get(profile_url("bob"), status=404)
    assert private == get(profile_url("nobody"), status=404)


def test_a_public_contributor_without_admitted_adapters_says_so(db):
    UserFactory(username="cara")
    assert "adapters is admitted yet" in text(get(profile_url("cara")))


# --- The leaderboard links them -------------------------------------------------------------


def test_the_leaderboard_links_cards_and_public_profiles(world):
    html = get(reverse("leaderboard:index"))
    for model_id in ("ann/units", "bob/dates", "ann/dates-fr"):
        assert f'href="{card_url(model_id)}"' in html
    assert f'href="{profile_url("ann")}"' in html
    assert profile_url("bob") not in html  # private: named, not linked


# --- Never hidden text, and a fixed cost ----------------------------------------------------


def test_no_hidden_example_text_appears(world):
    with_readme(world["units"])
    for url in (card_url("ann/units"), card_url("bob/dates"), profile_url("ann")):
        assert SECRET not in get(url)


def test_the_pages_read_a_fixed_number_of_queries(world, tasks, django_assert_max_num_queries):
    ann = world["units"].adapter.owner
    for n in range(6):  # more adapters, versions and results must not mean more queries
        version = admitted(ann, f"extra-{n}")
        evaluated(version, {tasks["units"]: 0.5, tasks["dates"]: 0.5}, contribution=(0.5, 0.6))
    for n in range(2, 5):
        version = admitted(UserFactory(username=f"v{n}"), f"many-{n}")
        evaluated(version, {tasks["units"]: 0.5})
    client = Client()
    with django_assert_max_num_queries(8):
        assert client.get(card_url("ann/units")).status_code == 200
    with django_assert_max_num_queries(8):
        assert client.get(profile_url("ann")).status_code == 200
    with django_assert_max_num_queries(13):
        assert client.get(reverse("leaderboard:index")).status_code == 200
