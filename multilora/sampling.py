"""Choosing each row's next token: greedy, or temperature + top-p sampling with the row's own
random stream.

All rows are handled with batched tensor operations; the only per-row Python work is one
uniform draw from each sampling row's ``torch.Generator``. Those generators live on the CPU
whatever the model's device, so a seed gives the same draws on CPU and GPU, and a row's draws
do not depend on which other rows share its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch


class Sampler:
    def __init__(
        self,
        *,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        seeds: Sequence[int | None],
        device: torch.device,
    ) -> None:
        self.device = device
        self.temperatures: list[float] = []
        self.top_ps: list[float] = []
        # temperature 0 means greedy: such a row never draws, so it needs no generator.
        self.generators: list[torch.Generator | None] = []
        self.add_rows(temperatures=temperatures, top_ps=top_ps, seeds=seeds)

    def add_rows(
        self,
        *,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        seeds: Sequence[int | None],
    ) -> None:
        """Append rows (requests joining the batch) after the current ones."""
        for temperature, top_p, seed in zip(temperatures, top_ps, seeds, strict=True):
            self.temperatures.append(temperature)
            self.top_ps.append(top_p)
            if temperature <= 0:
                self.generators.append(None)
                continue
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            self.generators.append(generator)
        self._refresh()

    def _refresh(self) -> None:
        self._sampled_rows = [i for i, g in enumerate(self.generators) if g is not None]
        if self._sampled_rows:
            self._rows = torch.tensor(self._sampled_rows, device=self.device)
            picked = self._sampled_rows
            self._temperature = torch.tensor(
                [self.temperatures[i] for i in picked], device=self.device
            ).unsqueeze(1)
            self._top_p = torch.tensor([self.top_ps[i] for i in picked], device=self.device)
            self._nucleus = any(self.top_ps[i] < 1.0 for i in picked)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep these rows (indices into the current batch), in this order."""
        self.temperatures = [self.temperatures[i] for i in rows]
        self.top_ps = [self.top_ps[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self._refresh()

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> next token ids [B] (on the logits' device)."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        if not self._sampled_rows:
            return tokens
        probs = torch.softmax(logits.index_select(0, self._rows) / self._temperature, dim=-1)
        if self._nucleus:
            # Nucleus: keep the most probable tokens whose cumulative mass before them is
            # below top_p (so the first token is always kept), then draw among them.
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill(before > self._top_p.unsqueeze(1), 0.0)
        else:
            order = None
        cdf = probs.cumsum(dim=-1)
        uniforms = torch.cat(
            [torch.rand(1, generator=self.generators[i]) for i in self._sampled_rows]
        )
        # Inverse-CDF draw: the first position whose cumulative mass exceeds u * total.
        # right=True never lands on a zero-probability token (its cdf equals its left one).
        targets = uniforms.to(self.device).unsqueeze(1) * cdf[:, -1:]
        picks = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.shape[-1] - 1)
        if order is not None:
            picks = order.gather(1, picks)
        tokens[self._rows] = picks.squeeze(1)
        return tokens
