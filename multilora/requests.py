"""What the engine is asked for and what it hands back: requests, results and stream events,
and the engine's per-request bookkeeping (a request's rows in the batch, and how a ``logit``
request's rows are combined into the one distribution its token is drawn from)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from multilora.bound import BoundRow
from multilora.composition import BASE, Composition

FinishReason = Literal["stop", "length", "cancelled"]
DEFAULT_MAX_NEW_TOKENS = 256


class GenerationError(ValueError):
    """A request the engine cannot run (no prompt, unknown adapter, too long, bad settings)."""


def _lanes_of(rows: Sequence[_Row]) -> list[BoundRow]:
    return [member for row in rows for member in row.members]


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to make. Give exactly one of ``prompt_ids``, ``messages`` (chat
    messages, formatted with the tokenizer's chat template and the assistant turn opened)
    or ``prompt`` (plain text, tokenized as is)."""

    prompt_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    prompt: str | None = None
    composition: Composition = BASE  # who answers, by registry key; BASE: the base model
    max_new_tokens: int | None = None  # None: up to DEFAULT_MAX_NEW_TOKENS, within the context
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None  # with temperature > 0: the row's own random stream
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    composition: Composition
    # Each adapter's share of the answer: its weight for top1, topk and logit; for arrow the
    # mean routing weight it got over the generated tokens and the adapted modules.
    shares: dict[str, float]
    text: str  # the completion, cut before the first stop sequence; special tokens left out
    token_ids: list[int]  # every generated token, the end-of-sequence one included
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamEvent:
    """One row's progress in one decoding step (``generate_stream``)."""

    index: int  # the request's position in the list given to generate_stream
    request_id: str
    token_id: int | None  # None for a row cancelled before this step's token
    text: str  # text made final by this step ("" while a possible stop sequence is held back)
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None  # with the row's last event


@dataclass
class _Row:
    index: int
    request: GenerationRequest
    prompt_ids: list[int]
    members: list[BoundRow]  # the row's batch rows: one, or one per adapter for logit
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    # Incremental detokenization (as vLLM does it): decode a window starting a few tokens
    # back, so that the text of the new tokens is right without re-decoding everything.
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: FinishReason | None = None
    routed: list[float] | None = None  # arrow: the binding's summed routing weights


class _Lanes:
    """The batch's rows (lanes) of its requests, and how lane logits become request ones.

    ``lanes``: per lane, (its request's index in ``rows``, which of the request's members it
    runs); by default each request's lanes in order, one after another. A running batch
    keeps its lanes in any order (rows that leave are replaced by the last ones)."""

    def __init__(
        self,
        rows: Sequence[_Row],
        device: torch.device,
        lanes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if lanes is None:
            lanes = [(i, j) for i, row in enumerate(rows) for j in range(len(row.members))]
        self.count = len(rows)
        self.owner = [i for i, _ in lanes]
        first: dict[int, int] = {}
        for lane, owner in enumerate(self.owner):
            first.setdefault(owner, lane)
        self.first = [first[i] for i in range(len(rows))]
        fused = [
            lane
            for lane, (i, _) in enumerate(lanes)
            if rows[i].request.composition.method == "logit"
        ]
        self.fused = None
        if fused:
            weights = [
                rows[lanes[lane][0]].request.composition.weights[lanes[lane][1]] for lane in fused
            ]
            self.fused = (
                torch.tensor(fused, device=device),
                torch.tensor(weights, device=device).unsqueeze(1),
                torch.tensor(self.owner, device=device),
            )

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """Lane logits [lanes, V] -> one row per request [requests, V]: a logit request's
        Σ wᵢ log_softmax(logitsᵢ), every other request's own logits unchanged."""
        if self.fused is None:
            # One lane per request; a running batch may hold them in another order.
            if self.owner == list(range(self.count)):
                return logits
            return logits.index_select(0, torch.tensor(self.first, device=logits.device))
        lanes, weights, owner = self.fused
        logits = logits.float()
        weighted = torch.log_softmax(logits.index_select(0, lanes), dim=-1) * weights
        logits = logits.index_copy(0, lanes, weighted)
        return logits.new_zeros(self.count, logits.shape[1]).index_add_(0, owner, logits)
