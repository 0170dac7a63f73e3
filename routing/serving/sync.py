"""Keeping the serving process on the active mixture: poll one row, load only what changed.

Polling ``MixtureVersion.number WHERE is_active`` (an index-only read of one row) every
TESSERA_MIXTURE_POLL_SECONDS is simpler and sturdier than Redis pub/sub: a missed message
cannot leave a server stale, a restarted server catches up at its first poll, and a
rollback from the admin is seen like any other change.

Order matters for "served within a second, gone as fast": an added adapter's weights are in
the engine before the new catalog makes it routable; a removed adapter leaves the catalog
first (no new request can be routed to it) and its weights leave the engine one grace
period later, so requests routed just before the switch still find them.

The active mixture's merged adapter (routing.merging) follows the same order: it is built
after the mixture is published, so every poll also reads its row's (pk, status) by the
mixture's unique key, and a build that is done is loaded before the catalog names it; a
new mixture's catalog drops the previous mixture's merged adapter at once (it may hold a
member just suspended) and the engine lets go of its weights one grace period later. A
build that failed or cannot be loaded leaves ``catalog.merged`` None and serving as it was.

The mixture's learned router (routing.learned) is trained after it is published too: every
poll reads its row's (pk, status) the same way, and a trained one is read from its file
into ``catalog.learned`` (until then, or if the file cannot be read, the learned router
answers with the embedding router's pick).

What contributors edit after admission (an adapter's visibility, license, title, tags, and
the name attributions show) changes no mixture version, so every poll also reads those few
columns of the served adapters (one query by primary key, joined to their owners) and
swaps in a catalog with the new descriptions when any differs: an adapter made private is
gone from other users' /v1/models and routing at the next poll, its weights untouched. A
merged adapter holding a member made private leaves the catalog too (its weights hold that
member's), and follows its members' licenses.

Every weights file is hashed before it is loaded and compared with the sha256 stored at
upload (``AdapterVersion.weights_sha256``): a file changed on disk since is refused, logged
and left out, and the rest of the mixture is served.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from django.contrib.auth import get_user_model
from django.db import close_old_connections, connection

from contributions.models import Adapter, AdapterVersion
from multilora import AdapterLoadError, Engine, LoraRegistry, tensors_from_safetensors
from routing import selectors
from routing.catalog import MERGED_MODEL_ID, Catalog, ServedAdapter
from routing.learned.services import learned_router_load
from routing.models import LearnedRouter, MergedAdapter, Scoreboard
from routing.router.learned import LearnedRouterModel
from routing.scoreboard.selectors import best_compositions, best_router


def add_adapter_version(registry: LoraRegistry, version: Any, *, key: str) -> int:
    """Load a stored AdapterVersion under ``key`` from our validated config
    (``adapter_config``) and its weights file's tensors; return its slot."""
    with version.weights_file.open("rb") as weights:
        data = weights.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != version.weights_sha256:
        raise AdapterLoadError(
            f"the weights file's sha256 is {digest[:12]}…, not the {version.weights_sha256[:12]}… "
            "stored when it was uploaded: it changed on disk"
        )
    return registry.add(
        key, lora_config=version.adapter_config, tensors=tensors_from_safetensors(data)
    )


logger = logging.getLogger(__name__)

RETIRE_GRACE_SECONDS = 5.0


def engine_key(version_id: int) -> str:
    return f"v{version_id}"


def served_adapter(version: AdapterVersion) -> ServedAdapter:
    adapter = version.adapter
    signature = getattr(version, "routing_signature", None)
    vector = None
    if signature is not None and signature.vector:
        vector = np.asarray(signature.vector, dtype=np.float32)
    profile = getattr(adapter.owner, "contributor", None)
    return ServedAdapter(
        key=engine_key(version.pk),
        version_id=version.pk,
        version_number=version.number,
        adapter_id=adapter.pk,
        owner_id=adapter.owner_id,
        signature=vector,
        admitted_at=version.status_changed_at,
        **_described(
            Description(
                slug=adapter.slug,
                title=adapter.title,
                license=adapter.license,
                visibility=adapter.visibility,
                task_tags=adapter.task_tags,
                username=adapter.owner.get_username(),
                display_name=profile.display_name if profile is not None else None,
                name_public=profile.is_public if profile is not None else None,
            )
        ),
    )


