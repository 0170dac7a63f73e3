"""The mixture-job steps (routing.jobs) on a real job model, the Scoreboard: each worker
below is a separate in-memory copy of the same row, as two Celery workers handed the same
message would each read it."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from routing import jobs, tasks
from routing.jobs import (
    job_claim,
    job_enqueue,
    job_settle,
    job_start,
    job_supersede_if_newer,
    job_take_over_if_lost,
)
from routing.models import LearnedRouter, MergedAdapter, MixtureVersion, Scoreboard
from routing.selectors import mixture_by_number_or_active
from routing.services import mixture_publish
from tessera.celery import app as celery_app


@pytest.fixture
def mixture(base_model) -> MixtureVersion:
    return mixture_publish(reason="test")


def _copy(row: Scoreboard) -> Scoreboard:
    """Another worker's read of ``row``."""
    return Scoreboard.objects.select_related("mixture").get(pk=row.pk)


def _long_ago(settings):
    return timezone.now() - timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 1)


def test_every_job_model_uses_the_statuses_the_steps_write():
    for model in (Scoreboard, LearnedRouter, MergedAdapter):
        assert {jobs.QUEUED, jobs.RUNNING, jobs.DONE} <= set(model.Status.values)
    for model in (Scoreboard, MergedAdapter):
        assert jobs.SUPERSEDED in model.Status.values


def test_of_two_workers_claiming_the_same_row_the_second_loses(mixture):
    board = Scoreboard.objects.create(mixture=mixture)
    first, second = _copy(board), _copy(board)
    assert job_claim(row=first) is True
    assert job_claim(row=second) is False
    assert (first.status, second.status) == ("running", "queued")  # the loser's copy unchanged
    board.refresh_from_db()
    assert board.status == "running" and board.started_at == first.started_at


def test_a_row_left_running_by_a_lost_worker_is_taken_over_and_claimed_again(mixture, settings):
    board = Scoreboard.objects.create(mixture=mixture)
    Scoreboard.objects.filter(pk=board.pk).update(status="running", started_at=_long_ago(settings))
    redelivered = _copy(board)
    job_take_over_if_lost(row=redelivered)
    assert redelivered.status == "queued"
    assert job_claim(row=redelivered) is True
    board.refresh_from_db()
    assert board.status == "running" and board.started_at > _long_ago(settings)


def test_a_row_a_live_worker_is_running_is_not_taken_over(mixture):
    board = Scoreboard.objects.create(mixture=mixture)
    Scoreboard.objects.filter(pk=board.pk).update(status="running", started_at=timezone.now())
    other = _copy(board)
    job_take_over_if_lost(row=other)
    assert other.status == "running"
    assert job_claim(row=other) is False


def test_a_take_over_read_before_another_worker_took_over_does_nothing(mixture, settings):
    # Both redeliveries saw the same stale start; the first takes over and claims, so the
    # second's compare-and-set on that start matches nothing and it finds the row running.
    board = Scoreboard.objects.create(mixture=mixture)
    Scoreboard.objects.filter(pk=board.pk).update(status="running", started_at=_long_ago(settings))
    first, second = _copy(board), _copy(board)
    job_take_over_if_lost(row=first)
    assert job_claim(row=first) is True
    job_take_over_if_lost(row=second)
    assert second.status == "running" and second.started_at == first.started_at
    assert job_claim(row=second) is False


def test_of_two_workers_holding_a_taken_over_row_the_first_to_settle_wins(mixture, settings):
    board = Scoreboard.objects.create(mixture=mixture)
    slow = _copy(board)
    assert job_claim(row=slow) is True
    Scoreboard.objects.filter(pk=board.pk).update(started_at=_long_ago(settings))
    fresh = _copy(board)
    job_take_over_if_lost(row=fresh)
    assert job_claim(row=fresh) is True
    # The row is running for both: the one that settles first writes, the other is told
    # so (and would delete its files).
    assert job_settle(row=fresh, status="done", figures={"by": "fresh"}) is True
    assert job_settle(row=slow, status="done", figures={"by": "slow"}) is False
    board.refresh_from_db()
    assert board.figures == {"by": "fresh"}


