"""`follow_demo`, what `make run` shows after seeding: the demo versions' progress, the demo
maintainer's approval of each version that passed (through the review service, with a
reason), and the end, once the scored mixture serves on the inference server (a real HTTP
server on loopback answering /healthz)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from contributions.models import AdapterVersion
from evaluation.models import ReviewDecision, RuleResult
from routing import selectors as mixture_selectors
from routing.demo import APPROVAL_REASON, demo_step, progress_words
from routing.models import Scoreboard
from tests.evaluation.test_review import make_run, make_version
from tests.factories import AdapterFactory, MaintainerFactory, UserFactory

Status = AdapterVersion.Status


@pytest.fixture
def demo(base_model):
    """The demo maintainer, two demo contributors' versions (one passed and waiting for
    review, one failed with its rule) and a stranger's passed version."""
    MaintainerFactory(username="maintainer")
    ada, noor = UserFactory(username="ada"), UserFactory(username="noor")
    passed = make_version(AdapterFactory(owner=ada, slug="three-digit-addition"))
    make_run(passed, progress=(40, 40))
    failed = make_version(AdapterFactory(owner=noor, slug="quick"), status=Status.FAILED)
    run = make_run(failed, passed=False, needs_review=False)
    RuleResult.objects.create(
        run=run, rule="custom:check", passed=False, detail="Gain 0.01 is below 0.10."
    )
    stranger = make_version(AdapterFactory(owner=UserFactory(username="someone"), slug="x"))
    make_run(stranger)
    return {"passed": passed, "failed": failed, "stranger": stranger}


def test_the_demo_maintainer_approves_what_passed_and_only_the_demo_contributors(demo):
    state = demo_step()
    assert state.approved == ["ada/three-digit-addition"]
    passed = AdapterVersion.objects.get(pk=demo["passed"].pk)
    assert passed.status == Status.ADMITTED
    decision = ReviewDecision.objects.get(version=passed)
    assert (decision.decision, decision.reason) == ("approve", APPROVAL_REASON)
    assert decision.maintainer.username == "maintainer"
    assert AdapterVersion.objects.get(pk=demo["stranger"].pk).status == Status.PASSED
    lines = {line.model_id: line for line in state.versions}
    assert set(lines) == {"ada/three-digit-addition", "noor/quick"}
    assert lines["ada/three-digit-addition"].status == Status.ADMITTED
    assert "Gain 0.01 is below 0.10." in lines["noor/quick"].failed_rules
    assert state.settled and state.admitted == {passed.pk}
    assert passed.pk in state.members and state.mixture == mixture_selectors.mixture_active().number
    assert demo_step().approved == []  # nothing left to approve: a second step does nothing


def test_without_approval_the_passed_version_waits_for_a_person(demo):
    state = demo_step(approve=False)
    assert state.approved == [] and not state.settled
    assert AdapterVersion.objects.get(pk=demo["passed"].pk).status == Status.PASSED


def test_progress_labels_are_words(db):
    from tests.evaluation.test_review import make_suite

    task = make_suite()["arithmetic"]
    assert progress_words(f"task:{task.pk}:hidden") == f"{task.title} (hidden)"
    assert progress_words("Starting the sandbox") == "Starting the sandbox"
    assert progress_words("task:999999:hidden") == "task:999999:hidden"


class _Health(BaseHTTPRequestHandler):
    mixture: int | None = None

    def do_GET(self):
        body = json.dumps({"status": "ok", "mixture": type(self).mixture}).encode()
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _scored(mixture) -> None:
    figures = {
        "routers": ["embedding", "learned"],
        "methods_pending": True,
        "splits": {
            "hidden": {
                "n": 30,
                "base": 0.1,
                "best_single": {"model_id": "ada/three-digit-addition", "score": 0.4},
                "routers": {"embedding": {"score": 0.8}, "learned": {"score": 0.85}},
                "oracle": 0.9,
            }
        },
    }
    Scoreboard.objects.update_or_create(
        mixture=mixture,
        defaults={"status": "done", "figures": figures, "finished_at": timezone.now()},
    )


def test_the_command_ends_when_the_scored_mixture_serves(demo, health_server):
    _server, url = health_server
    demo_step()  # approves, which publishes the mixture
    mixture = mixture_selectors.mixture_active()
    _scored(mixture)
    _Health.mixture = mixture.number
    out = StringIO()
    call_command(
        "follow_demo", "--api-url", url, "--interval", "0.05", "--timeout", "30", stdout=out
    )
    text = out.getvalue()
    assert "noor/quick v1: failed" in text and "Gain 0.01 is below 0.10." in text
    assert f"The demo mixture (version {mixture.number}, 1 adapter) serves" in text
    assert "hidden     (n=30): base 0.100 · best single 0.400 (ada/three-digit-addition)" in text
    assert "routed embedding 0.800, learned 0.850 · oracle 0.900" in text
    assert "being measured" in text
    assert "/leaderboard/" in text and "/playground/" in text


@pytest.mark.django_db(transaction=True)  # on_commit mail goes out as in production
def test_the_command_approves_mails_to_a_file_and_gives_up_at_its_timeout(
    demo, health_server, settings, tmp_path
):
    _server, url = health_server
    settings.EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
    settings.VAR_DIR = tmp_path
    _Health.mixture = None  # still starting
    out = StringIO()
    arguments = ["--api-url", url, "--interval", "0.05", "--timeout", "0.3"]
    with pytest.raises(SystemExit) as exited:
        call_command("follow_demo", *arguments, stdout=out)
    assert exited.value.code == 1
    text = out.getvalue()
    assert "ada/three-digit-addition: approved by the demo maintainer" in text
    assert "not serving yet" in text
    # The approval's e-mail went to a file under var/mail, not into the progress.
    assert "A Tessera maintainer reviewed" not in text
    (mail,) = (tmp_path / "mail").iterdir()
    assert "ada/three-digit-addition" in mail.read_text()


def test_the_command_says_so_when_no_demo_adapter_was_uploaded(db):
    out = StringIO()
    call_command("follow_demo", "--timeout", "1", stdout=out)
    assert "No demo adapters were uploaded" in out.getvalue()