@dataclass(frozen=True)
class Description:
    """The columns of an adapter (and its owner) that contributors may edit after admission."""

    slug: str
    title: str
    license: str
    visibility: str
    task_tags: Any
    username: str
    display_name: str | None
    name_public: bool | None

    COLUMNS = (
        "slug",
        "title",
        "license",
        "visibility",
        "task_tags",
        "owner__USERNAME",
        "owner__contributor__display_name",
        "owner__contributor__is_public",
    )


def _described(description: Description) -> dict[str, Any]:
    """The ServedAdapter fields a description gives."""
    name_shown = description.name_public and description.display_name
    return {
        "model_id": f"{description.username}/{description.slug}",
        "title": description.title,
        "owner_username": description.username,
        "license": description.license,
        "private": description.visibility == Adapter.Visibility.PRIVATE,
        "task_tags": tuple(description.task_tags or ()),
        "contributor_name": description.display_name if name_shown else description.username,
    }


def descriptions(adapter_ids: set[int]) -> dict[int, Description]:
    """{adapter id: its description now}, in one query."""
    username = f"owner__{get_user_model().USERNAME_FIELD}"
    columns = [username if c == "owner__USERNAME" else c for c in Description.COLUMNS]
    rows = Adapter.objects.filter(pk__in=adapter_ids).values_list("pk", *columns)
    return {pk: Description(*values) for pk, *values in rows}


def merged_engine_key(mixture_number: int, merged_id: int) -> str:
    # The row's pk too: `manage.py merge_mixture` can rebuild a mixture's merged adapter,
    # and the new weights must load beside the old ones before the catalog switches.
    return f"merged-{mixture_number}-{merged_id}"


def served_merged(merged: MergedAdapter, *, key: str) -> ServedAdapter:
    """The catalog's description of a built merged adapter: owned by the platform, under
    its members' common license (or "mixed"), tagged with the union of their tags."""
    members = list(
        AdapterVersion.objects.filter(pk__in=merged.version_ids).select_related("adapter")
    )
    licenses = {version.adapter.license for version in members}
    tags = sorted({tag for version in members for tag in version.adapter.task_tags or ()})
    number = merged.mixture.number
    return ServedAdapter(
        key=key,
        version_id=0,
        version_number=number,
        adapter_id=0,
        model_id=MERGED_MODEL_ID,
        title=f"Merged mixture v{number}",
        owner_id=0,
        owner_username="tessera",
        license=licenses.pop() if len(licenses) == 1 else "mixed",
        private=False,
        task_tags=tuple(tags),
        signature=None,
        admitted_at=merged.finished_at,
        contributor_name="tessera",
        members=tuple(version.pk for version in members),
    )


