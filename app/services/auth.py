"""Optional API keys with scopes.

`API_KEYS=key` or `key:read+trade`; several separated by commas. A key listed without scopes has
all of them. With no keys configured the gateway is open and every client has every scope.
Keys are compared in constant time and never logged: a principal is named by its position.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

SCOPES = frozenset({"read", "trade", "publish"})


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes


ANONYMOUS = Principal("anonymous", SCOPES)


class ApiKeys:
    def __init__(self, entries: tuple[str, ...]) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        for position, entry in enumerate(entries, start=1):
            key, _, scope_list = entry.partition(":")
            scopes = frozenset(s.strip() for s in scope_list.split("+") if s.strip()) or SCOPES
            unknown = scopes - SCOPES
            if not key or unknown:
                raise ValueError(f"API_KEYS entry {position}: needs a key and scopes among "
                                 f"{sorted(SCOPES)}")
            self._keys.append((key.encode(), Principal(f"key#{position}", scopes)))

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal of `presented`, ANONYMOUS when no keys are configured, else None."""
        if not self._keys:
            return ANONYMOUS
        candidate = (presented or "").encode()
        found: Principal | None = None
        for key, principal in self._keys:
            # Every key is compared, so the time taken does not say which one nearly matched.
            if hmac.compare_digest(key, candidate) and found is None:
                found = principal
        return found
