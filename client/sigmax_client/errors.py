"""The errors this package raises, shaped as the spec's Client Error Handling expects:
`RuntimeError` for connection problems and failed requests, `ValueError` for a subscription the
gateway rejects."""

from __future__ import annotations


class SigmaxError(Exception):
    """Base of every error of this package. `code` and `details` are the gateway's when the
    error is its `error` reply (`INVALID_TOPIC`, `RATE_LIMITED`, ...), else None."""

    def __init__(
        self, message: str, *, code: str | None = None, details: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class SigmaxConnectionError(SigmaxError, RuntimeError):
    """The gateway cannot be reached, refused the connection, or the connection was lost."""


class AuthenticationError(SigmaxConnectionError):
    """The gateway refused the API key (`AUTHENTICATION_FAILED`): retrying cannot help."""


class RequestTimeoutError(SigmaxError, RuntimeError):
    """No reply to a request within the client's `request_timeout`."""


class RequestError(SigmaxError, RuntimeError):
    """The gateway answered a request with an `error` event (for example `FORBIDDEN_COMMAND`)."""


class InvalidSubscriptionError(SigmaxError, ValueError):
    """The gateway rejected a subscription: `INVALID_TOPIC`, `INVALID_SYMBOL`, ..."""
