"""Waiting for state that another process or server changes (no event to await there)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 5.0, step: float = 0.01
) -> None:
    """Return once `condition()` holds; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(step)
