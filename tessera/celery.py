"""The Celery application. Configuration comes from Django settings (namespace CELERY)."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tessera.settings")

app = Celery("tessera")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Evaluation runs go to eval-gpu when the deployment has GPU workers, else eval-cpu;
# the reaper and the usage flush to maintenance; everything else (mail, housekeeping) to
# default.
# Each queue has its own direct exchange and routing key: with one shared key, a message
# routed to one queue would be copied into every queue bound to that key.
app.conf.task_queues = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name)
    for name in ("default", "maintenance", "eval-cpu", "eval-gpu")
)
app.conf.task_default_exchange = "default"
app.conf.task_default_routing_key = "default"
app.autodiscover_tasks()


@app.task(name="tessera.ping", ignore_result=False)
def ping() -> str:
    """Health check: a worker that consumes the default queue answers 'pong'."""
    return "pong"
