#!/bin/sh
# Development processes for `make run`: the web server (portal, REST API), the inference
# server (OpenAI-compatible API, uvicorn, with the engine in it) and one Celery worker on
# every queue with the beat scheduler embedded (the reaper of stuck evaluations and the
# usage flush). API rate limits and usage counters need Redis: when none is configured and
# redis-server is installed, a private one is started under var/. Ctrl-C stops everything.
set -e
# Development processes: DEBUG on (it is off unless asked for).
export DJANGO_DEBUG=true
PY=${PY:-.venv/bin/python}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
API_PORT=${API_PORT:-8001}
mkdir -p var/log
PIDS=""
trap 'kill $PIDS 2>/dev/null; wait 2>/dev/null' EXIT INT TERM
if [ -z "$TESSERA_API_REDIS_URL" ] && [ -z "$REDIS_URL" ] && command -v redis-server >/dev/null; then
    redis-server --port 6391 --bind 127.0.0.1 --save "" --appendonly no --dir var \
        --logfile log/redis.log &
    PIDS="$PIDS $!"
    export TESSERA_API_REDIS_URL=redis://127.0.0.1:6391/0
fi
# On a CPU-only development machine the demo's seven adapters, evaluated together in one
# child, can need longer than one run's default 25-minute deadline (hours on full suites).
export TESSERA_EVAL_DEADLINE_SECONDS=${TESSERA_EVAL_DEADLINE_SECONDS:-5400}
# The demo evaluates eight models' rows together: batches of 64 rows make 1.5x the tokens a
# second of batches of 16 on two CPU cores (SmolLM2, 7 adapters mixed), so the demo's
# evaluation takes about a third less.
export TESSERA_EVAL_BATCH_SIZE=${TESSERA_EVAL_BATCH_SIZE:-64}
export CELERY_TASK_SOFT_TIME_LIMIT=${CELERY_TASK_SOFT_TIME_LIMIT:-5700}
export CELERY_TASK_TIME_LIMIT=${CELERY_TASK_TIME_LIMIT:-6000}
if [ "${SAMPLED_SUITES:-0}" = 1 ]; then
    # Sampled suites hold 30 hidden examples a general task: one example is a 0.033 swing,
    # so the default 0.05 allowed fall on the general suite would be noise; allow 0.10.
    export TESSERA_ADMISSION_MAX_GENERAL_DROP=${TESSERA_ADMISSION_MAX_GENERAL_DROP:-0.10}
fi
$PY -m celery -A tessera worker --queues default,maintenance,eval-cpu,eval-gpu --concurrency 1 \
    --beat --schedule var/celerybeat-schedule --loglevel INFO --logfile var/log/worker.log &
PIDS="$PIDS $!"
$PY -m uvicorn tessera.serving:application --host "$HOST" --port "$API_PORT" \
    --no-access-log --log-level info >var/log/inference.log 2>&1 &
PIDS="$PIDS $!"
$PY manage.py runserver --noreload "$HOST:$PORT" &
PIDS="$PIDS $!"
echo
echo "  Tessera is running at http://$HOST:$PORT/   (API docs: http://$HOST:$PORT/api/docs/)"
echo "  OpenAI-compatible API: http://$HOST:$API_PORT/v1   (health: http://$HOST:$API_PORT/healthz)"
echo "  Logs: var/log/worker.log, var/log/inference.log. Ctrl-C stops everything."
echo
if [ "${FOLLOW_DEMO:-0}" = 1 ]; then
    echo "Following the demo adapters to a live mixture (evaluation, review, scoreboard)…"
    $PY manage.py follow_demo --api-url "http://$HOST:$API_PORT" \
        --site-url "http://$HOST:$PORT" ${RUN_STARTED:+--started "$RUN_STARTED"} || true
fi
wait
