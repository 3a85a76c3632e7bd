"""API keys: open without keys, scopes, refusals."""

from __future__ import annotations

import pytest

from app.services.auth import ApiKeys


class TestApiKeys:
    async def test_open_when_no_keys(self):
        principal = await ApiKeys(()).authenticate(None)
        assert principal is not None and principal.can("trade")

    async def test_scopes_and_refusals(self):
        keys = ApiKeys(("r:read", "all-of-them"))
        reader = await keys.authenticate("r")
        assert reader is not None and reader.can("read") and not reader.can("trade")
        admin = await keys.authenticate("all-of-them")
        assert admin is not None and admin.can("publish")
        assert await keys.authenticate("x") is None
        assert await keys.authenticate(None) is None
        assert await keys.authenticate("") is None

    def test_unknown_scope_is_refused_without_echoing_the_key(self):
        with pytest.raises(ValueError) as refused:
            ApiKeys(("s3cret:fly",))
        assert "s3cret" not in str(refused.value)
