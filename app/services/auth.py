"""Optional API keys with scopes: from the environment, and from the database.

`API_KEYS=key` or `key:read+trade`; several separated by commas. A key listed without scopes has
all of them. Keys created with `python -m app keys create` are stored hashed (SHA-256) with their
scopes and can be revoked. With no key anywhere the gateway is open and every client has every
scope. Keys are compared in constant time and never logged: a principal is named by its position
or its id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from app.services import store

SCOPES = frozenset({"read", "trade", "publish"})
# How long "are there keys in the database" is trusted before it is asked again: keys created or
# revoked by the CLI take effect within this time.
KEY_COUNT_TTL = 5.0


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


class ApiKeys:
    def __init__(self, entries: tuple[str, ...], db: Any = None) -> None:
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
        self._stored_keys = 0
        self._stored_checked = float("-inf")

    async def required(self) -> bool:
        return bool(self._keys) or await self._stored_key_count() > 0

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
        if presented and self._db is not None:
            async with self._db.connection() as connection:
                stored = await store.select_api_key(connection, hash_key(presented))
            if stored is not None:
                return Principal(f"key:{stored[0]}", parse_scopes(stored[1]))
        return None if await self.required() else ANONYMOUS

    async def _stored_key_count(self) -> int:
        if self._db is None:
            return 0
        now = time.monotonic()
        if now - self._stored_checked > KEY_COUNT_TTL:
            async with self._db.connection() as connection:
                self._stored_keys = await store.count_active_api_keys(connection)
            self._stored_checked = now
        return self._stored_keys