def test_a_queued_row_of_an_older_mixture_is_superseded_by_a_newer_one(base_model):
    older = Scoreboard.objects.create(mixture=mixture_publish(reason="first"))
    newer = Scoreboard.objects.create(mixture=mixture_publish(reason="second"))
    assert job_supersede_if_newer(row=_copy(newer)) is False
    assert job_supersede_if_newer(row=_copy(older)) is True
    older.refresh_from_db()
    assert older.status == "superseded" and older.finished_at is not None
    assert job_claim(row=older) is False


def test_a_failed_newer_row_supersedes_nothing(base_model):
    older = Scoreboard.objects.create(mixture=mixture_publish(reason="first"))
    Scoreboard.objects.create(mixture=mixture_publish(reason="second"), status="failed")
    assert job_supersede_if_newer(row=_copy(older)) is False
    assert job_claim(row=older) is True


def test_a_row_claimed_meanwhile_is_left_running_when_superseded(base_model):
    older = Scoreboard.objects.create(mixture=mixture_publish(reason="first"))
    late = _copy(older)
    assert job_claim(row=_copy(older)) is True
    Scoreboard.objects.create(mixture=mixture_publish(reason="second"))
    # The caller stops; the worker that claimed it finishes it.
    assert job_supersede_if_newer(row=late) is True
    older.refresh_from_db()
    assert older.status == "running"


def test_starting_says_why_a_job_stops_or_that_it_holds_the_row(base_model, settings):
    older = Scoreboard.objects.create(mixture=mixture_publish(reason="first"))
    newer = Scoreboard.objects.create(mixture=mixture_publish(reason="second"))
    # Not coalesced (the learned router's way): an older row is still computed.
    assert job_start(row=_copy(older), coalesced=False) is None
    assert job_start(row=_copy(older), coalesced=False) == "finished"  # running, live worker
    Scoreboard.objects.filter(pk=older.pk).update(status="queued")
    assert job_start(row=_copy(older), coalesced=True) == "superseded"
    late = _copy(newer)
    assert job_start(row=_copy(newer), coalesced=True) is None
    assert job_start(row=late, coalesced=True) == "busy"  # read queued, claimed by the other
    Scoreboard.objects.filter(pk=newer.pk).update(started_at=_long_ago(settings))
    assert job_start(row=_copy(newer), coalesced=True) is None  # its worker was lost


def test_the_job_is_sent_to_the_evaluation_queue_and_a_broker_down_is_logged(monkeypatch, caplog):
    sent: list = []
    monkeypatch.setattr(
        celery_app, "send_task", lambda name, args, queue: sent.append((name, args, queue))
    )
    job_enqueue(task="routing.score_mixture", pk=7, label="scoreboard")
    assert sent == [("routing.score_mixture", [7], "eval-cpu")]
    assert "routing.score_mixture" in celery_app.tasks  # the name is a registered task

    def down(name, args, queue):
        raise ConnectionError("broker down")

    monkeypatch.setattr(celery_app, "send_task", down)
    with caplog.at_level(logging.ERROR, logger="routing.jobs"):
        job_enqueue(task="routing.score_mixture", pk=8, label="scoreboard")
    assert "could not enqueue the scoreboard 8" in caplog.text


def test_the_mixture_tasks_are_redelivered_when_their_worker_dies():
    for task in (tasks.score_mixture, tasks.train_router, tasks.merge_mixture):
        assert (task.acks_late, task.reject_on_worker_lost, task.ignore_result) == (
            True,
            True,
            True,
        )


def test_the_commands_find_a_mixture_by_number_or_the_active_one(base_model):
    first = mixture_publish(reason="first")
    second = mixture_publish(reason="second")
    assert mixture_by_number_or_active(None) == second
    assert mixture_by_number_or_active(first.number) == first
    assert mixture_by_number_or_active(99) is None
