"""What an attacker might send the inference API, through a real server (tests/routing/
conftest): every malformed body, out-of-range number, odd character or odd path answers a
4xx in OpenAI's error shape and generates nothing; never a 500. And a request that breaks
the engine fails alone: the other requests of its batch answer as they would alone."""

from __future__ import annotations

import threading

import httpx
import pytest

from contributions import services

pytestmark = pytest.mark.django_db(transaction=True)

HI = [{"role": "user", "content": "Hi"}]


def body(**fields) -> dict:
    return {"model": "tessera", "messages": HI, "max_tokens": 2, **fields}


@pytest.fixture
def key(contributor) -> str:
    return services.api_token_create(user=contributor, name="attacker")[1]


@pytest.fixture
def http(server, key) -> httpx.Client:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        yield client


def openai_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.text
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def refused(server, response: httpx.Response, before: int) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = openai_error(response)
    assert error["type"] == "invalid_request_error"
    assert server.runtime.scheduler.stats().completed == before  # nothing generated
    return error


M = '"messages": [{"role": "user", "content": "Hi"}]'

# Bodies that are not the JSON object they should be, byte for byte.
RAW_BODIES = {
    "not json": b"{not json",
    "empty": b"",
    "a list": b"[1, 2]",
    "a string": b'"tessera"',
    "null": b"null",
    "invalid utf-8": b'{"model": "\xff\xfe"}',
    "NaN literal": ('{"model": "tessera", ' + M + ', "temperature": NaN}').encode(),
    "Infinity literal": ('{"model": "tessera", ' + M + ', "top_p": Infinity}').encode(),
    "-Infinity literal": ('{"model": "tessera", ' + M + ', "temperature": -Infinity}').encode(),
    "a float past double": ('{"model": "tessera", ' + M + ', "temperature": 1e309}').encode(),
    "an integer of 5000 digits": (
        '{"model": "tessera", "max_tokens": ' + "9" * 5000 + "}"
    ).encode(),
    "nested 100000 deep": b"[" * 100_000,
    "a lone surrogate escape": b'{"model": "tessera", "messages": '
    b'[{"role": "user", "content": "\\ud800"}]}',
    "a surrogate sent as UTF-8 bytes": b'{"model": "tessera", "messages": '
    b'[{"role": "user", "content": "\xed\xa0\x80"}]}',
    "a low surrogate in a key": b'{"model": "tessera", ' + M.encode() + b', "\\udc00": 1}',
    "NUL in the prompt": b'{"model": "tessera", "messages": '
    b'[{"role": "user", "content": "a\\u0000b"}]}',
    "NUL in a stop": ('{"model": "tessera", ' + M + ', "stop": ["\\u0000"]}').encode(),
    "NUL in the model": ('{"model": "tes\\u0000sera", ' + M + "}").encode(),
}


@pytest.mark.parametrize("raw", RAW_BODIES.values(), ids=RAW_BODIES.keys())
def test_a_body_that_is_no_valid_json_object_is_a_400(http, server, raw):
    before = server.runtime.scheduler.stats().completed
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = refused(server, response, before)
    assert error["code"] in ("invalid_json", "invalid_value")


NESTED = {"a": 1}
for _ in range(20):
    NESTED = {"a": NESTED}

# (fields of a chat body, the parameter the error must name)
BAD_FIELDS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": 2**64}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": [1]}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"n": 2}, "n"),
    ({"n": "1"}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 65}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": [["a"]]}, "stop"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"1": "x"}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"logprobs": True}, "logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [1]}, "messages"),
    ({"messages": [None]}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.role"),
    ({"messages": [{"content": "x"}]}, "messages.role"),
    ({"messages": [{"role": "user"}]}, "messages.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.content"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages.content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.content",
    ),
    ({"messages": [{"role": "user", "content": "x", "name": "n" * 65}]}, "messages.name"),
    ({"model": 7}, "model"),
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"model": "x" * 201}, "model"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": NESTED}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tessera": None}, "tessera"),
    ({"tessera": "topk"}, "tessera"),
    ({"tessera": {"k": 0, "composition": "topk"}}, "tessera.k"),
    ({"tessera": {"k": True, "composition": "topk"}}, "tessera.k"),
    ({"tessera": {"threshold": 2}}, "tessera.threshold"),
    ({"tessera": {"threshold": "0.1"}}, "tessera.threshold"),
    ({"tessera": {"router": ""}}, "tessera.router"),
    ({"tessera": {"composition": "topk", "temperature": 1000}}, "tessera.temperature"),
    ({"tessera": {"policy": {"licenses": "mit"}}}, "tessera.policy.licenses"),
    ({"tessera": {"policy": {"exclude_adapters": ["x"] * 300}}}, "tessera.policy.exclude_adapters"),
    ({"tessera": {"policy": {"base_only": "yes"}}}, "tessera.policy.base_only"),
    ({"tessera": {"policy": {"anything": 1}}}, "tessera.policy.anything"),
]


@pytest.mark.parametrize(
    "fields, param", BAD_FIELDS, ids=[f"{p}={str(f)[:40]}" for f, p in BAD_FIELDS]
)
def test_every_out_of_range_or_mistyped_parameter_is_a_400_naming_it(http, server, fields, param):
    before = server.runtime.scheduler.stats().completed
    response = http.post("/v1/chat/completions", json=body(**fields))
    assert response.status_code == 400, response.text
    assert refused(server, response, before)["param"] == param


