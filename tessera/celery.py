"""The Celery application. Configuration comes from Django settings (namespace CELERY)."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tessera.settings")

app = Celery("tessera")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Evaluation runs go to eval-gpu when the deployment has GPU workers, else eval-cpu;
# everything else (mail, housekeeping) to default.
app.conf.task_queues = (
    Queue("default"),
    Queue("eval-cpu"),
    Queue("eval-gpu"),
)
app.autodiscover_tasks()


@app.task(name="tessera.ping", ignore_result=False)
def ping() -> str:
    """Health check: a worker that consumes the default queue answers 'pong'."""
    return "pong"
