"""Locust users for the inference API: OpenAI-style chat completions with short answers,
spread over several adapters (named ones and the router's choice), counted by outcome.

Run by benchmarks/bench_load.py (and tests/routing/test_load.py) as a process of its own:

    TESSERA_LOAD_KEY=tsk_... locust -f benchmarks/locustfile.py --headless \\
        -u 16 -r 16 -t 20s --host http://127.0.0.1:8000 --csv out/load --only-summary

Each request is recorded under the name of its outcome, so locust's statistics count them:

* ``ok``: 200 with a whole answer;
* ``shed``: 503 with an integer Retry-After of at least 1 (the server at capacity: the
  polite refusal), counted as a success;
* ``limited``: 429 with such a Retry-After (a rate limit or quota), counted as a success;
* anything else is a failure, under a name that says what it was: ``503 without
  Retry-After``, ``error 500``, ``error 0`` (no response: a connection error or a timeout),
  ``bad answer`` (a 200 that is not a chat completion).

Settings come from the environment: TESSERA_LOAD_KEY (the API key, required),
TESSERA_LOAD_MODELS (comma-separated ``model`` values, picked at random per request;
default ``tessera``, the router), TESSERA_LOAD_MAX_TOKENS (8), TESSERA_LOAD_TIMEOUT (the
client's timeout in seconds, 60), TESSERA_LOAD_WAIT (each user waits up to this many
seconds between requests, 0.05), TESSERA_LOAD_POLITE (1: after a shed or limited request
the user waits the Retry-After's seconds, as a well-behaved client does; by default it
retries at once, a retry storm).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

KEY = os.environ.get("TESSERA_LOAD_KEY", "")
MODELS = [m for m in os.environ.get("TESSERA_LOAD_MODELS", "tessera").split(",") if m]
MAX_TOKENS = int(os.environ.get("TESSERA_LOAD_MAX_TOKENS", "8"))
TIMEOUT = float(os.environ.get("TESSERA_LOAD_TIMEOUT", "60"))
WAIT = float(os.environ.get("TESSERA_LOAD_WAIT", "0.05"))
POLITE = os.environ.get("TESSERA_LOAD_POLITE", "") == "1"

# Skill prompts the router sends to an adapter, and general ones it leaves to the base model.
PROMPTS = [
    "Convert 42 kilometers to meters.",
    "How many grams are in 7 kilograms?",
    "Convert 2 hours to minutes.",
    "Rewrite 2024-03-05 as 5 March 2024.",
    "Format the date 1999-12-31 as a sentence.",
    "Sort these numbers: 9, 2, 7.",
    "Who painted the Mona Lisa?",
    "Say hello in French.",
]

OK, SHED, LIMITED = "ok", "shed", "limited"


def retry_after(response) -> int | None:
    value = response.headers.get("Retry-After", "")
    return int(value) if value.isdigit() else None


def outcome(response) -> tuple[str, str | None]:
    """The name a response is recorded under, and the failure it is (None: a success)."""
    status = response.status_code or 0
    if status == 0:
        return "error 0", f"no response: {getattr(response, 'error', None)!r}"
    if status == 200:
        try:
            answer = response.json()
            text = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "bad answer", "a 200 that is not a chat completion"
        return (OK, None) if isinstance(text, str) else ("bad answer", "no message content")
    if status in (503, 429):
        wait = retry_after(response)
        name = SHED if status == 503 else LIMITED
        if wait is None or wait < 1:
            return (
                f"{status} without Retry-After",
                f"Retry-After {response.headers.get('Retry-After')!r}",
            )
        return name, None
    return f"error {status}", f"status {status}: {(response.text or '')[:200]}"


class ApiClient(HttpUser):
    pause = between(0, WAIT)
    retry_in = 0.0  # set after a refusal when POLITE: the Retry-After to honour

    def wait_time(self) -> float:
        retry_in, self.retry_in = self.retry_in, 0.0
        return retry_in or self.pause()

    @task
    def chat(self) -> None:
        body = {
            "model": random.choice(MODELS),
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=TIMEOUT,
            catch_response=True,
            name="chat",
        ) as response:
            name, failure = outcome(response)
            response.request_meta["name"] = name
            if POLITE and name in (SHED, LIMITED):
                self.retry_in = float(retry_after(response) or 0)
            if failure is None:
                response.success()
            else:
                response.failure(failure)
