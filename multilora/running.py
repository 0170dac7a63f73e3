"""A batch that requests join and leave at any decoding step (continuous batching).

The engine's batch is a ``RunningBatch``: ``join`` prefills newcomers (together, left-padded
among themselves) and appends their rows to the running batch's key/value cache
(multilora.rowcache: only the newcomers' entries are copied) and LoRA binding; ``sample``
draws every row's next token and hands out one event per request, and the requests that
finished leave at once (their cache rows, binding rows and sampling rows freed); ``forward``
feeds the tokens drawn, one forward for every row. A server alternates
``sample`` / ``forward`` and lets newcomers ``join`` between two steps, so a request that
arrives while others decode waits for at most one step, then its own prefill.

A request's rows are its lanes: one, or one per adapter for ``logit`` (whose lanes'
log-probabilities are combined before its token is drawn, and fed the same token). Lanes of
a request need not be neighbours: a leaving row's place is taken by the batch's last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from multilora.bound import ArrowRow
from multilora.requests import GenerationRequest, StreamEvent, _Lanes, _lanes_of, _Row
from multilora.rowcache import RowCache, leave_order
from multilora.sampling import Sampler

if TYPE_CHECKING:
    from multilora.generate import Engine
    from multilora.model import Binding


class RunningBatch:
    """Made by ``Engine.running()``; used by one thread at a time."""

    def __init__(self, engine: Engine, binding: Binding) -> None:
        self.engine = engine
        self.binding = binding
        self.device = engine.device
        self.cache = RowCache(layers=engine.model.config.num_hidden_layers, device=engine.device)
        self.rows: list[_Row] = []  # the requests, in the sampler's order
        self.lanes: list[tuple[int, int]] = []  # per cache/binding row: (request, member)
        self.sampler = Sampler(temperatures=[], top_ps=[], seeds=[], device=engine.device)
        self.logits: torch.Tensor | None = None  # [lanes, vocab]: what the next token is drawn from
        self.tokens: list[int] | None = None  # per lane: the token drawn, not yet fed
        self._lanes = _Lanes([], engine.device, [])
        self._handles = 0

    def __len__(self) -> int:
        """The requests running."""
        return len(self.rows)

    @property
    def lane_count(self) -> int:
        return len(self.lanes)

    # --- Joining --------------------------------------------------------------------------

    def join(self, requests: Sequence[GenerationRequest]) -> list[int]:
        """Check the requests (a GenerationError for the first bad one: none joins), prefill
        them and add them to the batch. Returns each one's handle: the ``index`` of its
        events. Only between a ``forward`` and the next ``sample`` (or at the start)."""
        rows = self.engine._rows(requests)
        return self.join_rows(rows)

    def join_rows(self, rows: list[_Row]) -> list[int]:
        """``join`` for rows already checked by ``Engine._rows`` (their index is replaced)."""
        if self.tokens is not None:
            raise RuntimeError("join between sample and forward")
        if not rows:
            return []
        handles = list(range(self._handles, self._handles + len(rows)))
        self._handles += len(rows)
        for row, handle in zip(rows, handles, strict=True):
            row.index = handle
        with self.engine._cancel_lock:
            self.engine._running.update(row.request.request_id for row in rows)
        try:
            with self.binding.joining(_lanes_of(rows)):
                logits, prefill, _, _ = self.engine._prefill(rows)
            lengths = [len(row.prompt_ids) for row in rows for _ in row.members]
            rooms = [len(row.prompt_ids) + row.max_new_tokens for row in rows for _ in row.members]
            with torch.inference_mode():
                self.cache.insert(prefill, lengths, rooms=rooms)
        except BaseException:
            self._forget(rows)
            raise
        base = len(self.rows)
        self.lanes += [(base + i, j) for i, row in enumerate(rows) for j in range(len(row.members))]
        self.rows += rows
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.sampler.add_rows(
            temperatures=[row.request.temperature for row in rows],
            top_ps=[row.request.top_p for row in rows],
            seeds=[row.request.seed for row in rows],
        )
        self._lanes = _Lanes(self.rows, self.device, self.lanes)
        return handles

    # --- A step ---------------------------------------------------------------------------

    def sample(self) -> list[StreamEvent]:
        """Draw every request's next token, advance it, and return one event per request;
        the requests that finished (or were cancelled) leave the batch."""
        if not self.rows:
            return []
        assert self.logits is not None
        # The step's one sync.
        tokens = self.sampler.sample(self._lanes.combine(self.logits)).tolist()
        self.logits = None  # drawn from; ``forward`` makes the next ones
        cancelled = self.engine._take_cancelled(self.rows)
        shares = self.binding.shares
        events = []
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            made: int | None = token
            if row.request.request_id in cancelled:
                row.finish_reason, made = "cancelled", None
            else:
                self.engine._advance(row, token)
            arrow = shares is not None and isinstance(row.members[0], ArrowRow)
            if arrow and row.finish_reason is not None:  # the row's one sync for it
                row.routed = shares[self._lanes.first[i]].tolist()
            events.append(self.engine._event(row, made))
        self.tokens = [tokens[owner] for owner in self._lanes.owner]
        self._leave({i for i, row in enumerate(self.rows) if row.finish_reason is not None})
        return events

    def forward(self) -> None:
        """Feed every running lane the token ``sample`` drew for it: one forward."""
        tokens, self.tokens = self.tokens, None
        if not self.lanes:
            return
        assert tokens is not None and len(tokens) == len(self.lanes)
        model = self.engine.model
        positions, mask = self.cache.begin_step(model.dtype)
        with torch.inference_mode():
            output = model(
                input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.engine.cache_argument: self.cache},
            )
        self.cache.end_step()
        self.logits = output.logits[:, -1, :]

    # --- Leaving --------------------------------------------------------------------------

    def _leave(self, finished: set[int]) -> None:
        if not finished:
            return
        leaving = {lane for lane, (owner, _) in enumerate(self.lanes) if owner in finished}
        order = leave_order(len(self.lanes), leaving)
        kept = [i for i in range(len(self.rows)) if i not in finished]
        renumber = {old: new for new, old in enumerate(kept)}
        self._forget([self.rows[i] for i in finished])
        with torch.inference_mode():
            self.cache.keep(order)
        self.binding.select_rows(order)
        self.sampler.select_rows(kept)
        assert self.tokens is not None  # drawn by ``sample``, which calls this
        self.tokens = [self.tokens[lane] for lane in order]
        self.lanes = [(renumber[self.lanes[lane][0]], self.lanes[lane][1]) for lane in order]
        self.rows = [self.rows[i] for i in kept]
        self._lanes = _Lanes(self.rows, self.device, self.lanes)

    def _forget(self, rows: Sequence[_Row]) -> None:
        with self.engine._cancel_lock:
            for row in rows:
                self.engine._running.discard(row.request.request_id)
                self.engine._cancelled.discard(row.request.request_id)

    def close(self) -> None:
        """The batch ends (its requests, if any, are dropped)."""
        self._forget(self.rows)
        self.rows, self.lanes, self.logits, self.tokens = [], [], None, None
