"""The gateway's Prometheus metrics (prometheus_client), one scrape for the whole host.

Served by Hypercorn through hypercorn_config.py, every worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and `GET /metrics` on any worker
reads them all: gauges of connections are summed over the live workers, counters over every
worker that ever ran, histograms merged. Without that directory (one process: the tests, an
embedded app) the values are this process's.

The delivery path only counts in plain integers (the connection manager's counters);
`MetricsSync` copies them here every METRICS_INTERVAL and before a scrape. What is observed
directly is observed once per batch or per request, never per delivery.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import MmapedDict

from app.services.events import TOPICS

if TYPE_CHECKING:
    from app.services.events import Event
    from app.services.gateway import Gateway

# Read by prometheus_client when it is imported: set by hypercorn_config.py in the master,
# before any worker starts.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_PER_EVENT_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)
_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# -- WebSockets ---------------------------------------------------------------------------------

WS_CONNECTIONS = Gauge(
    "sigmax_ws_connections",
    "Open WebSocket connections (summed over the host's live workers).",
    multiprocess_mode="livesum",
)
WS_CONNECTIONS_OPENED = Counter(
    "sigmax_ws_connections_opened", "WebSocket connections accepted (past authentication)."
)
WS_DELIVERIES = Counter(
    "sigmax_ws_deliveries", "Events handed to client connections: one per event per recipient."
)
WS_REPLAYED = Counter("sigmax_ws_replayed", "Events replayed to resuming clients (`since`).")
WS_SLOW_CONSUMER_CLOSES = Counter(
    "sigmax_ws_slow_consumer_closes",
    "Connections closed because their send queue was full (the slow-consumer policy).",
)
WS_TIMEOUTS = Counter(
    "sigmax_ws_timeouts", "Connections closed after WS_CONNECTION_TIMEOUT without a message."
)
WS_AUTH_FAILURES = Counter(
    "sigmax_ws_auth_failures", "WebSocket handshakes refused for a missing or invalid API key."
)
WS_MAX_CONNECTIONS = Gauge(
    "sigmax_ws_max_connections",
    "Connections the host's live workers may hold (WS_MAX_CONNECTIONS each, summed).",
    multiprocess_mode="livesum",
)
WS_QUEUE_DEPTH_MAX = Gauge(
    "sigmax_ws_queue_depth_max",
    "The deepest send queue of any connection (frames waiting for a slow client).",
    multiprocess_mode="livemax",
)
TOPIC_SUBSCRIBERS = Gauge(
    "sigmax_ws_topic_subscribers",
    "Connections subscribed to each topic (summed over the host's live workers).",
    ["topic"],
    multiprocess_mode="livesum",
)
LIMIT_REFUSALS = Counter(
    "sigmax_limit_refusals", "Requests refused by an abuse limit, by limit.", ["limit"]
)
DELIVERY_LATENCY = Histogram(
    "sigmax_delivery_latency_seconds",
    "From an event's publication to its socket write, for the oldest event of each batch "
    "fanned out (clients that keep up; a slow client's queued frames are written later).",
    buckets=_LATENCY_BUCKETS,
)
FANOUT_SECONDS = Histogram(
    "sigmax_fanout_seconds_per_event",
    "The fan-out's time per event (a batch's time over its events), once per batch.",
    buckets=_PER_EVENT_BUCKETS,
)

# -- the stream ---------------------------------------------------------------------------------

EVENTS_PUBLISHED = Counter(
    "sigmax_events_published",
    "Events published, by type: counted by the worker that gave them their seq, so once per "
    "deployment.",
    ["type"],
)
TRADES = Counter(
    "sigmax_trades", "Trades executed (`trade_executed` published), by side.", ["side"]
)
PROPOSALS = Counter(
    "sigmax_proposals",
    "Proposal events published, by what happened: created, approved, rejected, expired.",
    ["event"],
)
ARCHIVE_WRITTEN = Counter(
    "sigmax_archive_written", "Events written to the event archive (by the archivist)."
)
ARCHIVE_DROPPED = Counter(
    "sigmax_archive_dropped",
    "Events dropped from the archivist's full queue while the database was away (taken back "
    "from the hot history when it still has them).",
)
ARCHIVE_BEHIND = Gauge(
    "sigmax_archive_behind_events",
    "Events the archivist has delivered but not yet written to the archive (0 on other workers).",
    multiprocess_mode="livemax",
)
STREAM_RESETS = Counter(
    "sigmax_stream_resets",
    "stream_reset notices a worker sent its clients (Redis lost data or failed over), by "
    "whether they missed events (recovered false: they reload state).",
    ["recovered"],
)
STREAM_LAG = Gauge(
    "sigmax_redis_stream_lag_events",
    "Events between the Redis stream's head and what the most lagging worker delivered.",
    multiprocess_mode="livemax",
)
# The health gauges have a label so that a worker still starting exports none of them: an
# unlabelled gauge reads 0 from the moment it is made, which would page "unreachable".
REDIS_CONNECTED = Gauge(
    "sigmax_redis_connected",
    "1 when every worker reaches Redis, 0 when one does not (1 without Redis), by mode: "
    "memory (no Redis), standalone, sentinel or cluster. Absent until the worker knows.",
    ["mode"],
    multiprocess_mode="livemin",
)
WORKER_RECEIVING = Gauge(
    "sigmax_worker_receiving",
    "1 while the worker receives the event stream, 0 for a deaf one (behind the head for "
    "longer than REDIS_DEAF_AFTER), by worker pid and bus backend.",
    ["bus"],
    multiprocess_mode="liveall",
)
DATABASE_UP = Gauge(
    "sigmax_database_up",
    "1 while every worker reaches the database, 0 while one does not (requests that need it "
    "answer 503 DATABASE_UNAVAILABLE), by backend: sqlite or postgresql.",
    ["backend"],
    multiprocess_mode="livemin",
)
WORKER_STARTS = Counter(
    "sigmax_worker_starts",
    "Worker processes started on this host: a start, a restart after a crash, a rolling "
    "restart; many in a few minutes is a crash loop.",
)
WORKER_UP = Gauge(
    "sigmax_worker_up",
    "Workers of this host that are serving (each counts 1 while alive): fewer than "
    "sigmax_workers_configured means one is stopped or crash-looping.",
    multiprocess_mode="livesum",
)
WORKERS_CONFIGURED = Gauge(
    "sigmax_workers_configured",
    "The worker processes this host is configured to run (WORKERS).",
    multiprocess_mode="livemax",
)
LEADER = Gauge(
    "sigmax_leader",
    "Workers of this host running the simulated producers (the leader lease): 0 or 1.",
    multiprocess_mode="livesum",
)
ENGINE_REACHABLE = Gauge(
    "sigmax_engine_reachable",
    "1 while the remote engine (ENGINE_URL) answers every worker, 0 when it does not "
    "(always 1 with the paper engine), by engine: paper or remote.",
    ["engine"],
    multiprocess_mode="livemin",
)

# -- requests -----------------------------------------------------------------------------------

HTTP_SECONDS = Histogram(
    "sigmax_http_request_duration_seconds",
    "REST requests (ingest included: route /api/events) by method, route and status.",
    ["method", "route", "status"],
)
COMMAND_SECONDS = Histogram(
    "sigmax_command_duration_seconds",
    "Commands (REST and WebSocket) by name and outcome: ok, or the error code.",
    ["command", "outcome"],
)

# -- the worker ---------------------------------------------------------------------------------

GC_PAUSE = Histogram(
    "sigmax_gc_pause_seconds",
    "Garbage collections, by generation (2: full; the worker stops for that long).",
    ["generation"],
    buckets=_PAUSE_BUCKETS,
)
LOOP_LAG = Histogram(
    "sigmax_event_loop_lag_seconds",
    "How late the event loop woke a 100 ms timer: how long it was blocked.",
    buckets=_PAUSE_BUCKETS,
)

_GC_GENERATIONS = ("0", "1", "2")
_SIDES = frozenset({"buy", "sell"})
_PROPOSAL_EVENTS = {
    "proposal_created": "created",
    "proposal_approved": "approved",
    "proposal_rejected": "rejected",
    "proposal_expired": "expired",
}


def count_published(events: Iterable[Event]) -> None:
    """Events given their seq by this worker."""
    by_type = collections.Counter(event.type for event in events)
    for type_, count in by_type.items():
        EVENTS_PUBLISHED.labels(type_).inc(count)
    if by_type.keys() & {"trade_executed", *_PROPOSAL_EVENTS}:
        for event in events:
            if event.type == "trade_executed":
                side = event.data.get("side") if isinstance(event.data, dict) else None
                TRADES.labels(side if side in _SIDES else "other").inc()
            elif event.type in _PROPOSAL_EVENTS:
                PROPOSALS.labels(_PROPOSAL_EVENTS[event.type]).inc()


def observe_gc_pause(generation: int, seconds: float) -> None:
    GC_PAUSE.labels(_GC_GENERATIONS[min(generation, 2)]).observe(seconds)


class MetricsSync:
    """Copies what the gateway counts in plain integers into the metrics: counters by their
    increase since the last copy, gauges as they are."""

    # metric: the connection manager's counter it follows
    COUNTERS = (
        (WS_CONNECTIONS_OPENED, "connections_total"),
        (WS_DELIVERIES, "deliveries"),
        (WS_REPLAYED, "replayed"),
        (WS_SLOW_CONSUMER_CLOSES, "slow_consumer_closes"),
        (WS_TIMEOUTS, "timeouts"),
        (WS_AUTH_FAILURES, "auth_failures"),
    )

    def __init__(self, gateway: Gateway, interval: float) -> None:
        self.gateway = gateway
        self.interval = interval
        self._copied: dict[str, int] = collections.defaultdict(int)
        # Every series a rule may ask for exists from the start, at 0, so that its first
        # increase is seen as one.
        for limit in gateway.manager.refusals:
            LIMIT_REFUSALS.labels(limit)
        for generation in _GC_GENERATIONS:
            GC_PAUSE.labels(generation)
        # What this worker is, set once: it counts while its process lives.
        WORKER_UP.set(1)
        WORKERS_CONFIGURED.set(gateway.config.WORKERS)
        WS_MAX_CONNECTIONS.set(gateway.manager.max_connections)

    def sync(self) -> None:
        manager = self.gateway.manager
        for metric, name in self.COUNTERS:
            self._increase(metric, name, manager.counters[name])
        for limit, count in manager.refusals.items():
            self._increase(LIMIT_REFUSALS.labels(limit), f"refusals:{limit}", count)
        connections = manager.connections.values()
        WS_CONNECTIONS.set(len(connections))
        WS_QUEUE_DEPTH_MAX.set(max((c.queue_depth for c in connections), default=0))
        for key, count in manager.index.counts().items():
            if key in TOPICS:  # symbols are the clients' choice: no label for each
                TOPIC_SUBSCRIBERS.labels(key).set(count)
        archive = self.gateway.archive
        self._increase(ARCHIVE_WRITTEN, "archive_written", archive.written)
        self._increase(ARCHIVE_DROPPED, "archive_dropped", archive.dropped)
        ARCHIVE_BEHIND.set(archive.behind(self.gateway.bus.head))
        health = self.gateway.health()
        LEADER.set(1 if health["leader"] else 0)
        # A health gauge is set once known (a remote engine not yet probed is not).
        engine = self.gateway.engine
        if engine.mode == "paper" or engine.reachable is not None:
            ENGINE_REACHABLE.labels(engine.mode).set(0 if engine.reachable is False else 1)
        # Without Redis the worker's own bus always receives, and there is no Redis to miss.
        STREAM_LAG.set(health.get("stream_lag", 0))
        if health.get("redis_connected", True) is not None:
            connected = health.get("redis_connected") is not False
            REDIS_CONNECTED.labels(health.get("redis_mode", "memory")).set(1 if connected else 0)
        WORKER_RECEIVING.labels(health["bus_backend"]).set(
            0 if health.get("receiving") is False else 1
        )
        if health["database_available"] is not None:
            DATABASE_UP.labels(health["database_backend"]).set(
                1 if health["database_available"] else 0
            )

    def _increase(self, metric: Any, name: str, value: int) -> None:
        increase = value - self._copied[name]
        if increase > 0:
            metric.inc(increase)
            self._copied[name] = value

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sync()


_WORKER_FILE = re.compile(r"^(\w+?)_(\d+)\.db$")
# The kinds whose values are totals over every process that ever ran: a dead worker's are
# folded into the file of pid 0 (never a worker's), so that files do not pile up per restart.
_FOLDED = frozenset({"counter", "histogram", "summary"})
FOLDED_PID = 0


def _forget_dead_workers(directory: str) -> None:
    """A worker that died (SIGKILL, a crash, a restart) never says so: its live gauges would go
    on being summed. Each scrape drops those of processes that are gone, and folds their
    counters and histograms into one file per kind (a total keeps what they counted). Call it
    holding the directory's lock: a scrape that read a file being folded would count it twice."""
    dead: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    for name in os.listdir(directory):
        match = _WORKER_FILE.match(name)
        if match is None or int(match[2]) == FOLDED_PID or psutil.pid_exists(int(match[2])):
            continue
        dead[int(match[2])].append((match[1], os.path.join(directory, name)))
    for pid, files in dead.items():
        multiprocess.mark_process_dead(pid, directory)
        for kind, path in files:
            if kind in _FOLDED:
                _fold(path, os.path.join(directory, f"{kind}_{FOLDED_PID}.db"))


def _fold(source: str, target: str) -> None:
    """Add every value of `source` to `target`'s, then remove `source`."""
    totals = MmapedDict(target)
    try:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(source):
            total, _ = totals.read_value(key)
            totals.write_value(key, total + value, timestamp)
    finally:
        totals.close()
    os.remove(source)


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The metrics of the whole host (of this process without a metrics directory) in the
    format the scraper's Accept header asks for (Prometheus text 0.0.4 by default, or
    OpenMetrics), and its content type."""
    encode, content_type = choose_encoder(accept or "")
    if MULTIPROCESS_DIR is None:
        return encode(REGISTRY), content_type
    # One scrape at a time per host: folding and reading the same files must not interleave.
    with open(os.path.join(MULTIPROCESS_DIR, "scrape.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _forget_dead_workers(MULTIPROCESS_DIR)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, MULTIPROCESS_DIR)
        return encode(registry), content_type
