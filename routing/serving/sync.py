"""Keeping the serving process on the active mixture: poll one row, load only what changed.

Polling ``MixtureVersion.number WHERE is_active`` (an index-only read of one row) every
TESSERA_MIXTURE_POLL_SECONDS is simpler and sturdier than Redis pub/sub: a missed message
cannot leave a server stale, a restarted server catches up at its first poll, and a
rollback from the admin is seen like any other change.

Order matters for "served within a second, gone as fast": an added adapter's weights are in
the engine before the new catalog makes it routable; a removed adapter leaves the catalog
first (no new request can be routed to it) and its weights leave the engine one grace
period later, so requests routed just before the switch still find them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from django.db import close_old_connections, connection

from contributions.models import AdapterVersion
from multilora import AdapterLoadError, Engine, LoraRegistry, tensors_from_safetensors
from routing import selectors
from routing.catalog import Catalog, ServedAdapter


def add_adapter_version(registry: LoraRegistry, version: Any, *, key: str) -> int:
    """Load a stored AdapterVersion under ``key`` from our validated config
    (``adapter_config``) and its weights file's tensors; return its slot."""
    with version.weights_file.open("rb") as weights:
        data = weights.read()
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
    return ServedAdapter(
        key=engine_key(version.pk),
        version_id=version.pk,
        version_number=version.number,
        adapter_id=adapter.pk,
        model_id=f"{adapter.owner.get_username()}/{adapter.slug}",
        title=adapter.title,
        owner_id=adapter.owner_id,
        owner_username=adapter.owner.get_username(),
        license=adapter.license,
        private=adapter.visibility == adapter.Visibility.PRIVATE,
        task_tags=tuple(adapter.task_tags or ()),
        signature=vector,
        admitted_at=version.status_changed_at,
        contributor_name=_contributor_name(adapter.owner),
    )


def _contributor_name(user) -> str:
    profile = getattr(user, "contributor", None)
    if profile is not None and profile.is_public and profile.display_name:
        return profile.display_name
    return user.get_username()


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
        self._retiring: list[tuple[float, str]] = []
        self._active: tuple[int, int] | None = None  # (pk, number) of the mixture served
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
        """Catch up with the active mixture; True when the catalog changed."""
        with self._lock:
            self._retire_due()
            active = selectors.mixture_active_key()
            if active is None or active == self._active:
                return False
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
            self._active = (mixture.pk, mixture.number)
            self.catalog = Catalog(
                mixture_number=mixture.number,
                router=mixture.router,
                router_settings=dict(mixture.router_settings or {}),
                adapters=tuple(sorted([*kept, *added], key=lambda a: a.version_id)),
            )
            due = time.monotonic() + RETIRE_GRACE_SECONDS
            self._retiring.extend((due, adapter.key) for adapter in removed)
            logger.info(
                "Serving mixture v%d: %d adapters (+%d, -%d) in %.2fs",
                mixture.number,
                len(self.catalog),
                len(added),
                len(removed),
                time.monotonic() - started,
            )
        if self.on_change is not None:
            self.on_change(self.catalog)
        return True

    def _retire_due(self) -> None:
        now = time.monotonic()
        served = {adapter.key for adapter in self.catalog}
        keep = []
        for due, key in self._retiring:
            if due > now:
                keep.append((due, key))
            elif key not in served and key in self.engine.registry:
                self.engine.remove_adapter(key)
        self._retiring = keep
