"""The per-row key/value cache: rows join by copying only their prefill, leave by having the
last rows take their places, and the buffers grow without losing what they hold."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from multilora.rowcache import LENGTH_QUANTUM, ROW_QUANTUM, RowCache, leave_order

LAYERS, HEADS, DIM = 2, 3, 4


def prefill(lengths: list[int], seed: int) -> tuple[DynamicCache, list[torch.Tensor]]:
    """A left-padded prefill cache of these real lengths, and each row's real keys."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    cache = DynamicCache()
    for layer in range(LAYERS):
        keys = torch.randn(len(lengths), HEADS, width, DIM, generator=generator)
        cache.update(keys, keys + 100, layer)
    layer0 = cache.layers[0].keys
    return cache, [layer0[i, :, width - n :].clone() for i, n in enumerate(lengths)]


def held(cache: RowCache, row: int) -> torch.Tensor:
    return cache.keys[0][row, :, : cache.lengths[row]]


def test_newcomers_take_the_next_rows_with_their_real_tokens_from_column_zero():
    cache = RowCache(layers=LAYERS, device=torch.device("cpu"))
    first, first_rows = prefill([3, 5], seed=1)
    cache.insert(first, [3, 5], rooms=[10, 8])
    second, second_rows = prefill([2, 7, 4], seed=2)
    cache.insert(second, [2, 7, 4], rooms=[9, 90, 6])  # more columns and rows than held: grows
    assert cache.lengths == [3, 5, 2, 7, 4]
    rows, columns = cache.capacity
    assert rows >= 5 and rows % ROW_QUANTUM == 0
    assert columns >= 90 and columns % LENGTH_QUANTUM == 0
    for row, expected in enumerate(first_rows + second_rows):
        torch.testing.assert_close(held(cache, row), expected)
    torch.testing.assert_close(cache.values[1][3, :, :7], cache.keys[1][3, :, :7] + 100)


def test_a_leaving_row_is_replaced_by_the_last_one_and_the_others_stay_put():
    assert leave_order(5, {1}) == [0, 4, 2, 3]
    assert leave_order(5, {3, 4}) == [0, 1, 2]
    assert leave_order(5, {0, 3}) == [4, 1, 2]
    assert leave_order(4, {0, 1, 2, 3}) == []
    cache = RowCache(layers=LAYERS, device=torch.device("cpu"))
    source, rows = prefill([3, 5, 2, 6, 4], seed=3)
    cache.insert(source, [3, 5, 2, 6, 4], rooms=[16] * 5)
    untouched = cache.keys[0][2].clone()
    cache.keep(leave_order(5, {0, 3}))
    assert cache.lengths == [4, 5, 2]
    for row, expected in enumerate([rows[4], rows[1], rows[2]]):
        torch.testing.assert_close(held(cache, row), expected)
    assert torch.equal(cache.keys[0][2], untouched)


def test_a_step_writes_each_row_at_its_own_column_and_masks_the_rest():
    cache = RowCache(layers=1, device=torch.device("cpu"))
    source, _ = prefill([2, 4], seed=4)
    source.layers = source.layers[:1]
    cache.insert(source, [2, 4], rooms=[8, 8])
    positions, mask = cache.begin_step(torch.float32)
    assert positions.tolist() == [[2], [4]]
    assert mask.shape == (2, 1, 1, 5)
    seen = (mask == 0).squeeze(1).squeeze(1).tolist()
    assert seen == [[True, True, True, False, False], [True] * 5]
    new = torch.full((2, HEADS, 1, DIM), 7.0)
    keys, _ = cache.update(new, new, 0)
    cache.end_step()
    assert keys.shape == (2, HEADS, 5, DIM)
    assert torch.equal(cache.keys[0][0, :, 2], new[0, :, 0])
    assert torch.equal(cache.keys[0][1, :, 4], new[1, :, 0])
    assert cache.lengths == [3, 5]


def test_the_buffers_shrink_to_the_remaining_rows_needs_once_a_long_row_has_left():
    cache = RowCache(layers=LAYERS, device=torch.device("cpu"))
    source, rows = prefill([3, 4, 5], seed=5)
    cache.insert(source, [3, 4, 5], rooms=[20, 30, 1000])
    assert cache.capacity == (4, 1024)
    cache.keep(leave_order(3, {1}))  # the remaining rows still need 1000 columns
    assert cache.capacity == (4, 1024)
    cache.keep(leave_order(2, {1}))  # the long row leaves
    assert cache.capacity == (4, 64)
    assert cache.lengths == [3] and cache.rooms == [20]
    torch.testing.assert_close(held(cache, 0), rows[0])
