"""A preallocated key/value cache with one length per row, so that requests can join and
leave a running batch at any decoding step.

transformers' ``DynamicCache`` holds a batch as one left-padded block: every row's next token
goes to the same column, so adding a row means padding it (or every running row) to the
block's width and concatenating every layer, and each step appends by ``torch.cat``, a copy
of the whole cache. Here each layer's keys and values live in one buffer
``[rows, kv heads, length, head dim]`` allocated ahead, row ``i`` holds its tokens at columns
``0 .. lengths[i] - 1`` (no padding at all), and a decoding step writes each row's new entry at
its own column:

- a newcomer's prefill (left-padded among the newcomers, in a ``DynamicCache`` of their own)
  is copied into free rows: only the newcomers' entries move;
- a row that leaves is replaced by the last row (its entries copied over), so the running
  rows stay the buffer's first rows and a step's forward covers exactly them;
- the buffers grow (doubling, one copy) only when a newcomer needs more rows or columns than
  they have, which ``reserve`` decides at joining time, never in the middle of a step; each
  row says how many columns it may come to need (its prompt plus its most new tokens), and
  when the rows that remain need less than a quarter of what is held, the buffers shrink to
  their needs (one copy), so a long-gone long request does not keep its memory for ever.

A step's attention mask is a 4-D additive mask built here (each row sees its own columns up
to its new token), which transformers passes through unchanged, and the rows' positions are
their lengths, so each row sees exactly the keys and positions it would see alone.

transformers has no cache of this shape (its ``StaticCache`` writes every row at one shared
position), hence this one; it implements the part of ``Cache`` that decoder models call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache, DynamicCache

ROW_QUANTUM = 4  # rows are allocated in multiples of this
LENGTH_QUANTUM = 64  # and columns in multiples of this


class RowCache(Cache):
    def __init__(self, *, layers: int, device: torch.device) -> None:
        super().__init__(layers=[])  # our buffers replace transformers' per-layer objects
        self.depth = layers
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # per running row, in row order
        self.rooms: list[int] = []  # per running row: the most columns it may need
        self._step: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # --- Size -----------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold; (0, 0) before the first prefill."""
        if not self.keys:
            return 0, 0
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` columns (grows by doubling, one copy of
        what is held; never shrinks). A no-op before the first ``insert``, which sizes the
        buffers itself."""
        if not self.keys:
            return
        have_rows, have_length = self.capacity
        if rows <= have_rows and length <= have_length:
            return
        new_rows = max(have_rows, _round_up(rows, ROW_QUANTUM))
        if rows > have_rows:
            new_rows = max(new_rows, 2 * have_rows)
        new_length = max(have_length, _round_up(length, LENGTH_QUANTUM))
        if length > have_length:
            new_length = max(new_length, 2 * have_length)
        self._reallocate(new_rows, new_length)

    def _reallocate(self, rows: int, length: int) -> None:
        used_rows, used_length = self.rows, max(self.lengths, default=0)
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                _, heads, _, head_dim = old.shape
                new = old.new_zeros((rows, heads, length, head_dim))
                new[:used_rows, :, :used_length] = old[:used_rows, :, :used_length]
                buffers[layer] = new

    def _fit(self) -> None:
        """Shrink the buffers to the rows' needs when those are under a quarter of them."""
        if not self.keys or not self.rows:
            return
        have_rows, have_length = self.capacity
        rows = _round_up(self.rows, ROW_QUANTUM)
        length = _round_up(max(self.rooms), LENGTH_QUANTUM)
        if 4 * rows * length <= have_rows * have_length:
            self._reallocate(min(rows, have_rows), min(length, have_length))

    # --- Rows joining and leaving ---------------------------------------------------------

    def insert(
        self, prefill: DynamicCache, lengths: Sequence[int], *, rooms: Sequence[int]
    ) -> None:
        """Append the rows of a left-padded prefill (its row ``i`` has ``lengths[i]`` real
        tokens at the right end) as the last rows; row ``i`` may come to need ``rooms[i]``
        columns (it is given them now)."""
        length = max(rooms)
        layers = prefill.layers
        if len(layers) != self.depth:
            raise ValueError(f"the prefill has {len(layers)} layers, not {self.depth}")
        start = self.rows
        if not self.keys:
            first = layers[0].keys
            _, heads, _, head_dim = first.shape
            shape = (
                _round_up(len(lengths), ROW_QUANTUM),
                heads,
                _round_up(length, LENGTH_QUANTUM),
                head_dim,
            )
            self.keys = [first.new_zeros(shape) for _ in range(self.depth)]
            self.values = [first.new_zeros(shape) for _ in range(self.depth)]
        else:
            self.reserve(start + len(lengths), length)
        width = layers[0].keys.shape[2]
        same = len(set(lengths)) == 1
        for layer, source in enumerate(layers):
            pairs = ((self.keys[layer], source.keys), (self.values[layer], source.values))
            for buffer, states in pairs:
                if same:  # one copy for all the newcomers
                    n = lengths[0]
                    buffer[start : start + len(lengths), :, :n] = states[:, :, width - n :]
                else:
                    for i, n in enumerate(lengths):
                        buffer[start + i, :, :n] = states[i, :, width - n :]
        self.lengths.extend(int(n) for n in lengths)
        self.rooms.extend(int(n) for n in rooms)

    def keep(self, order: Sequence[int]) -> None:
        """Keep these rows (indices of the current rows), as the new rows ``0 .. len - 1``:
        ``order`` must keep every row below ``len(order)`` that it keeps in its place, so that
        only the rows moved from the end into a leaver's place are copied (as the engine's
        ``leave_order`` makes it)."""
        moves = [(old, new) for new, old in enumerate(order) if old != new]
        if moves:
            sources = torch.tensor([old for old, _ in moves], device=self.device)
            targets = torch.tensor([new for _, new in moves], device=self.device)
            span = max(self.lengths[old] for old, _ in moves)
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[targets, :, :span] = buffer[sources, :, :span]
        self.lengths = [self.lengths[old] for old in order]
        self.rooms = [self.rooms[old] for old in order]
        self._fit()

    # --- A decoding step ------------------------------------------------------------------

    def begin_step(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Before a one-token forward of every row: (position ids [rows, 1], the additive
        attention mask [rows, 1, 1, columns seen]) for the model's call."""
        lengths = torch.tensor(self.lengths, device=self.device)
        span = max(self.lengths) + 1
        seen = torch.arange(span, device=self.device).unsqueeze(0) <= lengths.unsqueeze(1)
        mask = torch.zeros(seen.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~seen, torch.finfo(dtype).min)
        rows = torch.arange(self.rows, device=self.device)
        self._step = (rows, lengths, span)
        return lengths.unsqueeze(1), mask.view(self.rows, 1, 1, span)

    def end_step(self) -> None:
        self._step = None
        self.lengths = [n + 1 for n in self.lengths]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._step is None:
            raise RuntimeError("RowCache.update outside begin_step/end_step")
        rows, columns, span = self._step
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # [rows, heads, 1, dim] -> each row's entry at its own column.
        keys[rows, :, columns] = key_states[:, :, 0]
        values[rows, :, columns] = value_states[:, :, 0]
        return keys[: self.rows, :, :span], values[: self.rows, :, :span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths, default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def leave_order(rows: int, leaving: set[int]) -> list[int]:
    """The order ``RowCache.keep`` takes when ``leaving`` rows go: every staying row below
    the new count keeps its place, and the staying rows beyond it fill the leavers' places."""
    count = rows - len(leaving)
    holes = [i for i in range(count) if i in leaving]
    movers = [i for i in range(count, rows) if i not in leaving]
    order = list(range(count))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    return order


def _round_up(value: int, quantum: int) -> int:
    return max(quantum, -(-value // quantum) * quantum)
