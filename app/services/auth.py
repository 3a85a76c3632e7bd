"""Optional API keys with scopes: from the environment, and from the database.

`API_KEYS=key` or `key:read+trade`; several separated by commas. A key listed without scopes has
all of them. Keys created with `python -m app keys create` are stored hashed (SHA-256) with their
scopes and can be revoked. With no key anywhere the gateway is open and every client has every
scope. Keys are compared in constant time and never logged: a principal is named by its position
or its id.

The stored keys are read into memory every `API_KEY_REFRESH_INTERVAL` seconds, and checked there:
no request waits for the database, and while it is unreachable the keys as last read stay in
force for `API_KEY_CACHE_MAX_AGE` seconds (a key revoked meanwhile is refused, and its WebSockets
closed, once the database answers again). Past that age a stored key is refused until the
database answers; keys of `API_KEYS` never depend on it.

Once a key has been created the gateway stays keyed: revoking the last one leaves a gateway that
admits nobody until a key is created, never an open one. Only `python -m app keys open` (refused
while a key is active) opens it again. Every switch between open and keyed is logged at WARNING.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from app.errors import GatewayError
from app.services import store

log = logging.getLogger(__name__)

SCOPES = frozenset({"read", "trade", "publish"})


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes


ANONYMOUS = Principal("anonymous", SCOPES)


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.replace(",", "+").split("+") if s.strip())
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    return scopes or SCOPES


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sgx_" + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class StoredKeys:
    """What the database says of its keys: the active ones (their hash -> (id, scopes)), and
    whether any key (active or revoked) exists, which makes the gateway keyed."""

    active: dict[str, tuple[str, str]] = field(default_factory=dict)
    any: bool = False

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(key_id for key_id, _ in self.active.values())


class ApiKeys:
    """The keys of the environment (`API_KEYS`) and of the database, as last read from it."""

    def __init__(
        self,
        entries: tuple[str, ...],
        db: Any = None,
        refresh_interval: float = 5.0,
        cache_max_age: float = 3600.0,
    ) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        for position, entry in enumerate(entries, start=1):
            key, _, scope_list = entry.partition(":")
            try:
                scopes = parse_scopes(scope_list)
            except ValueError as error:
                raise ValueError(f"API_KEYS entry {position}: {error}") from None
            if not key:
                raise ValueError(f"API_KEYS entry {position}: the key is empty")
            self._keys.append((key.encode(), Principal(f"key#{position}", scopes)))
        self._db = db
        self.refresh_interval = refresh_interval
        self.cache_max_age = cache_max_age
        self._stored = StoredKeys()
        self._read_at = float("-inf")  # monotonic time of the last successful read
        self._tried_at = float("-inf")  # and of the last attempt
        self._keyed: bool | None = None  # as last logged; None before the first look
        self._trusted = True  # stored keys within their age, as last logged

    @property
    def stored(self) -> StoredKeys:
        return self._stored

    @property
    def age(self) -> float | None:
        """Seconds since the stored keys were last read (None: never, or no database)."""
        if self._db is None or self._read_at == float("-inf"):
            return None
        return time.monotonic() - self._read_at

    async def refresh(self) -> None:
        """Read the stored keys again; log a switch between open and keyed. Raises the
        database's error (DatabaseUnavailable) and keeps the keys as last read."""
        self._tried_at = time.monotonic()
        if self._db is not None:
            async with self._db.connection() as connection:
                active, any_key = await store.api_key_state(connection)
            self._stored = StoredKeys(active, any_key)
        self._read_at = time.monotonic()
        keyed = self.keyed
        if keyed != self._keyed:
            if keyed:
                (log.warning if self._keyed is not None else log.info)(
                    "the gateway is keyed: every client needs an API key (%s)",
                    "API_KEYS" if self._keys else "keys in the database",
                )
            else:
                log.warning(
                    "the gateway is open: no API key is configured (API_KEYS) nor stored, so "
                    "every client that can reach it has every scope"
                )
            self._keyed = keyed

    async def _current(self) -> None:
        """Read again when the keys are older than the refresh interval (the gateway's own
        refresh is late or not running), at most once per interval: an unreachable database
        is not asked again on every request."""
        now = time.monotonic()
        if now - self._read_at > self.refresh_interval and (
            now - self._tried_at > self.refresh_interval
        ):
            with contextlib.suppress(GatewayError):  # the database is away: keys as last read
                await self.refresh()

    @property
    def keyed(self) -> bool:
        """Whether a key is needed, as last read."""
        return bool(self._keys) or self._stored.any

    def _stored_trusted(self) -> bool:
        age = self.age
        trusted = age is not None and age <= self.cache_max_age
        if trusted != self._trusted and age is not None:
            if trusted:
                log.info("stored API keys read again: they are accepted again")
            else:
                log.warning(
                    "stored API keys not read for %.0f s (API_KEY_CACHE_MAX_AGE): they are "
                    "refused until the database answers; API_KEYS still work",
                    age,
                )
            self._trusted = trusted
        return trusted

    async def required(self) -> bool:
        """Whether a key is needed (the gateway is keyed)."""
        await self._current()
        return self.keyed

    def still_admits(self, principal: str) -> bool:
        """Whether a client admitted as `principal` would still be: not once the gateway has
        become keyed (anonymous) or its stored key was revoked."""
        if principal == ANONYMOUS.name:
            return not self.keyed
        if principal.startswith("key:"):
            return principal[len("key:") :] in self._stored.ids
        return True

    async def authenticate(self, presented: str | None) -> Principal | None:
        """The principal of `presented`; ANONYMOUS when no key exists anywhere; else None."""
        candidate = (presented or "").encode()
        found: Principal | None = None
        for key, principal in self._keys:
            # Every key is compared, so the time taken does not say which one nearly matched.
            if hmac.compare_digest(key, candidate) and found is None:
                found = principal
        if found is not None:
            return found
        await self._current()
        if presented and self._stored_trusted():
            # A dictionary of SHA-256 digests: the time taken says nothing of the key.
            stored = self._stored.active.get(hash_key(presented))
            if stored is not None:
                return Principal(f"key:{stored[0]}", parse_scopes(stored[1]))
        return None if self.keyed else ANONYMOUS
