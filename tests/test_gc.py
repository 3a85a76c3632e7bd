"""Garbage collection on the GC_INTERVAL timer."""

from __future__ import annotations

import asyncio
import weakref


class _SelfReferencing:
    def __init__(self) -> None:
        self.me = self


async def test_full_collections_run_on_the_timer_and_free_cycles(gateway_factory):
    async with gateway_factory(GC_INTERVAL=0.05) as server:
        garbage = _SelfReferencing()
        alive = weakref.ref(garbage)
        del garbage  # a cycle: only a collection frees it
        async with asyncio.timeout(5):
            while server.gateway.garbage.collections < 2 or alive() is not None:
                await asyncio.sleep(0.02)
        stats = server.gateway.stats()
        assert stats["gc_full_collections"] >= 2
        assert 0 < stats["gc_pause_max_ms"] < 5000


async def test_no_timer_collections_with_gc_interval_zero(gateway_factory):
    async with gateway_factory(GC_INTERVAL=0) as server:
        await asyncio.sleep(0.2)
        assert server.gateway.stats()["gc_full_collections"] == 0
