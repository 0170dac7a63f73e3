"""Errors in OpenAI's shape, so OpenAI clients raise their usual exception classes:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": "invalid_value"}}

with the status codes the official client maps (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 413, 429
RateLimitError, 503 InternalServerError after its retries)."""

from __future__ import annotations

from django.http import JsonResponse
from pydantic import ValidationError

from routing.inference.schemas import Unsupported


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


def from_validation(error: ValidationError) -> ApiError:
    """The first problem of a pydantic error, named like OpenAI names it."""
    errors = error.errors()
    first = errors[0]
    param = _param(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Unsupported):
        return ApiError(400, str(cause), code="unsupported_parameter", param=cause.param)
    kind = first["type"]
    if kind == "missing":
        return ApiError(
            400,
            f"Missing required parameter: '{param}'.",
            code="missing_required_parameter",
            param=param,
        )
    if kind == "extra_forbidden":
        return ApiError(
            400, f"Unrecognized parameter: '{param}'.", code="unknown_parameter", param=param
        )
    # A field of several accepted types (content: a string or a list of parts) fails once
    # per type: say each way it could have been right.
    messages = [first["msg"]]
    if len(first["loc"]) != len(_fields(first["loc"])):
        for other in errors[1:]:
            where = _param(other["loc"]) or ""
            if param and where.startswith(param) and other["msg"] not in messages:
                messages.append(other["msg"])
    message = "; or ".join(m.removeprefix("Value error, ") for m in messages)
    return ApiError(400, f"Invalid '{param}': {message}.", code="invalid_value", param=param)


# How pydantic names the members of a union in an error's location ("str", "list[str]",
# "function-after[...]"), and dict keys ("logit_bias.50256"): not the request's fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _fields(loc: tuple) -> list[str]:
    return [
        part
        for part in loc
        if isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS
    ]


def _param(loc: tuple) -> str | None:
    """The parameter as OpenAI names it: field names, dotted, without list indices."""
    return ".".join(_fields(loc)) or None


def unauthenticated(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        code="invalid_api_key",
        type="authentication_error",
        headers={"WWW-Authenticate": 'Bearer realm="inference"'},
    )
