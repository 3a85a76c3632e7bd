"""Publishing events through the gateway's ingest endpoint (`POST /api/events`), for an engine or
a strategy that produces events. Every batch carries an `Idempotency-Key`, the same on each retry,
so a retry after a lost answer never publishes the batch twice."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from typing import Any

from sigmax_client.client import backoff_delay, tls_context
from sigmax_client.errors import RequestError, SigmaxConnectionError

DEFAULT_BASE_URL = "http://localhost:8000"


class SigmaxPublisher:
    """`await SigmaxPublisher(api_key="...").publish([{"type": "alert", "data": {...}}])`.

    A batch is retried (`attempts` in all, with backoff) when the gateway cannot be reached,
    gives no answer, or answers 503 (its event stream is unavailable; `Retry-After` is
    honoured). Other refusals raise RequestError with the gateway's code at once.
    `ssl_context` or `ca_file`: whom an https:// gateway's certificate must come from."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        attempts: int = 5,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/api/events"
        self.api_key = api_key
        self.timeout = timeout
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._tls = tls_context(ssl_context, ca_file)

    async def publish(
        self, events: Iterable[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish one batch (all or nothing); returns `{accepted, first_seq, last_seq,
        repeated}`. `idempotency_key`: a key of the caller's (default: a new one per call)."""
        body = json.dumps({"events": list(events)}).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key or uuid.uuid4().hex,
        }
        if self.api_key is not None:
            headers["X-API-Key"] = self.api_key
        failure, wait = "", 0.0
        for attempt in range(self.attempts):
            await asyncio.sleep(wait)
            status, reply, retry_after = await asyncio.to_thread(self._post, body, headers)
            if status == 202:
                return reply
            wait = backoff_delay(attempt, self.retry_delay, self.max_retry_delay)
            if status is None or status == 503:
                failure = str(reply.get("details") or reply.get("error") or "")
                wait = max(wait, retry_after or 0.0)
                continue
            raise RequestError(
                f"the gateway refused the events ({status}): "
                f"{reply.get('error')}: {reply.get('details')}",
                code=reply.get("code"),
                details=reply.get("details"),
            )
        raise SigmaxConnectionError(
            f"could not publish to {self.url} in {self.attempts} attempts: {failure}"
        )

    def _post(
        self, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, dict[str, Any], float | None]:
        """(status or None when there was no answer, JSON body, Retry-After seconds)."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout, context=self._tls
            ) as response:
                return response.status, _json(response.read()), None
        except urllib.error.HTTPError as error:
            retry_after = error.headers.get("Retry-After")
            return (
                error.code,
                _json(error.read()),
                float(retry_after) if retry_after and retry_after.isdigit() else None,
            )
        except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
            return None, {"error": str(error) or type(error).__name__}, None


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"error": str(value)[:200]}
