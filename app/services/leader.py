"""A lease in Redis that one worker of the deployment holds at a time: the producers' leader (the
simulated producers run there), the archivist (it writes the event archive).

The holder renews the lease well before it expires; if it dies, the lease runs out and another
worker takes it within `ttl` seconds. Only the holder can renew or release it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from app.services.redis_client import RedisTarget, Script

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLease:
    def __init__(self, target: RedisTarget, key: str, ttl: float, role: str = "leader") -> None:
        self._redis = target.connect(socket_timeout=5, socket_connect_timeout=5)
        self._key = key
        self.role = role  # what holding it makes this worker, as its log lines say
        self._ttl_ms = int(ttl * 1000)
        self._interval = ttl / 3
        self.holder_id = uuid.uuid4().hex
        self.is_leader = False
        self._renew = Script(self._redis, _RENEW)
        self._release = Script(self._redis, _RELEASE)

    async def run(
        self, on_elected: Callable[[], Awaitable[None]], on_deposed: Callable[[], Awaitable[None]]
    ) -> None:
        """Hold the lease while alive; call back when it is won or lost."""
        try:
            while True:
                held = await self._try_hold()
                if held and not self.is_leader:
                    self.is_leader = True
                    log.info("this worker holds the %s lease (%s)", self.role, self._key)
                    await on_elected()
                elif not held and self.is_leader:
                    self.is_leader = False
                    log.warning(
                        "%s lease lost (%s): another worker takes over", self.role, self._key
                    )
                    await on_deposed()
                await asyncio.sleep(self._interval)
        finally:
            if self.is_leader:
                self.is_leader = False
                await on_deposed()
                try:
                    await self._release(keys=[self._key], args=[self.holder_id])
                except RedisError:
                    pass  # it expires by itself
            await self._redis.aclose()

    async def _try_hold(self) -> bool:
        try:
            if self.is_leader:
                return bool(
                    await self._renew(keys=[self._key], args=[self.holder_id, self._ttl_ms])
                )
            return bool(await self._redis.set(self._key, self.holder_id, nx=True, px=self._ttl_ms))
        except RedisError:
            # Without Redis nobody can prove leadership; stepping down avoids two leaders.
            return False
