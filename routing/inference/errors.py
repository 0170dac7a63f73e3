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
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or None
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
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"Invalid '{param}': {message}.", code="invalid_value", param=param)


def invalid_json() -> ApiError:
    return ApiError(400, "The body is not valid JSON.", code="invalid_json")


def unauthenticated(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        code="invalid_api_key",
        type="authentication_error",
        headers={"WWW-Authenticate": 'Bearer realm="inference"'},
    )