class MixtureSync:
    """Holds ``catalog`` (swapped whole, read without a lock) in step with the database."""

    def __init__(
        self,
        engine: Engine,
        *,
        poll_seconds: float = 0.25,
        on_change: Callable[[Catalog], None] | None = None,
    ) -> None:
        self.engine = engine
        self.poll_seconds = poll_seconds
        self.on_change = on_change
        self.catalog = Catalog(mixture_number=0, router="embedding")
        self.failed: dict[int, str] = {}  # version id → why it could not be loaded
        self.merged_failed: dict[int, str] = {}  # MergedAdapter id → why it was not loaded
        self._retiring: list[tuple[float, str]] = []
        self._active: tuple[int, int] | None = None  # (pk, number) of the mixture served
        # (pk, status) of the served mixture's merged build when last read: None, no row.
        self._merged_seen: tuple[int, str] | None = None
        self._learned_seen: tuple[int, str] | None = None  # likewise, its learned router's
        self._board_seen: tuple[int, str] | None = None  # likewise, its scoreboard's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one refresh at a time (thread or caller)

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="tessera-mixture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _loop(self) -> None:
        try:
            self._poll()
        finally:
            connection.close()  # this thread's own connection

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:
                # A database blip must not kill the thread: log, keep serving the last
                # catalog, try again at the next poll.
                logger.exception(
                    "Mixture poll failed; serving mixture v%s meanwhile",
                    self.catalog.mixture_number,
                )
            finally:
                close_old_connections()

    def refresh(self) -> bool:
        """Catch up with the active mixture and its merged adapter; True when the catalog
        changed."""
        with self._lock:
            self._retire_due()
            active = selectors.mixture_active_key()
            if active is None:
                return False
            if active == self._active:
                merged = self._refresh_merged(*active)
                learned = self._refresh_learned(*active)
                changed = self._refresh_board(active[0]) or learned or merged
            else:
                changed = self._switch()
            # The kept adapters of a new mixture were described when they were first loaded.
            changed = self._refresh_descriptions() or changed
        if changed and self.on_change is not None:
            self.on_change(self.catalog)
        return changed

    def _switch(self) -> bool:
        mixture = selectors.mixture_active()
        if mixture is None:
            return False
        started = time.monotonic()
        wanted = selectors.mixture_member_ids(mixture)
        current = {adapter.version_id: adapter for adapter in self.catalog}
        versions = (
            AdapterVersion.objects.filter(pk__in=wanted - current.keys())
            .select_related("adapter__owner__contributor", "routing_signature")
            .order_by("pk")
        )
        added = []
        for version in versions:
            key = engine_key(version.pk)
            try:
                # Still in the engine when it left a moment ago and is back (a rollback).
                if key not in self.engine.registry:
                    add_adapter_version(self.engine.registry, version, key=key)
            except (AdapterLoadError, OSError, ValueError) as error:
                # One unreadable adapter must not keep the others out.
                self.failed[version.pk] = str(error)
                logger.error("Could not load %s: %s", version, error)
                continue
            added.append(served_adapter(version))
        kept = [adapter for pk, adapter in current.items() if pk in wanted]
        removed = [adapter for pk, adapter in current.items() if pk not in wanted]
        self._merged_seen, merged = self._load_merged(mixture.pk)
        self._learned_seen, learned = self._load_learned(mixture.pk)
        self._board_seen, best, best_by_board = self._load_board(mixture.pk)
        retired = [*removed] + ([self.catalog.merged] if self.catalog.merged is not None else [])
        self._active = (mixture.pk, mixture.number)
        self.catalog = Catalog(
            mixture_number=mixture.number,
            router=mixture.router,
            router_settings=dict(mixture.router_settings or {}),
            adapters=tuple(sorted([*kept, *added], key=lambda a: a.version_id)),
            merged=merged,
            learned=learned,
            best_compositions=best,
            best_router=best_by_board,
        )
        due = time.monotonic() + RETIRE_GRACE_SECONDS
        self._retiring.extend((due, adapter.key) for adapter in retired)
        logger.info(
            "Serving mixture v%d: %d adapters (+%d, -%d)%s in %.2fs",
            mixture.number,
            len(self.catalog),
            len(added),
            len(removed),
            " and its merged adapter" if merged is not None else "",
            time.monotonic() - started,
        )
        return True

    def _refresh_descriptions(self) -> bool:
        """Swap in the served adapters' edited descriptions, if any changed since."""
        served = self.catalog.adapters
        if not served:
            return False
        now = descriptions({adapter.adapter_id for adapter in served})
        updated = []
        for adapter in served:
            description = now.get(adapter.adapter_id)
            fields = _described(description) if description is not None else {}
            if any(getattr(adapter, name) != value for name, value in fields.items()):
                adapter = replace(adapter, **fields)
            updated.append(adapter)
        if all(new is old for new, old in zip(updated, served, strict=True)):
            return False
        merged = self._merged_after(updated)
        if merged is None and self.catalog.merged is not None:
            self._retiring.append(
                (time.monotonic() + RETIRE_GRACE_SECONDS, self.catalog.merged.key)
            )
        self.catalog = replace(self.catalog, adapters=tuple(updated), merged=merged)
        changed = [new.model_id for new, old in zip(updated, served, strict=True) if new is not old]
        logger.info("Edited after admission, served as edited now: %s", ", ".join(changed))
        return True

    def _merged_after(self, adapters: list[ServedAdapter]) -> ServedAdapter | None:
        """The merged adapter once its members' descriptions changed: gone when one of
        them is private now (its weights are in it, served to everyone), else under their
        licenses as they are now."""
        merged = self.catalog.merged
        if merged is None:
            return None
        members = [adapter for adapter in adapters if adapter.version_id in merged.members]
        if any(adapter.private for adapter in members):
            logger.info("The merged adapter holds a member made private: no longer served")
            return None
        licenses = {adapter.license for adapter in members}
        license = licenses.pop() if len(licenses) == 1 else "mixed"
        return merged if license == merged.license else replace(merged, license=license)

    def _refresh_merged(self, mixture_pk: int, mixture_number: int) -> bool:
        """The served mixture's merged build, when its row changed since the last poll
        (one read by the row's unique key): load a done one, then name it in the catalog."""
        seen = MergedAdapter.objects.filter(mixture_id=mixture_pk).values_list("pk", "status")
        if seen.first() == self._merged_seen:
            return False
        self._merged_seen, merged = self._load_merged(mixture_pk)
        previous = self.catalog.merged
        if merged is None and previous is None:
            return False
        self.catalog = replace(self.catalog, merged=merged)
        if previous is not None:
            self._retiring.append((time.monotonic() + RETIRE_GRACE_SECONDS, previous.key))
        logger.info(
            "Serving mixture v%d with %s",
            mixture_number,
            "its merged adapter" if merged is not None else "no merged adapter",
        )
        return True

    def _load_merged(self, mixture_pk: int) -> tuple[tuple[int, str] | None, ServedAdapter | None]:
        """(the row's (pk, status), the merged adapter loaded into the engine or None)."""
        merged = MergedAdapter.objects.select_related("mixture").filter(mixture_id=mixture_pk)
        row = merged.first()
        if row is None:
            return None, None
        seen = (row.pk, row.status)
        if row.status != MergedAdapter.Status.DONE or not row.weights_file:
            return seen, None  # not built yet, failed, or nothing public to merge
        key = merged_engine_key(row.mixture.number, row.pk)
        try:
            if key not in self.engine.registry:
                with row.weights_file.open("rb") as weights:
                    data = weights.read()
                self.engine.registry.add(
                    key, lora_config=row.adapter_config, tensors=tensors_from_safetensors(data)
                )
        except (AdapterLoadError, OSError, ValueError) as error:
            # The mixture's own adapters are served regardless.
            self.merged_failed[row.pk] = str(error)
            logger.error("Could not load the merged adapter of %s: %s", row.mixture, error)
            return seen, None
        return seen, served_merged(row, key=key)

    def _refresh_learned(self, mixture_pk: int, mixture_number: int) -> bool:
        """The served mixture's learned router, when its row changed since the last poll."""
        seen = LearnedRouter.objects.filter(mixture_id=mixture_pk).values_list("pk", "status")
        if seen.first() == self._learned_seen:
            return False
        self._learned_seen, learned = self._load_learned(mixture_pk)
        if learned is None and self.catalog.learned is None:
            return False
        self.catalog = replace(self.catalog, learned=learned)
        logger.info(
            "Serving mixture v%d with %s",
            mixture_number,
            f"its learned router ({learned.kind})" if learned is not None else "no learned router",
        )
        return True

    def _load_learned(
        self, mixture_pk: int
    ) -> tuple[tuple[int, str] | None, LearnedRouterModel | None]:
        """(the row's (pk, status), its trained model or None)."""
        seen = (
            LearnedRouter.objects.filter(mixture_id=mixture_pk).values_list("pk", "status").first()
        )
        if seen is None or seen[1] != LearnedRouter.Status.DONE:
            return seen, None
        return seen, learned_router_load(mixture_id=mixture_pk)

    def _refresh_board(self, mixture_pk: int) -> bool:
        """The served mixture's scoreboard, when its row changed since the last poll: the
        best composition per router, for TESSERA_COMPOSITION=best, and the best router, for
        TESSERA_ROUTER=best."""
        seen = Scoreboard.objects.filter(mixture_id=mixture_pk).values_list("pk", "status")
        if seen.first() == self._board_seen:
            return False
        self._board_seen, best, router = self._load_board(mixture_pk)
        if (best, router) == (self.catalog.best_compositions, self.catalog.best_router):
            return False
        self.catalog = replace(self.catalog, best_compositions=best, best_router=router)
        logger.info(
            "On the scoreboard: best router %s, best compositions by router %s",
            router or "none yet",
            best or "none yet",
        )
        return True

    def _load_board(
        self, mixture_pk: int
    ) -> tuple[tuple[int, str] | None, dict[str, str], str | None]:
        """(the row's (pk, status), {router: best method}, the best router), the last two
        empty until it is done."""
        row = Scoreboard.objects.filter(mixture_id=mixture_pk).only("pk", "status").first()
        if row is None:
            return None, {}, None
        seen = (row.pk, row.status)
        if row.status != Scoreboard.Status.DONE:
            return seen, {}, None
        figures = Scoreboard.objects.values_list("figures", flat=True).get(pk=row.pk) or {}
        return seen, best_compositions(figures), best_router(figures)

    def _retire_due(self) -> None:
        now = time.monotonic()
        served = {adapter.key for adapter in self.catalog}
        if self.catalog.merged is not None:
            served.add(self.catalog.merged.key)
        keep = []
        for due, key in self._retiring:
            if due > now:
                keep.append((due, key))
            elif key not in served and key in self.engine.registry:
                self.engine.remove_adapter(key)
        self._retiring = keep