BAD_COMPLETIONS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x\u0000"}, "prompt"),
]


@pytest.mark.parametrize("fields, param", BAD_COMPLETIONS, ids=[str(f) for f, _ in BAD_COMPLETIONS])
def test_bad_text_completion_bodies_are_a_400(http, server, fields, param):
    before = server.runtime.scheduler.stats().completed
    response = http.post("/v1/completions", json={"model": "base", "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    assert refused(server, response, before)["param"] == param


@pytest.mark.parametrize(
    "method, path, code",
    [
        ("GET", "/v1/models/55%3EG3%0Ax", "model_not_found"),  # a line feed in the id
        ("GET", "/v1/models/%00", "model_not_found"),
        ("GET", "/v1/models/%ED%A0%80", "model_not_found"),  # a surrogate's UTF-8 bytes
        ("GET", "/v1/models/" + "x" * 4000, "model_not_found"),
        ("POST", "/v1/chat/completions%0A", "unknown_url"),
        ("POST", "/v1/completions%00", "unknown_url"),
        ("GET", "/%0A%0A", "unknown_url"),
    ],
)
def test_odd_paths_answer_an_openai_shaped_404(http, server, method, path, code):
    response = http.request(method, path, json=body())
    assert response.status_code == 404, response.text
    assert openai_error(response)["code"] == code


def test_unknown_models_are_a_404_naming_the_model(http, server):
    for model in ("nobody/nothing", "nobody/nothing@v99", "../../etc/passwd", "tessera-merged"):
        before = server.runtime.scheduler.stats().completed
        response = http.post("/v1/chat/completions", json=body(model=model))
        assert response.status_code == 404, response.text
        error = refused(server, response, before)
        assert (error["code"], error["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer  x y", "Basic dXNlcjpwYXNz", "Bearer tsr_" + "a" * 4000, "Bearer tsr_é_ü"],
)
def test_odd_authorization_headers_are_a_401(server, authorization):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body(),
        headers={"Authorization": authorization.encode("utf-8")},
    )
    assert response.status_code == 401, response.text
    assert openai_error(response)["type"] == "authentication_error"


def test_odd_but_valid_unicode_is_answered(http):
    odd = "Zero\u200bwidth, RTL \u202eevil\u202c, combining e\u0301, emoji 🧪👩‍🔬, BOM \ufeff, "
    odd += "private \ue000, CJK 漢字, astral 𝔘"
    response = http.post(
        "/v1/chat/completions",
        json=body(
            model="base",
            messages=[
                {"role": "system", "content": odd},
                {"role": "user", "content": [{"type": "text", "text": odd}]},
            ],
            stop=["🧪", "\u200b"],
            max_tokens=4,
        ),
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["choices"][0]["message"]["content"], str)
    completion = http.post(
        "/v1/completions", json={"model": "base", "prompt": odd, "max_tokens": 2}
    )
    assert completion.status_code == 200, completion.text


# --- A request that breaks the engine ----------------------------------------------------

POISON = "A prompt the engine cannot take"
GOOD = ["The capital of France is", "Add 123 and 456:", "Translate hello to French:"]


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt's ids, as the API makes them (routing.inference.pipeline)."""
    formatted = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(formatted, add_special_tokens=False)["input_ids"]


def test_a_request_that_breaks_the_engine_fails_alone_and_its_batch_answers_as_alone(
    http, server, monkeypatch
):
    def ask(text: str) -> httpx.Response:
        return http.post(
            "/v1/chat/completions",
            json=body(
                model="base",
                messages=[{"role": "user", "content": text}],
                max_tokens=8,
                temperature=0,
            ),
        )

    alone = {text: ask(text).json()["choices"][0]["message"]["content"] for text in GOOD}
    rt = server.runtime
    poison = chat_ids(rt.engine.tokenizer, POISON)
    forward = rt.engine.model.forward

    def breaks_on_poison(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] >= len(poison) and any(
            row[-len(poison) :].tolist() == poison for row in ids
        ):
            raise RuntimeError("injected failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(rt.engine.model, "forward", breaks_on_poison)
    # Hold the scheduler thread so that the four requests wait together: one batch.
    gate = threading.Event()
    held = rt.scheduler.call(lambda engine: gate.wait(30))
    before = rt.scheduler.stats()
    answers: dict[str, httpx.Response] = {}
    threads = [
        threading.Thread(target=lambda t=text: answers.__setitem__(t, ask(t)))
        for text in [GOOD[0], POISON, *GOOD[1:]]
    ]
    for thread in threads:
        thread.start()
    deadline = 100
    while rt.scheduler.stats().waiting < 4 and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert rt.scheduler.stats().waiting == 4
    gate.set()
    held.result(timeout=30)
    for thread in threads:
        thread.join(60)
    assert rt.scheduler.stats().batches - before.batches == 1  # they shared one batch
    bad = answers[POISON]
    assert bad.status_code == 500, bad.text
    error = openai_error(bad)
    assert (error["code"], error["type"]) == ("engine_error", "server_error")
    for text in GOOD:
        assert answers[text].status_code == 200, answers[text].text
        assert answers[text].json()["choices"][0]["message"]["content"] == alone[text]
