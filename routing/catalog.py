"""What the serving process holds: the adapters of the active mixture as plain, immutable
values, so the router and the API never touch the database on a request's path.

The mixture sync (routing.serving.sync) builds a new Catalog when the active mixture
changes and swaps it in with one assignment; a request reads ``current`` once and keeps
that snapshot for its whole life.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from routing.router.learned_model import LearnedRouterModel

# The model ids that never name an adapter: the routed mixture and the base model alone.
MIXTURE_MODEL_ID = "tessera"
BASE_MODEL_ID = "base"
# The mixture's public members merged into one LoRA (routing.merging): Catalog.merged.
MERGED_MODEL_ID = "tessera-merged"


@dataclass(frozen=True, eq=False)
class ServedAdapter:
    key: str  # the engine registry key ("v<version id>")
    version_id: int
    version_number: int
    adapter_id: int
    model_id: str  # the public name: "<owner username>/<adapter slug>"
    title: str
    owner_id: int
    owner_username: str
    license: str
    private: bool  # served to its owner's own keys only
    task_tags: tuple[str, ...]
    # The normalised centroid from evaluation (384 floats), or None when the version has
    # no routing signature (then only explicit and arrow routing can reach it).
    signature: np.ndarray | None
    admitted_at: datetime | None = None
    # How attributions name the contributor: their display name when their profile is
    # public, else their username (already public in the model id).
    contributor_name: str = ""
    # A merged adapter's member versions (it is no version itself): usage of its answers is
    # credited to them, in equal shares.
    members: tuple[int, ...] = ()

    def visible_to(self, user_id: int | None) -> bool:
        return not self.private or user_id == self.owner_id


@dataclass(frozen=True, eq=False)
class Catalog:
    mixture_number: int  # 0: nothing was ever published
    router: str  # the mixture's default router
    router_settings: dict = field(default_factory=dict)
    adapters: tuple[ServedAdapter, ...] = ()
    # The active mixture's merged adapter when its build is done and loaded, else None. Not
    # one of ``adapters`` (no router picks it): it answers requests for MERGED_MODEL_ID.
    # It is no AdapterVersion: version_id, adapter_id and owner_id are 0, version_number is
    # the mixture's number, and it is never private.
    merged: ServedAdapter | None = None
    # The mixture version's trained ``learned`` router, or None until it is trained (then
    # that router answers with the embedding router's pick).
    learned: LearnedRouterModel | None = None
    # {router: the composition method that scored best with it on this mixture's
    # scoreboard}, empty until the mixture is scored: what TESSERA_COMPOSITION=best serves.
    best_compositions: dict[str, str] = field(default_factory=dict)
    # The router that scored best on this mixture's scoreboard, None until it is scored:
    # what the ``best`` router (TESSERA_ROUTER=best) hands each request to.
    best_router: str | None = None

    def __iter__(self) -> Iterator[ServedAdapter]:
        return iter(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def by_model_id(self, model_id: str) -> ServedAdapter | None:
        """``owner/slug`` names the newest served version of that adapter; ``owner/slug@vN``
        names version N, when it is served."""
        return self._index.get(model_id)

    def public_id(self, adapter: ServedAdapter) -> str:
        """The id to show: ``owner/slug`` for the newest served version, else with ``@vN``."""
        if self._index.get(adapter.model_id) is adapter:
            return adapter.model_id
        return f"{adapter.model_id}@v{adapter.version_number}"

    def visible_to(self, user_id: int | None) -> list[ServedAdapter]:
        return [adapter for adapter in self.adapters if adapter.visible_to(user_id)]

    @property
    def _index(self) -> dict[str, ServedAdapter]:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {}
            for adapter in sorted(self.adapters, key=lambda a: a.version_number):
                index[adapter.model_id] = adapter  # the newest version wins the bare id
                index[f"{adapter.model_id}@v{adapter.version_number}"] = adapter
            object.__setattr__(self, "_index_cache", index)
        return index


EMPTY_CATALOG = Catalog(mixture_number=0, router="embedding")
