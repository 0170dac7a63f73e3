"""The OpenAPI document of the OpenAI-compatible inference API, routing/inference/openapi.json.

The request bodies are the pydantic models the server validates with
(routing.inference.schemas), so the document cannot promise a field the server refuses;
the responses are written here from what routing.inference.views and render send. The
committed file is checked against this builder (tests/fuzz/test_inference_fuzz.py);
after changing either, rewrite it with

    .venv/bin/python -m tests.fuzz.inference_openapi
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).resolve().parents[2] / "routing" / "inference" / "openapi.json"
REF = "#/components/schemas/{model}"

ERROR = {
    "type": "object",
    "description": "OpenAI's error shape: the official clients raise their usual exceptions.",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string", "minLength": 1},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}

FINISH = {"type": "string", "enum": ["stop", "length"]}


def _completion(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage", "tessera"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": choice},
            "usage": {"$ref": "#/components/schemas/Usage"},
            "tessera": {
                "type": "object",
                "description": "Who answered: router, reason, adapters and their weights.",
            },
        },
    }


CHAT_COMPLETION = _completion(
    "chat.completion",
    {
        "type": "object",
        "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"const": 0},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": "string"},
                    "refusal": {"type": "null"},
                },
            },
            "logprobs": {"type": "null"},
            "finish_reason": FINISH,
        },
    },
)
TEXT_COMPLETION = _completion(
    "text_completion",
    {
        "type": "object",
        "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"const": 0},
            "text": {"type": "string"},
            "logprobs": {"type": "null"},
            "finish_reason": FINISH,
        },
    },
)
MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by", "tessera"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "tessera": {
            "type": "object",
            "required": ["kind"],
            "properties": {"kind": {"enum": ["mixture", "base", "merged", "adapter"]}},
        },
    },
}
MODEL_LIST = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "minItems": 2, "items": {"$ref": "#/components/schemas/Model"}},
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    descriptions = {
        400: "Invalid request: `error.code` and `error.param` say which rule.",
        401: "Missing, malformed or revoked API key (`invalid_api_key`).",
        404: "Unknown model (`model_not_found`).",
        405: "Wrong method (`method_not_allowed`).",
        413: "Body over TESSERA_SERVING_MAX_BODY_BYTES (`request_too_large`).",
        429: "Rate limit (`rate_limit_exceeded`) or daily token quota (`insufficient_quota`).",
        503: "Engine starting (`engine_unavailable`), at capacity (`server_overloaded`) or "
        "the chosen adapter left the mixture (`adapter_unavailable`); Retry-After says when.",
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {
        str(status): {"description": descriptions[status], "content": error} for status in statuses
    }


def _request_schemas() -> dict[str, Any]:
    """The pydantic models' JSON schemas, their nested models moved to components."""
    from routing.inference.schemas import ChatCompletionRequest, CompletionRequest

    components: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest):
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components


def _completion_operation(operation_id: str, request: str, answer: str, summary: str) -> dict:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
                },
            },
            "responses": {
                "200": {
                    "description": "The answer: one JSON body, or server-sent events with "
                    '`"stream": true` (chunks, then `data: [DONE]`).',
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{answer}"}},
                        "text/event-stream": {},
                    },
                },
                **_errors(400, 401, 405, 413, 429, 503),
            },
        }
    }


def build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tessera inference API",
            "version": "1.0.0",
            "description": "OpenAI-compatible: the mixture (`tessera`), the base model, the "
            "merged adapter and every admitted adapter by its `owner/slug` id. Requests take "
            "Tessera's own options in the `tessera` object (the openai client's extra_body).",
        },
        "servers": [{"url": "http://localhost:8001"}],
        "security": [{"bearer": []}],
        "paths": {
            "/v1/models": {
                "get": {
                    "operationId": "models_list",
                    "summary": "The models this key may use.",
                    "responses": {
                        "200": {
                            "description": "The list.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ModelList"}
                                }
                            },
                        },
                        **_errors(401, 405, 503),
                    },
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "operationId": "models_retrieve",
                    "summary": "One model.",
                    "parameters": [
                        {
                            "name": "model_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1},
                            "description": "tessera, base, merged or an adapter's owner/slug.",
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The model.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Model"}
                                }
                            },
                        },
                        **_errors(401, 404, 405, 503),
                    },
                }
            },
            "/v1/chat/completions": _completion_operation(
                "chat_completions_create",
                "ChatCompletionRequest",
                "ChatCompletion",
                "A chat answer, routed across the mixture.",
            ),
            "/v1/completions": _completion_operation(
                "completions_create",
                "CompletionRequest",
                "TextCompletion",
                "A text completion of one prompt, routed across the mixture.",
            ),
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A portal API token, tsr_….",
                }
            },
            "schemas": {
                **_request_schemas(),
                "ChatCompletion": CHAT_COMPLETION,
                "TextCompletion": TEXT_COMPLETION,
                "Model": MODEL,
                "ModelList": MODEL_LIST,
                "Usage": USAGE,
                "Error": ERROR,
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH}")
