"""Where the deployment's Redis is: one server (`REDIS_URL`), a master followed through Sentinel
(`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`), or a Redis Cluster (`REDIS_CLUSTER`). redis-py's
own clients do the following: Sentinel's pool asks the sentinels for the master on every new
connection (a connection to a demoted master is dropped), the cluster client refreshes its slot
map on MOVED and on a lost node. The stream, the leases and their scripts see one Redis either
way.

In a cluster every key of a deployment carries the hash tag `{REDIS_PREFIX}`: they share one
slot, so the publish script, which touches several of them, stays atomic on one node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.connection import parse_url
from redis.exceptions import NoScriptError

# What the master's connections take from REDIS_URL under Sentinel (its address is the
# sentinels' answer).
_SENTINEL_MASTER_OPTIONS = ("db", "username", "password")


@dataclass(frozen=True)
class RedisTarget:
    url: str = ""
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    cluster: bool = False

    @property
    def mode(self) -> str:
        """memory (no Redis), standalone, sentinel or cluster."""
        if self.sentinels:
            return "sentinel"
        if self.cluster:
            return "cluster"
        return "standalone" if self.url else "memory"

    def key_prefix(self, prefix: str) -> str:
        """The prefix of the deployment's keys: a hash tag in a cluster (one slot for all)."""
        return f"{{{prefix}}}" if self.cluster else prefix

    def connect(self, **options: Any) -> Any:
        """A client of the deployment's Redis (the master, under Sentinel)."""
        if self.sentinels:
            addresses = [
                (host, int(port))
                for host, _, port in (entry.rpartition(":") for entry in self.sentinels)
            ]
            from_url = parse_url(self.url) if self.url else {}
            master_options = {k: from_url[k] for k in _SENTINEL_MASTER_OPTIONS if k in from_url}
            sentinel = Sentinel(
                addresses,
                sentinel_kwargs={
                    "socket_timeout": options.get("socket_connect_timeout", 5),
                    "socket_connect_timeout": options.get("socket_connect_timeout", 5),
                },
            )
            return sentinel.master_for(self.sentinel_master, **master_options, **options)
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        return aioredis.from_url(self.url, **options)


class Script:
    """A Lua script, run by its SHA1 and sent whole when the server lacks it: a promoted
    replica's script cache is empty, and redis-py's own reload (SCRIPT LOAD, then EVALSHA) can
    reach another node than the call in a cluster whose slot map is changing."""

    def __init__(self, client: Any, text: str) -> None:
        self._client = client
        self._text = text
        self._sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.eval(self._text, len(keys), *keys, *args)
