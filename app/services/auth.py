"""Optional API keys with scopes: from the environment, and from the database.

`API_KEYS=key` or `key:read+trade`; several separated by commas. A key listed without scopes has
all of them. Keys created with `python -m app keys create` are stored hashed (SHA-256) with their
scopes and can be revoked. With no key anywhere the gateway is open and every client has every
scope. Keys are compared in constant time and never logged: a principal is named by its position
or its id.

Once a key has been created the gateway stays keyed: revoking the last one leaves a gateway that
admits nobody until a key is created, never an open one. Only `python -m app keys open` (refused
while a key is active) opens it again. Every switch between open and keyed is logged at WARNING.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

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
    """What the database says of its keys: the ids of the active ones, and whether any key
    (active or revoked) exists, which makes the gateway keyed."""

    active: frozenset[str] = frozenset()
    any: bool = False


class ApiKeys:
    """The keys of the environment (`API_KEYS`) and of the database. What the database says is
    trusted for `refresh_interval` seconds (`API_KEY_REFRESH_INTERVAL`): keys created or revoked
    by the CLI take effect within that time."""

    def __init__(
        self, entries: tuple[str, ...], db: Any = None, refresh_interval: float = 5.0
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
        self._stored = StoredKeys()
        self._stored_checked = float("-inf")
        self._keyed: bool | None = None  # as last logged; None before the first look

    async def required(self) -> bool:
        """Whether a key is needed (the gateway is keyed)."""
        if time.monotonic() - self._stored_checked > self.refresh_interval:
            await self.refresh()
        return self._is_keyed()

    def _is_keyed(self) -> bool:
        return bool(self._keys) or self._stored.any

    @property
    def stored(self) -> StoredKeys:
        return self._stored

    async def refresh(self) -> None:
        """Ask the database again; log a switch between open and keyed."""
        if self._db is not None:
            async with self._db.connection() as connection:
                active, any_key = await store.api_key_state(connection)
            self._stored = StoredKeys(active, any_key)
        self._stored_checked = time.monotonic()
        keyed = self._is_keyed()
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

    def still_admits(self, principal: str) -> bool:
        """Whether a client admitted as `principal` would still be: not once the gateway has
        become keyed (anonymous) or its stored key was revoked."""
        if principal == ANONYMOUS.name:
            return not self._is_keyed()
        if principal.startswith("key:"):
            return principal[len("key:") :] in self._stored.active
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
        if presented and self._db is not None:
            async with self._db.connection() as connection:
                stored = await store.select_api_key(connection, hash_key(presented))
            if stored is not None:
                return Principal(f"key:{stored[0]}", parse_scopes(stored[1]))
        return None if await self.required() else ANONYMOUS
