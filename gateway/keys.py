"""APIM subscription keys: primary first, fall back to the secondary, reload key files.

Rotation drill this supports without a failed request: regenerate the primary in APIM
→ traffic falls back to the secondary → update the primary's Secret → the file changes,
the gateway reloads it and tries the primary first again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import KeySource, Route, Settings
from gateway.logging import get_logger, redactor
from gateway.metrics import Metrics

log = get_logger("keys")
PRIMARY, SECONDARY = "primary", "secondary"
_UNREADABLE = "\x00unreadable"  # sentinel: never a valid key (keys are printable)


@dataclass(slots=True)
class _Slot:
    name: str
    source: KeySource
    value: str | None = None
    digest: str | None = None

    def load(self) -> str | None:
        """The key as its source holds it now (a blocking read for files)."""
        if self.source.file is None:
            return self.source.value.reveal() if self.source.value else None
        # Content, not inode: Kubernetes swaps a symlink when it updates a mounted Secret.
        return Path(self.source.file).read_text(encoding="utf-8").strip() or None

    def apply(self, value: str | None) -> bool:
        """Take `value` as the slot's key; True when it differs from the previous one."""
        if value is not None:
            redactor.register(value)
        digest = hashlib.sha256(value.encode()).hexdigest() if value else None
        changed = digest != self.digest
        self.value, self.digest = value, digest
        return changed


class SubscriptionKeys:
    """Which key to send; learns from APIM's rejections; reloads files when they change."""

    def __init__(self, settings: Settings, metrics: Metrics, route: Route | None = None) -> None:
        self._metrics = metrics
        route = route or settings.routes[0]
        self._route = route.name
        self._slots = [
            _Slot(name, source)
            for name, source in (
                (PRIMARY, route.primary_key),
                (SECONDARY, route.secondary_key),
            )
            if source is not None
        ]
        self._interval = settings.key_reload_interval
        for slot in self._slots:
            slot.apply(slot.load())
        self._active = 0
        self._publish()

    def current(self) -> tuple[str, str] | None:
        """(slot, key) to send first, or None when no key is configured."""
        if not self._slots:
            return None
        slot = self._slots[self._active]
        if slot.value is None:
            return None
        return slot.name, slot.value

    def fallback(self, rejected_slot: str) -> tuple[str, str] | None:
        """The other slot after APIM rejected `rejected_slot`; it is sent first from now on."""
        others = [
            (index, slot)
            for index, slot in enumerate(self._slots)
            if slot.name != rejected_slot and slot.value is not None
        ]
        if not others:
            return None
        index, slot = others[0]
        if self._slots[self._active].name == rejected_slot:
            self._active = index
            self._metrics.key_fallbacks.labels(route=self._route).inc()
            self._publish()
            log.warning("subscription_key_fallback", rejected=rejected_slot, now_using=slot.name)
        assert slot.value is not None  # noqa: S101 - filtered above
        return slot.name, slot.value

    async def reload(self) -> bool:
        """Re-read every key source; True when any key changed (then the primary goes first)."""
        values = await asyncio.to_thread(self._load_all)
        changed = False
        for slot, value in zip(self._slots, values, strict=True):
            if value is not _UNREADABLE:
                changed |= slot.apply(value)
        if changed:
            self._active = 0
            self._metrics.key_reloads.labels(route=self._route).inc()
            self._publish()
            log.info("subscription_keys_reloaded", active=self._slots[0].name)
        return changed

    async def watch(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Poll key files for content changes until cancelled."""
        if not any(slot.source.file for slot in self._slots):
            return
        while True:
            await sleep(self._interval)
            await self.reload()

    def _load_all(self) -> list[str | None]:
        values: list[str | None] = []
        for slot in self._slots:
            try:
                values.append(slot.load())
            except OSError as exc:
                # Keep the old value: a half-updated mount must not take the key away.
                log.error("subscription_key_reload_failed", slot=slot.name, reason=exc.strerror)
                values.append(_UNREADABLE)
        return values

    def _publish(self) -> None:
        self._metrics.set_active_key(
            self._slots[self._active].name if self._slots else None, self._route
        )
