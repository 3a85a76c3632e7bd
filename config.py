"""Every setting of the gateway, read once from the environment, with typed defaults.

`Config.from_env()` is what `wsgi.py` and `hypercorn_config.py` use; tests build a `Config`
directly and override fields with `dataclasses.replace`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

MIB = 1024 * 1024


def positive(default: Any) -> Any:
    """A setting that must be above 0 (checked when the Config is made)."""
    return field(default=default, metadata={"positive": True})


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class Config:
    # Listening address of `make run` / hypercorn_config.py. Loopback by default: with no API keys
    # the gateway is open, so it must not be reachable from other hosts unless asked.
    HOST: str = "127.0.0.1"
    PORT: int = 8000
    WORKERS: int = positive(1)
    # Serve https:// and wss:// (Hypercorn's TLS): the certificate chain and its private key,
    # PEM files. Empty = plain http:// and ws:// (behind a proxy that terminates TLS).
    TLS_CERTFILE: str = ""
    TLS_KEYFILE: str = ""
    # Hypercorn's event loop: asyncio, or uvloop (needs the uvloop package; see the README).
    WORKER_CLASS: str = "asyncio"

    # Redis URL for the shared event stream across workers and hosts; empty = in-memory bus.
    # With REDIS_CLUSTER, any node of the cluster; with REDIS_SENTINELS, only its password and
    # database number are used (the master's address comes from the sentinels).
    REDIS_URL: str = ""
    # Redis under Sentinel: host:port of each sentinel, and the name of the master they monitor.
    # Every worker follows a promoted master without a restart.
    REDIS_SENTINELS: tuple[str, ...] = ()
    REDIS_SENTINEL_MASTER: str = "mymaster"
    # REDIS_URL names a node of a Redis Cluster: the deployment's keys share one hash slot.
    REDIS_CLUSTER: bool = False
    # Names of the Redis keys (stream, counter, leader lease): one prefix per deployment.
    REDIS_PREFIX: str = "sigmax"
    # Seconds after which a dead leader's lease runs out and another worker takes over.
    LEADER_TTL: float = positive(6.0)
    # A worker behind the Redis stream's head this long is reported not receiving (503).
    REDIS_DEAF_AFTER: float = positive(10.0)

    WS_MAX_CONNECTIONS: int = positive(1000)
    # Connections one API key may hold at once (0 = no limit); without keys it does not apply.
    WS_MAX_CONNECTIONS_PER_KEY: int = 100
    WS_HEARTBEAT_INTERVAL: float = positive(30.0)
    WS_CONNECTION_TIMEOUT: float = positive(60.0)
    # Largest client message accepted; bigger frames are closed with 1009 by Hypercorn.
    WS_MAX_MESSAGE_SIZE: int = positive(1 * MIB)
    # Frames waiting for one connection before the slow-consumer policy applies.
    WS_SEND_QUEUE_SIZE: int = positive(1000)
    # Write pre-framed events straight to each connection's TCP transport when served by
    # Hypercorn's asyncio worker over HTTP/1.1 (see app/services/transport.py); off = ASGI send.
    WS_FAST_PATH: bool = True
    # How long a server-initiated close may wait for the client before the connection is dropped.
    WS_CLOSE_TIMEOUT: float = positive(5.0)
    # Seconds between copies of this worker's counters into the host's metrics (GET /metrics).
    METRICS_INTERVAL: float = positive(1.0)
    # Seconds between timed full garbage collections (app/services/health.py); 0 = none, only
    # Python's own (closed connections leave nothing for one to collect).
    GC_INTERVAL: float = 0.0

    # Events kept for resume (`subscribe` with `since`), bounded by count and by age in seconds.
    EVENT_HISTORY_SIZE: int = positive(10_000)
    EVENT_HISTORY_MAX_AGE: float = positive(600.0)

    # Every stream event is archived in the database (resume past the hot history, replay,
    # GET /api/events), kept this many seconds and at most this many events, oldest dropped first.
    EVENT_ARCHIVE_MAX_AGE: float = positive(7 * 86400.0)
    EVENT_ARCHIVE_MAX_EVENTS: int = positive(10_000_000)

    # SQLite file (default, no server needed) or postgresql://user@host:5432/db.
    DATABASE_URL: str = "sqlite:///sigmax.db"

    # The simulated trading system. With SIMULATION off the gateway only relays what an external
    # engine publishes through POST /api/events.
    SIMULATION: bool = True
    SYMBOLS: tuple[str, ...] = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
    MARKET_INTERVAL: float = positive(2.0)
    ANALYSIS_INTERVAL: float = positive(10.0)
    PORTFOLIO_INTERVAL: float = positive(3.0)
    STATUS_INTERVAL: float = positive(5.0)
    HEALTH_INTERVAL: float = positive(10.0)
    # A proposal is made when an analysis is at least this confident.
    PROPOSAL_CONFIDENCE: float = 0.7
    PROPOSAL_TTL: float = positive(300.0)
    AUTO_APPROVE: bool = False
    INITIAL_CASH: float = positive(100_000.0)
    FEE_RATE: float = 0.001
    SLIPPAGE: float = 0.0005
    # Share of the portfolio's value one proposal risks; alert thresholds.
    RISK_PER_TRADE: float = 0.02
    MAX_POSITION_SHARE: float = 0.25
    MAX_DRAWDOWN: float = 0.10
    # The market feed: `simulated` (a random walk), or `ccxt:<exchange id>` (e.g. ccxt:binance),
    # live public tickers through ccxt, polled every MARKET_INTERVAL (paper trading on live data).
    MARKET_FEED: str = "simulated"
    # The exchange's API base URL instead of ccxt's own (a testnet, a proxy); empty = ccxt's.
    MARKET_FEED_URL: str = ""

    # The trading engine: empty = the built-in paper engine; else the URL of a remote engine
    # that every user action is sent to (POST {ENGINE_URL}/commands; see the README).
    ENGINE_URL: str = ""
    # Sent to the remote engine as X-API-Key.
    ENGINE_API_KEY: str = ""
    # Seconds one user action may wait for the remote engine, retries included.
    ENGINE_TIMEOUT: float = positive(5.0)
    # The standalone paper engine (`python -m app engine`): the gateway it follows and publishes
    # to, and the key it does so with (scopes read and publish).
    GATEWAY_URL: str = "http://127.0.0.1:8000"
    GATEWAY_API_KEY: str = ""

    # Topics and symbols one connection may hold.
    WS_MAX_SUBSCRIPTIONS: int = positive(500)
    # WebSocket commands per connection: a sustained rate per second and a burst.
    WS_COMMAND_RATE: float = positive(5.0)
    WS_COMMAND_BURST: int = positive(20)

    # REST requests per second per client (its API key, else its address); 0 = no limit.
    # The ingest endpoint is not limited: it is the engine's bulk path.
    REST_RATE_LIMIT: int = 200

    # Comma separated `key` or `key:scope+scope`; scopes are read, trade, publish. A key without
    # scopes has all of them. Empty = no authentication (local paper trading).
    API_KEYS: tuple[str, ...] = ()
    # A gateway on a HOST other than loopback refuses to start with no key (API_KEYS or stored)
    # unless this says it may: whoever reaches it would have every scope, `trade` included.
    ALLOW_OPEN_GATEWAY: bool = False
    # Seconds between looks at the database's keys: a key created or revoked with the CLI takes
    # effect within this time, and WebSockets no longer admitted (keyless once the gateway is
    # keyed, or with a revoked key) are closed.
    API_KEY_REFRESH_INTERVAL: float = positive(5.0)
    # Seconds the stored keys as last read stay in force while the database is unreachable;
    # past it a stored key is refused until the database answers (API_KEYS are not affected).
    API_KEY_CACHE_MAX_AGE: float = positive(3600.0)

    CORS_ORIGINS: tuple[str, ...] = ("http://localhost:3000", "http://localhost:5173")

    LOG_LEVEL: str = "INFO"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Config:
        """Read every field from the environment variable of the same name."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in env:
                continue
            raw = env[f.name]
            default = f.default
            try:
                if isinstance(default, bool):
                    values[f.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                elif isinstance(default, tuple):
                    values[f.name] = _split(raw)
                else:
                    values[f.name] = raw.strip()
            except ValueError as error:
                raise ValueError(f"{f.name}={raw!r}: {error}") from None
        return cls(**values)

    @property
    def tls(self) -> bool:
        return bool(self.TLS_CERTFILE)

    @property
    def on_loopback(self) -> bool:
        """HOST is reachable from this machine only."""
        host = self.HOST.strip("[]")
        return host == "localhost" or host.startswith("127.") or host == "::1"

    @property
    def uses_redis(self) -> bool:
        return bool(self.REDIS_URL or self.REDIS_SENTINELS)

    def hypercorn_settings(self) -> dict[str, Any]:
        """The Hypercorn settings that follow from this configuration."""
        if self.WORKERS > 1 and not self.uses_redis:
            # Each worker would have its own in-memory stream: clients on different workers
            # would see different events and different seq numbers.
            raise SystemExit(
                f"WORKERS={self.WORKERS} needs REDIS_URL or REDIS_SENTINELS: without Redis "
                "every worker is an island. Set one, or run one worker."
            )
        return {
            "bind": [f"{self.HOST}:{self.PORT}"],
            "workers": self.WORKERS,
            "worker_class": self.WORKER_CLASS,
            # Oversized client messages are closed by Hypercorn with 1009.
            "websocket_max_message_size": self.WS_MAX_MESSAGE_SIZE,
            # The gateway sends its own heartbeat events and checks the replies.
            "websocket_ping_interval": None,
            "graceful_timeout": 5.0,
            # Connections waiting to be accepted: Hypercorn's 100 overflows when thousands of
            # clients reconnect at once (the kernel caps it at net.core.somaxconn).
            "backlog": 4096,
            # No access log: query strings can carry API keys.
            "accesslog": None,
            **({"certfile": self.TLS_CERTFILE, "keyfile": self.TLS_KEYFILE} if self.tls else {}),
        }

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.metadata.get("positive") and getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive, got {getattr(self, f.name)!r}")
        if self.MARKET_FEED != "simulated" and not (
            self.MARKET_FEED.startswith("ccxt:") and self.MARKET_FEED[len("ccxt:") :]
        ):
            raise ValueError(
                f"MARKET_FEED must be simulated or ccxt:<exchange id>, got {self.MARKET_FEED!r}"
            )
        if bool(self.TLS_CERTFILE) != bool(self.TLS_KEYFILE):
            raise ValueError("TLS_CERTFILE and TLS_KEYFILE go together: set both, or neither")
        if self.REDIS_CLUSTER and (self.REDIS_SENTINELS or not self.REDIS_URL):
            raise ValueError(
                "REDIS_CLUSTER needs REDIS_URL (any node of the cluster) and no REDIS_SENTINELS"
            )
        for sentinel in self.REDIS_SENTINELS:
            host, _, port = sentinel.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"REDIS_SENTINELS entries are host:port, got {sentinel!r}")
        if self.GC_INTERVAL < 0:
            raise ValueError(f"GC_INTERVAL must be 0 or positive, got {self.GC_INTERVAL!r}")
