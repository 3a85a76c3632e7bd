"""The SIGMAX Gateway application factory."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from datetime import timedelta
from typing import Any

import orjson
from quart import Quart, Response, g, request
from quart.json.provider import DefaultJSONProvider
from quart_cors import cors
from quart_rate_limiter import RateLimit, RateLimiter
from quart_schema import QuartSchema

from app.apidocs.openapi import NOT_RATE_LIMITED, RestOpenAPIProvider
from app.apidocs.ui import configure_docs
from app.blueprints.api import api_bp
from app.blueprints.dashboard import dashboard_bp
from app.blueprints.docs import docs_bp
from app.blueprints.ws import ws_bp
from app.errors import register_error_handlers
from app.logs import configure_logging
from app.services import metrics
from app.services.auth import hash_key
from app.services.database import attach_database
from app.services.events import SERVER_VERSION
from app.services.gateway import Gateway
from app.services.transport import serve_asgi_websockets
from config import Config


class StrictJSONProvider(DefaultJSONProvider):
    """Parses request bodies with orjson: faster, and it refuses NaN and Infinity."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


def create_app(config: Config | None = None) -> Quart:
    config = config or Config.from_env()
    configure_logging(config.LOG_LEVEL)
    metrics.WORKER_STARTS.inc()  # counted before anything can fail: a crash loop shows
    app = Quart(__name__)
    app.json = StrictJSONProvider(app)
    app.config["SIGMAX"] = config
    QuartSchema(
        app,
        info={"title": "SIGMAX Gateway", "version": SERVER_VERSION},
        openapi_provider_class=RestOpenAPIProvider,
    )
    configure_docs(app)
    register_error_handlers(app)
    app.register_blueprint(ws_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(docs_bp)
    app.register_blueprint(dashboard_bp)
    cors(app, allow_origin=list(config.CORS_ORIGINS), allow_headers=["Content-Type", "X-API-Key"])

    if config.REST_RATE_LIMIT:
        RateLimiter(
            app,
            key_function=_rate_limit_key,
            skip_function=_not_rate_limited,
            default_limits=[RateLimit(config.REST_RATE_LIMIT, timedelta(seconds=1))],
        )
    db = attach_database(app, config.DATABASE_URL)
    gateway = Gateway(config, db)
    app.extensions["gateway"] = gateway

    # while_serving: started after the database is connected (before_serving) and stopped
    # before it is closed (after_serving), so that stopping can still write.
    @app.while_serving
    async def serve_gateway() -> AsyncGenerator[None, None]:
        await gateway.start()
        yield
        await gateway.stop()

    @app.before_request
    async def start_clock() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    async def measure(response: Response) -> Response:
        if response.status_code == 429:
            gateway.manager.refuse("rest_rate")
        started = g.get("request_started")
        if started is not None:
            # The route's rule, not the path: one series per route, whatever the ids in it.
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            metrics.HTTP_SECONDS.labels(request.method, route, str(response.status_code)).observe(
                time.perf_counter() - started
            )
        return response

    app.asgi_app = serve_asgi_websockets(app)  # type: ignore[method-assign]
    return app


async def _rate_limit_key() -> str:
    key = request.headers.get("X-API-Key")
    # A hash: the limiter's store must not hold the keys themselves.
    return f"key:{hash_key(key)}" if key else f"addr:{request.remote_addr}"


async def _not_rate_limited() -> bool:
    return request.path in NOT_RATE_LIMITED
