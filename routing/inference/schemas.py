"""The request bodies of the OpenAI-compatible API, validated with pydantic.

pydantic rather than DRF serializers here: the API runs in async views and must report the
first bad field as OpenAI does (one message, the parameter's name, a code), which pydantic's
error locations give directly. Fields OpenAI clients commonly send and that do not change
what a small model does (penalties, user, logit_bias) are accepted and ignored; fields that
would change the answer's shape and that Tessera cannot honour (n > 1, tools, logprobs) are
refused with ``unsupported_parameter`` rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 64
MAX_LIST_ITEMS = 256  # per policy list, and logit_bias entries
MAX_NAME_LENGTH = 200
# A seed is a signed 64-bit integer, as OpenAI documents it (and as torch.Generator takes).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# Numbers are strict: "0.5" or true where a number goes is refused, not read as one, and
# NaN or infinity never passes a bound.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]
Name = Annotated[str, Field(max_length=MAX_NAME_LENGTH)]
Names = Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)]


class Unsupported(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: Annotated[str, Field(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class Policy(BaseModel):
    """Per-request routing filters, in the ``tessera`` extension object."""

    model_config = ConfigDict(extra="forbid")
    licenses: Names | None = None
    include_contributors: Names | None = None
    exclude_contributors: Names = []
    include_adapters: Names | None = None
    exclude_adapters: Names = []
    base_only: Flag = False


class Extension(BaseModel):
    """``{"tessera": {...}}``: Tessera's own request options (the openai client sends them
    with ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")
    router: Annotated[str, Field(min_length=1, max_length=40)] | None = None
    threshold: Annotated[Number, Field(ge=-1, le=1)] | None = None
    policy: Policy = Policy()
    # How the answer is composed (routing.compose); None: the deployment's default.
    composition: Literal["top1", "topk", "arrow", "logit", "merged"] | None = None
    k: Annotated[Count, Field(ge=1, le=16)] | None = None
    temperature: Annotated[Number, Field(gt=0, le=100)] | None = None

    @field_validator("router")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        from routing.router import ROUTERS  # the registry: every router that can be named

        if value is not None and value not in ROUTERS:
            raise ValueError(f"unknown router; use one of {', '.join(ROUTERS)}")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Flag = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[Count, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    stop: str | list[str] | None = None
    seed: Annotated[Count, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: Flag = False
    stream_options: StreamOptions | None = None
    n: Count = 1
    logprobs: Flag | Annotated[Count, Field(ge=0, le=20)] | None = None
    # Accepted and ignored (see the module's docstring), but only within OpenAI's ranges.
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: (
        Annotated[dict[str, Annotated[Number, Field(ge=-100, le=100)]], Field(max_length=300)]
        | None
    ) = None
    user: Annotated[str, Field(max_length=256)] | None = None
    tessera: Extension = Extension()

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(key.isascii() and key.isdigit() for key in value):
            raise ValueError("logit_bias keys are token ids (digit strings)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for stop in stops:
            if not stop or len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"stop sequences must have 1 to {MAX_STOP_LENGTH} characters")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> _Common:
        if self.n != 1:
            raise Unsupported("n", "Only n=1 is supported.")
        if self.logprobs:
            raise Unsupported("logprobs", "logprobs are not supported.")
        return self

    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[Count, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise Unsupported("tools", "Tool calling is not supported.")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise Unsupported("response_format", "Only the text response format is supported.")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def routing_text(self) -> str:
        """What the router reads: the last user turn (the question being asked)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return self.messages[-1].text()

    def chat(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Flag = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise Unsupported("prompt", "Give one prompt per request.")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise Unsupported("echo", "echo is not supported.")
        if self.suffix:
            raise Unsupported("suffix", "suffix is not supported.")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def routing_text(self) -> str:
        assert isinstance(self.prompt, str)
        return self.prompt
