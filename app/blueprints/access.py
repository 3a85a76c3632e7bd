"""View decorators: API-key scopes (`requires`) and an optional request body."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, cast

from quart import current_app, g, request
from quart_schema import RequestSchemaValidationError, document_request
from quart_schema.conversion import model_load

from app.apidocs.openapi import OPTIONAL_BODY_ATTRIBUTE, REQUIRED_SCOPE_ATTRIBUTE, View
from app.errors import GatewayError
from app.logs import Throttled

log = logging.getLogger(__name__)
refusals = Throttled(log)


def optional_body(model: type[Any]) -> Callable[[View], View]:
    """quart-schema's validate_request for a body that may be left out: no body (or an empty
    one) means the model's defaults. Documented as an optional request body."""

    def decorator(view: View) -> View:
        @wraps(view)
        async def parsed(*args: Any, **kwargs: Any) -> Any:
            if (await request.get_data()).strip():
                data = model_load(await request.get_json(), model, RequestSchemaValidationError)
            else:
                data = model()
            return await view(*args, data=data, **kwargs)

        setattr(parsed, OPTIONAL_BODY_ATTRIBUTE, True)
        return cast(View, document_request(model)(parsed))

    return decorator


def requires(scope: str) -> Callable[[View], View]:
    """Refuse the request unless its X-API-Key (when keys exist) has `scope`; the caller's
    principal is then `g.principal`. Checked before the body is validated."""

    def decorator(view: View) -> View:
        @wraps(view)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            presented = request.headers.get("X-API-Key") or request.args.get("api_key")
            principal = await current_app.extensions["gateway"].api_keys.authenticate(presented)
            if principal is None:
                refusals.info(
                    "refused %s %s from %s: %s",
                    request.method,
                    request.path,
                    request.remote_addr,
                    "wrong API key" if presented else "no API key",
                )
                if presented:
                    raise GatewayError(
                        "AUTHENTICATION_FAILED",
                        "Invalid API key",
                        "The key sent is not valid; send a valid key in the X-API-Key header",
                    )
                raise GatewayError(
                    "AUTHENTICATION_FAILED",
                    "Missing API key",
                    "This gateway requires an API key: send it in the X-API-Key header",
                )
            if not principal.can(scope):
                raise GatewayError(
                    "FORBIDDEN",
                    "Not allowed",
                    f"This endpoint needs an API key with the {scope!r} scope",
                )
            g.principal = principal.name
            return await view(*args, **kwargs)

        setattr(guarded, REQUIRED_SCOPE_ATTRIBUTE, scope)
        return cast(View, guarded)

    return decorator
