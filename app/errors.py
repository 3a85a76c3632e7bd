"""One error type, `GatewayError`: services, the REST views and the WebSocket protocol raise it;
this module maps it once to an HTTP response and to a WebSocket `error` event, both the spec's
`{error, code, details}`."""

from __future__ import annotations

import math
from typing import Any

from quart import Quart, Response, request
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from app.services.events import envelope

# The HTTP status of each code that is not a 400 (a request that is wrong as it stands).
HTTP_STATUS = {
    "AUTHENTICATION_FAILED": 401,
    "FORBIDDEN": 403,
    "PROPOSAL_NOT_FOUND": 404,
    "PROPOSAL_ALREADY_DECIDED": 409,
    "ENGINE_PAUSED": 409,
    "IDEMPOTENCY_KEY_REUSED": 409,
    "NOTHING_TO_SELL": 422,
    "BUS_UNAVAILABLE": 503,
    "DATABASE_UNAVAILABLE": 503,
    "NO_PRICE": 503,
    "NO_PORTFOLIO": 503,
    "ENGINE_UNAVAILABLE": 503,
    "ENGINE_ERROR": 502,
}


class GatewayError(Exception):
    """What was asked cannot be done: `code` (the spec's error codes and ours), a short `error`,
    `details` that name the offending value, and `fields` more of the answer's body. Not the
    caller's connection: a WebSocket client gets it as an `error` event and stays connected."""

    def __init__(
        self,
        code: str,
        error: str,
        details: str = "",
        *,
        retry_after: float | None = None,
        http_status: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(error)
        self.code = code
        self.error = error
        self.details = details
        self.retry_after = retry_after  # seconds; sent as Retry-After
        # Set for an error relayed from a remote engine: its code may be one of its own.
        self.http_status = http_status
        self.fields = fields

    @property
    def status(self) -> int:
        return self.http_status or HTTP_STATUS.get(self.code, 400)

    def body(self) -> dict[str, Any]:
        return {**error_body(self.code, self.error, self.details), **self.fields}


def error_event(error: GatewayError, connection_id: str | None, request_id: Any = None) -> str:
    """`error` as the WebSocket `error` event its caller gets."""
    return envelope("error", error.body(), connection_id, request_id)


def error_body(code: str, error: str, details: str) -> dict[str, Any]:
    return {"error": error, "code": code, "details": details}


def describe_validation_error(error: Exception | None) -> str:
    """One line naming each offending field and value (the first five)."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    parts = []
    for item in errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        # quoted: the string "1" and the number 1 read differently.
        parts.append(f"{where}: {item['msg']} (got {quoted(item.get('input'))})")
    return "; ".join(parts)


def quoted(value: Any) -> str:
    """A client's value in an error message: its repr, cut short (a value may be megabytes)."""
    return excerpt(repr(value), 80)


def excerpt(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def register_error_handlers(app: Quart) -> None:
    @app.after_request
    async def add_security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(GatewayError)
    async def gateway_error(error: GatewayError) -> tuple[dict[str, Any], int, dict[str, str]]:
        headers = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        return error.body(), error.status, headers

    @app.errorhandler(RequestSchemaValidationError)
    async def validation_error(error: RequestSchemaValidationError) -> tuple[dict[str, Any], int]:
        return error_body(
            "VALIDATION_ERROR",
            "Invalid request body",
            describe_validation_error(error.validation_error),
        ), 400

    @app.errorhandler(UnicodeDecodeError)
    async def undecodable_body(error: UnicodeDecodeError) -> tuple[dict[str, Any], int]:
        return error_body(
            "BAD_REQUEST", "Bad Request", f"The body is not valid UTF-8 (byte {error.start})"
        ), 400

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> tuple[dict[str, Any], int, list[tuple[str, str]]]:
        code = (error.name or "error").upper().replace(" ", "_")
        # Keep what tells the client how to go on (429's Retry-After), not the HTML type.
        headers = [
            (name, value)
            for name, value in error.get_headers()
            if name.lower() in ("retry-after", "allow")
        ]
        return (
            error_body(code, error.name or "Error", error.description or ""),
            error.code or 500,
            headers,
        )
