#!/bin/sh
# Development processes for `make run`: the web server and one Celery worker on every queue,
# with the beat scheduler embedded (it runs the reaper of stuck evaluations). Ctrl-C stops both.
set -e
PY=${PY:-.venv/bin/python}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
mkdir -p var/log
$PY -m celery -A tessera worker --queues default,eval-cpu,eval-gpu --concurrency 1 \
    --beat --schedule var/celerybeat-schedule --loglevel INFO --logfile var/log/worker.log &
WORKER=$!
trap 'kill $WORKER 2>/dev/null; wait $WORKER 2>/dev/null' EXIT INT TERM
echo
echo "  Tessera is running at http://$HOST:$PORT/   (API docs: http://$HOST:$PORT/api/docs/)"
echo "  Celery worker log: var/log/worker.log. Ctrl-C stops both."
echo
$PY manage.py runserver "$HOST:$PORT"
