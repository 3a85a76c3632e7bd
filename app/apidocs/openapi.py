"""The REST API's OpenAPI document: quart-schema's, completed with what operations share (the
errors each can answer with, the API key scheme, whole-sentence summaries)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel
from quart_schema.openapi import OpenAPIProvider
from werkzeug.routing import Rule

from app.models import TRADED_SYMBOL, ErrorResponse

View = TypeVar("View", bound=Callable[..., Any])

# Ingest is the engine's bulk path; a probe that met 429 would take a healthy worker out.
NOT_RATE_LIMITED = frozenset({"/api/events", "/api/health", "/api/health/live"})

API_KEY_SCHEME = "ApiKey"
API_KEY_SECURITY = {
    "type": "apiKey",
    "in": "header",
    "name": "X-API-Key",
    "description": "Needed once the gateway has API keys (API_KEYS, or keys created with "
    "`python -m app keys create`); with none it is open. An operation names the "
    "scope its key needs. `?api_key=` is accepted too.",
}

ERROR_DESCRIPTIONS = {
    400: "Invalid input: the body or query string does not match the schema "
    "(`VALIDATION_ERROR`, `BAD_REQUEST`), or a value is refused, for example "
    "`INVALID_SYMBOL`, `UNKNOWN_SYMBOL`, `INVALID_EVENT`",
    401: "The gateway has API keys and the request has no valid one (`AUTHENTICATION_FAILED`)",
    403: "The API key lacks the scope this operation needs (`FORBIDDEN`)",
    404: "No such proposal (`PROPOSAL_NOT_FOUND`)",
    409: "The proposal is decided already (`PROPOSAL_ALREADY_DECIDED`, with its "
    "`proposal_status`), trading is paused (`ENGINE_PAUSED`), or an `Idempotency-Key` was "
    "used for another batch (`IDEMPOTENCY_KEY_REUSED`)",
    422: "A trading rule refuses the request (`NOTHING_TO_SELL`)",
    429: "Too many requests from this client (`TOO_MANY_REQUESTS`); retry after `Retry-After` "
    "seconds",
    502: "The remote engine (ENGINE_URL) answered outside its contract (`ENGINE_ERROR`)",
    503: "Not possible now, retry after `Retry-After` seconds: the event stream is unavailable "
    "(`BUS_UNAVAILABLE`), the database is unreachable (`DATABASE_UNAVAILABLE`), there "
    "is no market price yet (`NO_PRICE`) or no portfolio from a remote engine yet "
    "(`NO_PORTFOLIO`), or the remote engine is unreachable or did not answer within "
    "ENGINE_TIMEOUT (`ENGINE_UNAVAILABLE`). A remote engine's own refusals keep its status "
    "and code",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
_ERROR_STATUSES = "_sigmax_error_statuses"
REQUIRED_SCOPE_ATTRIBUTE = "_sigmax_required_scope"  # set by access.requires
OPTIONAL_BODY_ATTRIBUTE = "_sigmax_optional_body"  # set by access.optional_body
_NDJSON_ATTRIBUTE = "_sigmax_ndjson"
NDJSON = "application/x-ndjson"


def errors(*statuses: int) -> Callable[[View], View]:
    """Document that the view answers with the JSON error of each of `statuses` (raised as
    GatewayError), besides those RestOpenAPIProvider adds to every operation of its kind."""

    def decorator(view: View) -> View:
        setattr(view, _ERROR_STATUSES, (*getattr(view, _ERROR_STATUSES, ()), *statuses))
        return view

    return decorator


def ndjson(model: type[BaseModel]) -> Callable[[View], View]:
    """Document that the view answers 200 with newline-delimited JSON, one `model` per line."""

    def decorator(view: View) -> View:
        setattr(view, _NDJSON_ATTRIBUTE, model)
        return view

    return decorator


class RestOpenAPIProvider(OpenAPIProvider):
    """quart-schema's OpenAPI document, completed with what operations share: request bodies
    are required; each operation lists the JSON error of every status it can answer with (400
    when it validates input, 401 and 403 when it needs a key scope, 429 when it is rate
    limited, and those named with `errors`); the API key scheme; the traded symbols."""

    def schema(self) -> dict[str, Any]:
        document = super().schema()
        # Here rather than QuartSchema(security_schemes=...), which drops the description.
        document["components"]["securitySchemes"] = {API_KEY_SCHEME: API_KEY_SECURITY}
        return document

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        config = self._app.config["SIGMAX"]
        scope = getattr(view, REQUIRED_SCOPE_ATTRIBUTE, None)
        for operation in (op for path_item in paths.values() for op in path_item.values()):
            _describe(operation, inspect.getdoc(view) or "")
            statuses = set(getattr(view, _ERROR_STATUSES, ()))
            if "requestBody" in operation:
                operation["requestBody"]["required"] = not getattr(
                    view, OPTIONAL_BODY_ATTRIBUTE, False
                )
                _list_traded_symbols(operation["requestBody"], config.SYMBOLS)
            if "requestBody" in operation or any(
                p["in"] == "query" for p in operation["parameters"]
            ):
                statuses.add(400)
            if scope is not None:
                statuses |= {401, 403}
                # `{}`: no key is needed while the gateway has none.
                operation["security"] = [{API_KEY_SCHEME: [scope]}, {}]
            if config.REST_RATE_LIMIT and rule.rule not in NOT_RATE_LIMITED:
                statuses.add(429)
            operation["responses"] = {
                **operation["responses"],
                **{
                    status: _error_response(status)
                    for status in sorted(statuses)
                    if status not in operation["responses"]
                },
            }
            line = getattr(view, _NDJSON_ATTRIBUTE, None)
            if line is not None:
                operation["responses"][200] = {
                    "description": f"Newline-delimited JSON: one {line.__name__} per line",
                    "content": {
                        NDJSON: {"schema": {"$ref": f"#/components/schemas/{line.__name__}"}}
                    },
                }
                components[line.__name__] = line.model_json_schema()
        components[ErrorResponse.__name__] = ErrorResponse.model_json_schema()
        return paths, components


PATH_PARAMETERS = {"proposal_id": "The proposal's id, as `proposal_created` gave it"}


def _describe(operation: dict[str, Any], docstring: str) -> None:
    """The summary is the docstring's first sentence, the description the rest (quart-schema
    cuts at the first line break, mid-sentence); every response and path parameter says what
    it is."""
    text = " ".join(docstring.split())
    summary, _, rest = text.partition(". ")
    operation["summary"] = summary.rstrip(".")
    operation["description"] = rest
    for status, response in operation["responses"].items():
        if not response.get("description"):
            response["description"] = HTTPStatus(int(status)).phrase
    for parameter in operation.get("parameters", ()):
        if parameter["in"] == "path" and not parameter.get("description"):
            parameter["description"] = PATH_PARAMETERS.get(parameter["name"], parameter["name"])


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {
            "application/json": {
                "schema": {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
            }
        },
    }
    if status == 429:
        response["headers"] = RETRY_AFTER
    return response


def _list_traded_symbols(schema: Any, symbols: tuple[str, ...]) -> None:
    """Turn each field marked TRADED_SYMBOL into an enum of the traded symbols."""
    if isinstance(schema, dict):
        if schema.pop(TRADED_SYMBOL, False):
            schema["enum"] = list(symbols)
        for value in schema.values():
            _list_traded_symbols(value, symbols)
    elif isinstance(schema, list):
        for value in schema:
            _list_traded_symbols(value, symbols)
