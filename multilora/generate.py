"""Batched generation over the multi-LoRA model: one forward per decoding step for the whole
batch, each request with its own composition of adapters, sampling settings, stop sequences
and limits.

A request's ``composition`` (multilora.composition) says who answers it: the base model, one
adapter (``top1``), a weighted sum of adapters (``topk``), Arrow's per-token mix (``arrow``),
each of them one row of the batch (see multilora.bound); or ``logit``: one row per adapter
(a ``top1`` of each, same prompt), whose next-token log-probabilities are combined as
Σ wᵢ log pᵢ at every step; the request's sampler draws one token from that and the token is
fed to all its rows, which finish, stream and leave the batch together as one request.
Whatever the mix, a step is still one forward for the whole batch.

The loop is ours rather than ``model.generate`` because every row needs its own composition
(a binding, see multilora.model), its own temperature/top-p/seed, its own stop strings and
its own cancellation, because ``logit`` requests combine rows per step, and because the
streaming form must hand out text as it is made.

One batch runs at a time per engine (the LoRA binding lives on the shared modules).
``generate``/``generate_stream`` run a given set of requests to the end; a server opens
``running()`` instead and lets requests join the batch between decoding steps and leave it as
they finish (multilora.running, on the per-row key/value cache of multilora.rowcache).
Registry changes may happen meanwhile: a row's slots are pinned while it runs, so it keeps the
weights it started with.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from multilora.bound import BoundRow
from multilora.chat import chat_prompt_ids
from multilora.composition import Composition
from multilora.lora import LoraRegistry
from multilora.model import DEFAULT_MAX_BOUND_BYTES, MultiLoraModel
from multilora.requests import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    _Lanes,
    _lanes_of,
    _Row,
)
from multilora.running import RunningBatch

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class Engine:
    """The base model, its LoRA registry, and batched generation over both.

    Wraps ``model``'s linear modules in place. ``model`` must be a causal LM whose forward
    takes ``attention_mask``, ``position_ids``, a cache (``cache``, or ``past_key_values``,
    its name before transformers 5.2x) and ``logits_to_keep`` (every transformers decoder
    does).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        registry: LoraRegistry | None = None,
        max_bound_bytes: int = DEFAULT_MAX_BOUND_BYTES,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        # "is None", not "or": an empty registry (len 0) is falsy but is the one to use.
        self.registry = registry if registry is not None else LoraRegistry.for_model(model)
        self.lora = MultiLoraModel(model, self.registry, max_bound_bytes=max_bound_bytes)
        self.device = next(model.parameters()).device
        self.pad_id = _first_id(tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.vocab_size = getattr(model.config, "vocab_size", None)
        # transformers renamed the forward's cache argument (the old name warns, and goes in
        # 5.40): pass it under whichever name this model's forward takes.
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._generation_lock = threading.Lock()
        self._cancel_lock = threading.Lock()
        self._running: set[str] = set()
        self._cancelled: set[str] = set()

    # --- Adapters ---------------------------------------------------------------------------

    def add_adapter(
        self, key: str, *, lora_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> int:
        return self.registry.add(key, lora_config=lora_config, tensors=tensors)

    def remove_adapter(self, key: str) -> None:
        self.registry.remove(key)

    # --- Generation -------------------------------------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """Stop a running request at its next step (finish_reason "cancelled"). Safe from any
        thread. False when no running batch has that request."""
        with self._cancel_lock:
            if request_id not in self._running:
                return False
            self._cancelled.add(request_id)
            return True

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run the requests as one batch; results in the requests' order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        for event in self.generate_stream(requests):
            if event.result is not None:
                results[event.index] = event.result
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def check(self, requests: Sequence[GenerationRequest]) -> None:
        """Raise the GenerationError that ``generate`` would raise for these requests, if
        any, without running them (nor waiting for a running batch)."""
        self._rows(requests)

    def generate_stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Run the requests as one batch, yielding every row's event at every step.

        The requests are checked here, before the first event is asked for (a
        GenerationError is raised at once). The concatenated ``text`` of a row's events is
        its result's text. Iterate to the end or close the iterator: closing it ends the
        batch. A request can be cancelled from the moment iteration starts, including
        while it waits for another batch to finish.
        """
        return self._stream(self._rows(requests))

    def _stream(self, rows: list[_Row]) -> Iterator[StreamEvent]:
        if not rows:
            return
        with self._cancel_lock:
            self._running.update(row.request.request_id for row in rows)
        try:
            with self.running() as batch:
                batch.join_rows(rows)
                while len(batch):
                    yield from batch.sample()
                    batch.forward()
        finally:
            with self._cancel_lock:
                for row in rows:
                    self._running.discard(row.request.request_id)
                    self._cancelled.discard(row.request.request_id)

    @contextlib.contextmanager
    def running(self) -> Iterator[RunningBatch]:
        """A batch that requests join and leave between decoding steps (multilora.running),
        holding the engine for as long as it is open: one at a time per engine."""
        with self._generation_lock, self.lora.adapters([]) as binding:
            batch = RunningBatch(self, binding)
            try:
                yield batch
            finally:
                batch.close()

    def next_token_logits(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """The logits [B, vocab] of each request's first generated token (the prefill only),
        with the same batching, padding and compositions as ``generate``. For a ``logit``
        request, its row is the combined log-probabilities Σ wᵢ log pᵢ that its token is
        sampled from (float32)."""
        rows = self._rows(requests)
        with self._generation_lock, self.lora.adapters(_lanes_of(rows)):
            logits, *_ = self._prefill(rows)
        return _Lanes(rows, self.device).combine(logits)

    # --- Prefill --------------------------------------------------------------------------

    def _prefill(
        self, rows: list[_Row]
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Left-pad the lanes' prompts and run them: (last logits, cache, mask, last
        positions), one row per lane."""
        prompts = [row.prompt_ids for row in rows for _ in row.members]
        width = max(len(prompt_ids) for prompt_ids in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt_ids in enumerate(prompts):
            n = len(prompt_ids)
            ids[i, width - n :] = torch.tensor(prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a left-padded row sees the same positions as
        # it would alone (what transformers' generate does too).
        position_ids = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            output = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,  # the lm_head on the last position only
                **{self.cache_argument: cache},
            )
        return output.logits[:, -1, :], cache, mask, position_ids[:, -1]

    def _take_cancelled(self, batch: list[_Row]) -> set[str]:
        with self._cancel_lock:
            if not self._cancelled:
                return set()
            ids = {row.request.request_id for row in batch} & self._cancelled
            self._cancelled -= ids
            return ids

    # --- Per row ----------------------------------------------------------------------------

    def _advance(self, row: _Row, token: int) -> None:
        """Add one generated token to the row and decide whether it is finished."""
        request = row.request
        row.token_ids.append(token)
        if token in self.eos_ids and not request.ignore_eos:
            row.finish_reason = "stop"
            self._flush_text(row, end=len(row.token_ids) - 1)  # the eos token has no text
            return
        start = len(row.text)
        row.text += self._decode_increment(row)
        if request.stop:
            # A stop sequence may straddle tokens: search from where it could have begun.
            longest = max(len(stop) for stop in request.stop)
            cut = _first_stop(row.text, request.stop, max(0, start - longest + 1))
            if cut is not None:
                row.text = row.text[:cut]
                row.finish_reason = "stop"
                return
        if len(row.token_ids) >= row.max_new_tokens:
            row.finish_reason = "length"
            self._flush_text(row)

    def _decode_increment(self, row: _Row, *, final: bool = False, end: int | None = None) -> str:
        """The text of the tokens not yet decoded (up to ``end``), by decoding a window that
        starts a few tokens back and dropping the window's known text."""
        end = len(row.token_ids) if end is None else end
        decode = self.tokenizer.decode
        before = decode(
            row.token_ids[row.prefix_offset : row.read_offset], skip_special_tokens=True
        )
        after = decode(row.token_ids[row.prefix_offset : end], skip_special_tokens=True)
        # A trailing U+FFFD is an unfinished multi-byte character: wait for its next token,
        # unless the row is finishing and there is none.
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            row.prefix_offset, row.read_offset = row.read_offset, end
            return after[len(before) :]
        return ""

    def _flush_text(self, row: _Row, *, end: int | None = None) -> None:
        """On finishing: whatever the incremental decoder still held back becomes text."""
        row.text += self._decode_increment(row, final=True, end=end)
        if row.request.stop:
            cut = _first_stop(row.text, row.request.stop, 0)
            if cut is not None:
                row.text = row.text[:cut]

    def _event(self, row: _Row, token: int | None) -> StreamEvent:
        if row.finish_reason is None:
            # Hold back a tail that could still become a stop sequence.
            upto = len(row.text) - _stop_prefix_length(row.text, row.request.stop)
        else:
            upto = len(row.text)
        upto = max(upto, row.emitted)  # a stop match can only shorten what is not yet sent
        text = row.text[row.emitted : upto]
        row.emitted = upto
        result = None
        if row.finish_reason is not None:
            result = GenerationResult(
                request_id=row.request.request_id,
                composition=row.request.composition,
                shares=self._shares(row),
                text=row.text,
                token_ids=list(row.token_ids),
                finish_reason=row.finish_reason,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.token_ids),
            )
        return StreamEvent(
            index=row.index,
            request_id=row.request.request_id,
            token_id=token,
            text=text,
            finish_reason=row.finish_reason,
            result=result,
        )

    def _shares(self, row: _Row) -> dict[str, float]:
        composition = row.request.composition
        if row.routed is None:
            return dict(zip(composition.adapters, composition.weights, strict=True))
        routed = row.routed[: len(composition.adapters)]
        total = sum(routed)
        if total <= 0:  # not one forward routed (cannot happen after a prefill)
            return {key: 1.0 / len(routed) for key in composition.adapters}
        return {key: value / total for key, value in zip(composition.adapters, routed, strict=True)}

    # --- Requests ---------------------------------------------------------------------------

    def _rows(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        """Check every request before any work starts, so one bad request fails alone."""
        rows = []
        for index, request in enumerate(requests):
            prompt_ids = self._prompt_ids(request)
            room = (self.max_positions or 1 << 62) - len(prompt_ids)
            if room < 1:
                raise GenerationError(
                    f"The prompt ({len(prompt_ids)} tokens) fills the model's context of "
                    f"{self.max_positions} tokens."
                )
            max_new_tokens = request.max_new_tokens
            if max_new_tokens is None:
                max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
            if max_new_tokens < 1:
                raise GenerationError("max_new_tokens must be at least 1.")
            if max_new_tokens > room:
                raise GenerationError(
                    f"The prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                    f"({max_new_tokens}) exceeds the model's context of "
                    f"{self.max_positions} tokens."
                )
            if not request.temperature >= 0:
                raise GenerationError("temperature must be 0 (greedy) or more.")
            if not 0 < request.top_p <= 1:
                raise GenerationError("top_p must be in (0, 1].")
            if any(not isinstance(stop, str) or not stop for stop in request.stop):
                raise GenerationError("Stop sequences must be non-empty strings.")
            if request.seed is not None and not SEED_MIN <= request.seed <= SEED_MAX:
                # torch.Generator.manual_seed raises past these, mid-batch.
                raise GenerationError(f"seed must be in [{SEED_MIN}, {SEED_MAX}].")
            rows.append(
                _Row(
                    index=index,
                    request=request,
                    prompt_ids=prompt_ids,
                    members=self._members(request.composition),
                    max_new_tokens=max_new_tokens,
                )
            )
        return rows

    def lanes(self, composition: Composition) -> list[tuple[BoundRow, float]]:
        """The rows that run ``composition`` and the weight of each row's log-probabilities
        in the answer: one row of weight 1 for ``top1``, ``topk`` and ``arrow`` (their mix
        is inside the row); one row per adapter for ``logit``, with its weight. For callers
        that run the forwards themselves (``lora.adapters`` binds the rows). GenerationError
        for an adapter the registry does not hold."""
        members = self._members(composition)
        if composition.method == "logit":
            return list(zip(members, composition.weights, strict=True))
        return [(members[0], 1.0)]

    def _members(self, composition: Composition) -> list[BoundRow]:
        if not isinstance(composition, Composition):
            raise GenerationError(f"composition must be a Composition, not {composition!r}.")
        try:
            if composition.method == "logit":
                return [self.registry.slot_of(key) for key in composition.adapters]
            return [self.lora.bound_row(composition)]
        except KeyError as exc:
            raise GenerationError(str(exc.args[0])) from None

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        given = [
            part is not None for part in (request.prompt_ids, request.messages, request.prompt)
        ]
        if sum(given) != 1:
            raise GenerationError("Give exactly one of prompt_ids, messages or prompt.")
        if request.prompt_ids is not None:
            ids = [int(token) for token in request.prompt_ids]
        elif request.messages is not None:
            ids = chat_prompt_ids(self.tokenizer, list(request.messages))
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise GenerationError("The prompt is empty.")
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in ids):
            raise GenerationError("The prompt has token ids outside the vocabulary.")
        return ids


def _first_stop(text: str, stops: Collection[str], start: int) -> int | None:
    found = [i for stop in stops if (i := text.find(stop, start)) >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stops: Collection[str]) -> int:
    """The length of the longest tail of ``text`` that begins some stop sequence."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _first_id(*candidates: int | None) -> int:
    return next(int(c) for c in candidates if c is not None)


def _eos_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
